"""The JIT kernels of edgerun.native against their NumPy references, and the NumPy fallback."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from edgerun import native
from edgerun.native import bench, config, reference
from edgerun.store import quant


def gaussian(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def matrix(fmt, out_features, in_features, group=32, seed=0):
    return quant.quantize(gaussian((out_features, in_features), seed), fmt, group)


def assert_close(out, expected, rel=1e-4):
    """Equal up to float32 summation order: errors relative to the output's scale."""
    assert out.shape == expected.shape and np.all(np.isfinite(out))
    scale = float(np.abs(expected).max())
    assert scale > 0
    assert float(np.abs(out - expected).max()) <= rel * scale


def assert_near_float(out, expected, rel):
    """Equal up to the int8 rounding of activations: RMS error at most rel of the expected RMS."""
    assert out.shape == expected.shape and np.all(np.isfinite(out))
    assert float(np.sqrt(np.mean((out - expected) ** 2))) <= rel * float(np.sqrt(np.mean(expected ** 2)))


# RMS error of the int8 path against the float product, relative to the output's RMS, on Gaussian data:
# about 0.5% for one product, 1-1.6% for an expert (two products, the second on a rounded first)
INT8_REL_MATMUL, INT8_REL_EXPERT = 0.01, 0.03


def int_dot(x, qs, scales) -> bool:
    return native._int_dot(x, qs, scales) and native.BACKEND == "numba"


def reference_matmul(x, qs, scales, out):
    """What native.matmul computes: the int8 algorithm where it takes the int8 path."""
    (reference.matmul_int8 if int_dot(x, qs, scales) else reference.matmul)(x, qs, scales, out)


@pytest.fixture
def float_path(monkeypatch):
    """The float kernels for every product, as on CPUs without AVX-512 VNNI."""
    monkeypatch.setattr(native, "INT_DOT", False)


def test_backend_is_numba():
    if os.environ.get("EDGERUN_NO_JIT", "") not in ("", "0"):
        pytest.skip("EDGERUN_NO_JIT is set")
    native.warmup()
    assert native.BACKEND == "numba"


def test_warmup_compiles_every_kernel():
    native.warmup()
    if native.BACKEND != "numba":
        pytest.skip("NumPy backend")
    k = native._kernels
    kernels = (k.matmul, k.expert_ffn, k.group_scales, k.quantize_q8, k.quantize_q4, k.quantize_mxfp4, k.attend_one,
               k.rms_norm)
    if native.INT_DOT:
        kernels += (k.gemv_q4_int8, k.expert_ffn_int8)
    compiled = [len(kernel.signatures) for kernel in kernels]
    assert all(compiled)
    # real calls of every kind find their kernels compiled already: nothing compiles after warmup
    for fmt in quant.FORMATS:
        gate_up, down = matrix(fmt, 96, 100), matrix(fmt, 100, 48)
        native.quantize(gaussian((5, 70)).astype(np.float16), fmt, 64)
        for tokens in (1, 4, 40):
            x = gaussian((tokens, 100))
            native.matmul(x, *gate_up, np.empty((tokens, 96), np.float32))
            native.expert_ffn(x, *gate_up, *down, native.GELU_TANH, np.empty((tokens, 100), np.float32))
    gate_up, down = matrix(quant.MXFP4, 96, 100), matrix(quant.MXFP4, 100, 48)
    for tokens in (1, 4, 40):
        x = gaussian((tokens, 100))
        native.expert_ffn(x, *gate_up, *down, native.SILU, np.empty((tokens, 100), np.float32))
    q, cache = gaussian((4, 16)), gaussian((2, 6, 16))
    native.attend_one(q, q[:2].copy(), q[:2].copy(), q[0, :4].copy(), q[1, :4].copy(), cache, cache.copy(), 3, 0.25,
                      2, 20.0, 1.5, q[2, :4].copy())
    assert [len(kernel.signatures) for kernel in kernels] == compiled


def test_kernels_compile_in_a_child_process_the_first_time_only(monkeypatch, tmp_path):
    """Compiling the kernels costs some 300 MB that loading them does not: the first time on a machine (no marker in
    the compile cache) a child process compiles them; once marked, and in that child itself, none is started."""
    native.warmup()
    if native.BACKEND != "numba":
        pytest.skip("NumPy backend")
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))  # where the markers go (numba itself has read it already)
    monkeypatch.delenv(config.COMPILING_ENV, raising=False)
    started = []
    monkeypatch.setattr(config.subprocess, "run", lambda cmd, env, **kw: started.append((cmd, env)))
    config.compile_apart("routed-q4-3", "native.warmup_routed(3, 'q4')")
    (cmd, env), = started
    assert cmd[0] == sys.executable and cmd[-1].endswith("native.warmup_routed(3, 'q4')")
    assert env[config.COMPILING_ENV] == "1"  # the child compiles there and then, without a child of its own
    config.mark_compiled("routed-q4-3")
    assert config.compiled_marker("routed-q4-3").parent == tmp_path
    config.compile_apart("routed-q4-3", "native.warmup_routed(3, 'q4')")
    monkeypatch.setenv(config.COMPILING_ENV, "1")
    config.compile_apart("routed-q8-5", "native.warmup_routed(5, 'q8')")
    assert len(started) == 1


def test_warmup_routed_leaves_nothing_to_compile_for_a_token():
    """The one-token kernel of a layer's experts is specialised for their number: warmup_routed compiles (or loads)
    it at load, so that a token of that many experts compiles nothing."""
    native.warmup()
    if native.BACKEND != "numba":
        pytest.skip("NumPy backend")
    native.warmup_routed(3, "q4")
    kernel = native._kernels.routed_experts_int8 if native.INT_DOT else native._kernels.routed_experts
    compiled = len(kernel.signatures)
    experts = [(*matrix("q4", 96, 128), *matrix("q4", 128, 48), None, None) for _ in range(3)]
    native.routed_experts(gaussian((1, 128)), experts, np.ones(3, np.float32), native.SILU,
                          np.empty((1, 128), np.float32))
    assert compiled and len(kernel.signatures) == compiled


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 5, 17, 64])  # GEMV; GEMM streaming token pairs; GEMM tiles
@pytest.mark.parametrize("shape", [(1, 48), (3, 100), (129, 4128), (129, 48), (3, 4128)])
def test_matmul_matches_reference(fmt, tokens, shape):
    out_features, in_features = shape
    qs, scales = matrix(fmt, out_features, in_features, seed=tokens)
    x = gaussian((tokens, in_features), seed=1)
    out = np.full((tokens, out_features), np.nan, np.float32)
    expected = np.empty_like(out)
    native.matmul(x, qs, scales, out)
    reference_matmul(x, qs, scales, expected)
    assert_close(out, expected)


@pytest.mark.parametrize("shape", [(1, 48), (3, 100), (129, 4128), (129, 4096), (6, 4160)])
def test_float_path_matches_reference(float_path, shape):
    out_features, in_features = shape
    qs, scales = matrix("q4", out_features, in_features)
    x = gaussian((1, in_features), seed=1)
    out, expected = np.empty((1, out_features), np.float32), np.empty((1, out_features), np.float32)
    native.matmul(x, qs, scales, out)
    reference.matmul(x, qs, scales, expected)
    assert_close(out, expected)


@pytest.mark.parametrize("shape", [(1, 48), (3, 100), (129, 4128), (129, 4096), (6, 4160), (7, 64)])
def test_int_dot_matches_its_reference(shape):
    out_features, in_features = shape
    qs, scales = matrix("q4", out_features, in_features)
    x = gaussian((1, in_features), seed=1)
    x[0, :32] = 0  # a group of zero activations
    if not int_dot(x, qs, scales):
        pytest.skip("no AVX-512 VNNI here: the float kernel runs")
    out, expected = np.full((1, out_features), np.nan, np.float32), np.empty((1, out_features), np.float32)
    native.matmul(x, qs, scales, out)
    reference.matmul_int8(x, qs, scales, expected)
    assert_close(out, expected, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_int_dot_is_near_the_float_product(seed):
    qs, scales = matrix("q4", 256, 4096, seed=seed)
    x = gaussian((1, 4096), seed=10 + seed)
    expected, int8 = np.empty((1, 256), np.float32), np.empty((1, 256), np.float32)
    reference.matmul(x, qs, scales, expected)
    reference.matmul_int8(x, qs, scales, int8)
    assert_near_float(int8, expected, INT8_REL_MATMUL)
    out = np.empty((1, 256), np.float32)
    native.matmul(x, qs, scales, out)
    assert_near_float(out, expected, INT8_REL_MATMUL)


def test_int_dot_quantizes_like_its_reference():
    """x's int8 groups, scales and offsets are bit for bit those of reference.quantize_activations, also
    when compiled inside the fastmath GEMV (as warmup does)."""
    native.warmup()
    if not native.INT_DOT:
        pytest.skip("no AVX-512 VNNI here: the float kernel runs")
    for seed in range(8):
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(4160) * 10.0 ** rng.uniform(-20, 20)).astype(np.float32)
        x[64:96] = 0
        quads = (4160 // 32 + 3) // 4
        xq, xd, init = np.empty(quads * 128, np.int8), np.empty(quads * 16, np.float32), np.empty(quads * 16, np.int32)
        native._kernels._quantize_x_q4(x, xq, xd, init)
        ref_q, ref_d = reference.quantize_activations(x)
        groups = np.arange(4160 // 32)
        base = groups // 4 * 128 + groups % 4 * 16
        lanes = groups // 4 * 16 + groups % 4 * 4
        kernel_q = np.concatenate([xq[base[:, None] + np.arange(16)], xq[base[:, None] + 64 + np.arange(16)]], axis=1)
        np.testing.assert_array_equal(kernel_q, ref_q)
        np.testing.assert_array_equal(xd[lanes], ref_d)
        np.testing.assert_array_equal(init[lanes], -8 * ref_q.astype(np.int64).sum(axis=1))


def test_quantize_activations():
    x = gaussian(96)
    x[32:64] = 0
    xq, d = reference.quantize_activations(x)
    assert xq.shape == (3, 32) and d.shape == (3,)
    assert np.abs(xq).max(axis=1).tolist() == [127, 0, 127] and d[1] == 0
    np.testing.assert_allclose(xq * d[:, None], x.reshape(3, 32), atol=float(d.max()) / 2 * 1.0001)


def test_int_dot_switch(monkeypatch):
    monkeypatch.setenv(config.NO_INT_DOT_ENV, "1")
    assert not config.int_dot()


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("group", [64, 96])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_matmul_larger_groups(fmt, group, tokens):
    qs, scales = matrix(fmt, 10, 300, group)
    x = gaussian((tokens, 300), seed=2)
    out, expected = np.empty((tokens, 10), np.float32), np.empty((tokens, 10), np.float32)
    native.matmul(x, qs, scales, out)
    reference.matmul(x, qs, scales, expected)
    assert_close(out, expected)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_matmul_equals_dense_product(fmt):
    qs, scales = matrix(fmt, 70, 200)
    x = gaussian((19, 200), seed=4)
    w = quant.dequantize(qs, scales, 200)
    for tokens in (1, 9, 19):
        out = np.empty((tokens, 70), np.float32)
        native.matmul(x[:tokens], qs, scales, out)
        dense = (torch.from_numpy(x[:tokens]).double() @ torch.from_numpy(w).double().T).float().numpy()
        if int_dot(x[:tokens], qs, scales):
            assert_near_float(out, dense, INT8_REL_MATMUL)
        else:
            assert_close(out, dense)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("tokens", [1, 6])
def test_matmul_leaves_inputs_alone(fmt, tokens):
    qs, scales = matrix(fmt, 33, 100)
    x = gaussian((tokens, 100), seed=5)
    before = (x.copy(), qs.copy(), scales.copy())
    native.matmul(x, qs, scales, np.empty((tokens, 33), np.float32))
    for a, b in zip((x, qs, scales), before):
        np.testing.assert_array_equal(a, b)


def test_matmul_rejects_bad_arguments():
    qs, scales = matrix("q8", 4, 64)
    x = gaussian((2, 64))
    with pytest.raises(ValueError):
        native.matmul(x, qs, scales, np.empty((2, 5), np.float32))  # wrong out shape
    with pytest.raises(ValueError):
        native.matmul(x, qs, scales, np.empty((2, 4), np.float64))
    with pytest.raises(ValueError):
        native.matmul(gaussian((2, 20)), qs, scales, np.empty((2, 4), np.float32))  # K not this matrix's
    with pytest.raises(ValueError):
        native.matmul(x, qs, scales[:3], np.empty((2, 4), np.float32))  # scales of another matrix
    with pytest.raises(ValueError):
        native.matmul(x, qs.view(np.uint8)[:, ::2], scales, np.empty((2, 4), np.float32))  # not contiguous


def torch_expert(x, gate_up, down, hidden, inter, activation, biases=(None, None)):
    """The expert in float32 torch on the dequantized weights (gpt-oss's SwiGLU as transformers writes it)."""
    gu = torch.from_numpy(quant.dequantize(*gate_up, hidden))
    d = torch.from_numpy(quant.dequantize(*down, inter))
    b1, b2 = (None if b is None else torch.from_numpy(b) for b in biases)
    h = torch.nn.functional.linear(torch.from_numpy(x), gu, b1)
    g, u = h[:, :inter], h[:, inter:]
    if activation == native.SWIGLU_OAI:
        g, u = g.clamp(max=7.0), u.clamp(-7.0, 7.0)
        gated = g * torch.sigmoid(g * 1.702) * (u + 1)
    else:
        act = {native.SILU: torch.nn.functional.silu, native.GELU: torch.nn.functional.gelu,
               native.GELU_TANH: lambda v: torch.nn.functional.gelu(v, approximate="tanh")}[activation]
        gated = act(g) * u
    return torch.nn.functional.linear(gated, d, b2).numpy()


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("activation", [native.SILU, native.GELU_TANH, native.GELU, "swiglu+biases"])
@pytest.mark.parametrize("tokens", [1, 5, 17])
@pytest.mark.parametrize("hidden, inter", [(64, 96), (100, 48)])
def test_expert_ffn(fmt, activation, tokens, hidden, inter):
    gate_up = matrix(fmt, 2 * inter, hidden, seed=1)
    down = matrix(fmt, hidden, inter, seed=2)
    x = gaussian((tokens, hidden), seed=3)
    biases = (None, None)
    if activation == "swiglu+biases":  # gpt-oss's experts (gate and up have a std of 8-10: the clamps engage)
        activation = native.SWIGLU_OAI
        biases = (gaussian((2 * inter,), seed=4), gaussian((hidden,), seed=5))
    out = np.full((tokens, hidden), np.nan, np.float32)
    expected = np.empty_like(out)
    native.expert_ffn(x, *gate_up, *down, activation, out, *biases)
    if int_dot(x, *gate_up):
        reference.expert_ffn(x, *gate_up, *down, activation, expected, product=reference.matmul_int8,
                             gate_up_bias=biases[0], down_bias=biases[1])
        assert_close(out, expected)
        assert_near_float(out, torch_expert(x, gate_up, down, hidden, inter, activation, biases), INT8_REL_EXPERT)
        return
    reference.expert_ffn(x, *gate_up, *down, activation, expected, gate_up_bias=biases[0], down_bias=biases[1])
    assert_close(out, expected)
    assert_close(out, torch_expert(x, gate_up, down, hidden, inter, activation, biases))


@pytest.mark.parametrize("hidden, inter", [(64, 96), (100, 48)])
def test_expert_ffn_float_path(float_path, hidden, inter):
    gate_up = matrix("q4", 2 * inter, hidden, seed=1)
    down = matrix("q4", hidden, inter, seed=2)
    x = gaussian((1, hidden), seed=3)
    out, expected = np.empty((1, hidden), np.float32), np.empty((1, hidden), np.float32)
    native.expert_ffn(x, *gate_up, *down, native.SILU, out)
    reference.expert_ffn(x, *gate_up, *down, native.SILU, expected)
    assert_close(out, expected)


def test_expert_ffn_activations_differ():
    gate_up, down = matrix("q8", 64, 32, seed=1), matrix("q8", 32, 32, seed=2)
    x = gaussian((2, 32))
    silu, tanh, gelu = (np.empty((2, 32), np.float32) for _ in range(3))
    native.expert_ffn(x, *gate_up, *down, native.SILU, silu)
    native.expert_ffn(x, *gate_up, *down, native.GELU_TANH, tanh)
    native.expert_ffn(x, *gate_up, *down, native.GELU, gelu)
    assert not np.allclose(silu, gelu) and not np.allclose(tanh, gelu, rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        native.expert_ffn(x, *gate_up, *down, 4, silu)
    with pytest.raises(ValueError, match="bias"):  # biases have the matrices' output sizes
        native.expert_ffn(x, *gate_up, *down, native.SWIGLU_OAI, silu, np.zeros(32, np.float32))
    with pytest.raises(ValueError):  # formats must match
        native.expert_ffn(x, *gate_up, *matrix("q4", 32, 32), native.SILU, silu)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("group", [32, 64, 96])
@pytest.mark.parametrize("shape", [(1, 48), (3, 100), (129, 4128)])
def test_quantize_is_byte_identical(fmt, group, shape):
    w = np.random.default_rng(group).standard_t(3, shape).astype(np.float32)
    w[0, :32] = 0  # a zero group
    if shape[1] >= 64:
        w[-1, 32:64] = 1e-12  # a scale that rounds to 0 in float16
        w[-1, 40], w[-1, 41] = 3.0, -3.0  # a tie between +m and -m
    w16 = w.astype(np.float16)
    w[0, -1] = 1e9  # a scale clipped to the float16 range
    for w_in in (w, w16):
        qs, scales = native.quantize(w_in, fmt, group)
        ref_qs, ref_scales = quant.quantize(w_in, fmt, group)
        assert qs.dtype == ref_qs.dtype and scales.dtype == np.float16
        np.testing.assert_array_equal(qs, ref_qs)
        np.testing.assert_array_equal(scales.view(np.uint16), ref_scales.view(np.uint16))


def test_set_threads():
    qs, scales = matrix("q4", 40, 96)
    x = gaussian((3, 96))
    expected = {tokens: np.empty((tokens, 40), np.float32) for tokens in (1, 3)}
    for tokens, e in expected.items():
        reference_matmul(x[:tokens], qs, scales, e)
    try:
        for n in (1, 2, 64):  # more than the pool: capped
            native.set_threads(n)
            for tokens in (1, 3):
                out = np.empty((tokens, 40), np.float32)
                native.matmul(x[:tokens], qs, scales, out)
                assert_close(out, expected[tokens])
    finally:
        native.set_threads(os.cpu_count() or 1)
    with pytest.raises(ValueError):
        native.set_threads(0)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=os.environ | env, timeout=120)


CHECK_MATMUL = """
import numpy as np
from edgerun.native import reference
from edgerun.store import quant
rng = np.random.default_rng(0)
qs, scales = quant.quantize(rng.standard_normal((9, 100)).astype(np.float32), "q4")
x = rng.standard_normal((3, 100)).astype(np.float32)
out, expected = np.empty((3, 9), np.float32), np.empty((3, 9), np.float32)
native.matmul(x, qs, scales, out)
reference.matmul(x, qs, scales, expected)
assert np.abs(out - expected).max() <= 1e-4 * np.abs(expected).max()
"""


def test_no_jit_switch_falls_back_to_numpy():
    result = run_python("""
import warnings
warnings.simplefilter("error")  # choosing NumPy on purpose is not worth a warning
from edgerun import native
assert native.BACKEND == "numpy", native.BACKEND
native.warmup()
native.set_threads(1)
""" + CHECK_MATMUL + """
print("ok")
""", EDGERUN_NO_JIT="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_compile_failure_falls_back_with_one_warning():
    result = run_python("""
import types, warnings
from edgerun import native
messages = []
warnings.showwarning = lambda message, *args, **kwargs: messages.append(str(message))
warnings.simplefilter("always")
def broken(*args):
    raise RuntimeError("LLVM says no")
names = ("matmul", "expert_ffn", "group_scales", "quantize_q8", "quantize_q4", "use_threads", "max_threads")
native._kernels = types.SimpleNamespace(F16_TO_F32=None, **{name: broken for name in names})
native._ready = False
""" + CHECK_MATMUL + """
native.matmul(x, qs, scales, out)
assert native.BACKEND == "numpy", native.BACKEND
assert len(messages) == 1 and "LLVM says no" in messages[0], messages
print("ok")
""")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_bench_smoke():
    if native.BACKEND != "numba":
        pytest.skip("the benchmarks need numba")
    assert bench.ram_read_bandwidth(1, nbytes=1 << 22) > 0
    assert bench.gemv_throughput("q4", 1, 64, 256, repeats=2) > 0
    assert bench.gemm_throughput("q8", 2, tokens=4, out_features=64, in_features=256, repeats=2) > 0


# -- mxfp4 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("shape", [(1, 64), (3, 96), (129, 2880), (6, 4160)])
def test_mxfp4_matmul_matches_reference(tokens, shape):
    out_features, in_features = shape
    qs, scales = matrix(quant.MXFP4, out_features, in_features, seed=tokens)
    x = gaussian((tokens, in_features), seed=1)
    out, expected = np.full((tokens, out_features), np.nan, np.float32), np.empty((tokens, out_features), np.float32)
    native.matmul(x, qs, scales, out)
    reference.matmul(x, qs, scales, expected)
    assert_close(out, expected)


@pytest.mark.parametrize("tokens", [1, 5, 17])
def test_mxfp4_expert_with_biases(tokens):
    hidden, inter = 96, 64
    gate_up, down = matrix(quant.MXFP4, 2 * inter, hidden, seed=1), matrix(quant.MXFP4, hidden, inter, seed=2)
    x = gaussian((tokens, hidden), seed=3)
    biases = (gaussian((2 * inter,), seed=4), gaussian((hidden,), seed=5))
    out = np.full((tokens, hidden), np.nan, np.float32)
    native.expert_ffn(x, *gate_up, *down, native.SWIGLU_OAI, out, *biases)
    expected = np.empty_like(out)
    reference.expert_ffn(x, *gate_up, *down, native.SWIGLU_OAI, expected, gate_up_bias=biases[0],
                         down_bias=biases[1])
    assert_close(out, expected)
    with pytest.raises(ValueError, match="format"):  # an mxfp4 gate_up with a q4 down
        native.expert_ffn(x, *gate_up, *matrix("q4", hidden, inter), native.SILU, out)


def test_mxfp4_without_avx512_looks_values_up_one_by_one(tmp_path):
    """Compiled for a generic CPU (no AVX-512 permute), the MXFP4 kernels decode lane by lane, to the same
    products."""
    script = """
import numpy as np
from edgerun import native
from edgerun.native import config, reference
from edgerun.store import quant
assert not config.permvar() and not config.int_dot()
qs, scales = quant.quantize(np.random.default_rng(0).standard_normal((33, 96)).astype(np.float32), "mxfp4")
for t in (1, 3):
    x = np.random.default_rng(t).standard_normal((t, 96)).astype(np.float32)
    out, want = np.empty((t, 33), np.float32), np.empty((t, 33), np.float32)
    native.matmul(x, qs, scales, out)
    reference.matmul(x, qs, scales, want)
    assert np.abs(out - want).max() <= 1e-4 * np.abs(want).max()
print(native.BACKEND)
"""
    if os.environ.get("EDGERUN_NO_JIT", "") not in ("", "0"):
        pytest.skip("EDGERUN_NO_JIT is set")
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "numba"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_mxfp4_quantizer_is_the_reference_byte_for_byte(dtype):
    rng = np.random.default_rng(5)
    w = (gaussian((37, 200), seed=6) * rng.choice([1e-4, 1.0, 300.0], size=(37, 1))).astype(dtype)
    w[0, :32] = 0  # a zero group
    w[1, 32:64] = -0.0
    w[2, 64:96] = 0.75  # a largest magnitude whose quotient by 6 is a power of two
    got, want = native.quantize(w, quant.MXFP4), quant.quantize(w.astype(np.float32), quant.MXFP4)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("heads, kv_heads, dh, rotary", [(4, 2, 16, 16), (6, 6, 8, 4), (8, 1, 64, 32)])
@pytest.mark.parametrize("window, cap, temperature, sinks", [(None, None, 1.0, False), (3, 30.0, 1.3, True),
                                                              (50, None, 1.0, True)])
def test_attend_one_matches_reference(heads, kv_heads, dh, rotary, window, cap, temperature, sinks):
    rng = np.random.default_rng(heads + dh)
    length, pos = 12, 9
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((heads, dh), (kv_heads, dh), (kv_heads, dh)))
    angles = rng.uniform(0, 6, rotary // 2).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    k_cache, v_cache = (rng.standard_normal((kv_heads, length, dh)).astype(np.float32) for _ in range(2))
    sink = rng.standard_normal(heads).astype(np.float32) if sinks else None
    scale = dh ** -0.5
    caches = k_cache.copy(), v_cache.copy()
    got = native.attend_one(q, k, v, cos, sin, *caches, pos, scale, window, cap, temperature, sink)
    want, ref_caches = np.empty_like(got), (k_cache.copy(), v_cache.copy())
    lo = 0 if window is None else max(0, pos - window + 1)
    reference.attend_one(q, k, v, cos, sin, *ref_caches, pos, lo, scale, cap or 0.0, temperature,
                         np.empty(0, np.float32) if sink is None else sink, want)
    assert np.allclose(got, want, atol=2e-5)
    for c, r, before in zip(caches, ref_caches, (k_cache, v_cache)):  # only position pos is written
        assert np.allclose(c, r, atol=1e-6)
        assert np.array_equal(np.delete(c, pos, axis=1), np.delete(before, pos, axis=1))
    # the reference itself against a plain softmax over the keys it should see
    qr, kr = reference.rotated(q, cos, sin), ref_caches[0]
    for h in range(heads):
        g = h // (heads // kv_heads)
        logits = kr[g, lo:pos + 1] @ qr[h] * scale
        logits = (cap * np.tanh(logits / cap) if cap else logits) * temperature
        e = np.exp(np.append(logits, sink[h]) if sinks else logits)
        assert np.allclose(want[h], (e[:pos + 1 - lo] / e.sum()) @ ref_caches[1][g, lo:pos + 1], atol=1e-5)


def test_attend_one_rejects_bad_arguments():
    q, kv, cache = np.zeros((4, 8), np.float32), np.zeros((3, 8), np.float32), np.zeros((3, 5, 8), np.float32)
    rot = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="shapes"):
        native.attend_one(q, kv, kv, rot, rot, cache, cache, 0, 1.0)  # 4 heads over 3 KV heads
    with pytest.raises(ValueError, match="outside"):
        native.attend_one(q[:3], kv, kv, rot, rot, cache, cache, 5, 1.0)
    with pytest.raises(ValueError, match="float32"):
        native.attend_one(q[:3].astype(np.float64), kv, kv, rot, rot, cache, cache, 0, 1.0)


def layer_experts(fmt, n, hidden, inter, biased=False):
    experts = []
    for k in range(n):
        biases = (gaussian((2 * inter,), 40 + k), gaussian((hidden,), 50 + k)) if biased else (None, None)
        experts.append((*matrix(fmt, 2 * inter, hidden, seed=10 + k), *matrix(fmt, hidden, inter, seed=20 + k),
                        *biases))
    return experts


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("hidden, inter, activation", [(64, 96, native.SILU), (100, 300, native.GELU_TANH),
                                                       (256, 640, "swiglu+biases")])
def test_routed_experts_sum_the_weighted_experts(fmt, n, hidden, inter, activation):
    biased = activation == "swiglu+biases"
    activation = native.SWIGLU_OAI if biased else activation
    experts = layer_experts(fmt, n, hidden, inter, biased)
    x, weights = gaussian((1, hidden), 3), np.abs(gaussian((n,), 4))
    out = np.full((1, hidden), np.nan, np.float32)
    native.routed_experts(x, experts, weights, activation, out)
    expected, y = np.zeros_like(out), np.empty_like(out)
    product = reference.matmul_int8 if int_dot(x, *experts[0][:2]) else reference.matmul
    for e, w in zip(experts, weights):
        reference.expert_ffn(x, *e[:4], activation, y, product=product, gate_up_bias=e[4], down_bias=e[5])
        expected += w * y
    assert_close(out, expected)


def test_routed_experts_rejects_mixed_experts():
    experts = layer_experts("q4", 2, 64, 96)
    other = layer_experts("q8", 1, 64, 96)
    with pytest.raises(ValueError, match="share"):
        native.routed_experts(gaussian((1, 64)), experts[:1] + other, np.ones(2, np.float32), native.SILU,
                              np.empty((1, 64), np.float32))
    with pytest.raises(ValueError, match="one token"):
        native.routed_experts(gaussian((2, 64)), experts, np.ones(2, np.float32), native.SILU,
                              np.empty((2, 64), np.float32))


def test_routed_experts_float_path(float_path):
    experts = layer_experts("q4", 3, 64, 96)
    x, weights = gaussian((1, 64), 3), np.abs(gaussian((3,), 4))
    out = np.full((1, 64), np.nan, np.float32)
    native.routed_experts(x, experts, weights, native.SILU, out)
    expected, y = np.zeros_like(out), np.empty_like(out)
    for e, w in zip(experts, weights):
        reference.expert_ffn(x, *e[:4], native.SILU, y)
        expected += w * y
    assert_close(out, expected)


def test_rms_norm_of_one_token():
    x, w = gaussian((300,), 1) * 3, gaussian((300,), 2)
    want = w * x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-6)
    assert np.allclose(native.rms_norm(x, w, 1e-6), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        native.rms_norm(x, w[:10], 1e-6)
