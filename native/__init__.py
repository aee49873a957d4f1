"""Kernels that compute straight on quantized weights (formats of edgerun.store.quant).

BACKEND is "numba" (JIT kernels, compiled once per machine and cached on disk) or "numpy" (the reference
kernels of edgerun.native.reference: with EDGERUN_NO_JIT=1, or when numba is unusable, which one warning
reports). Call warmup() at model load so that no kernel compiles during the first token.

    matmul(x, qs, scales, out)    out[t, o] = sum_k W[o, k] x[t, k]
    expert_ffn(x, gate_up_qs, gate_up_scales, down_qs, down_scales, activation, out[, gate_up_bias, down_bias])
    routed_experts(x, experts, weights, activation, out)   one token's experts, weighted and summed
    quantize(w, fmt, group)       -> (qs, scales), byte-identical to edgerun.store.quant.quantize
    quantize_low(w, fmt, group)   -> a low-bit copy's sections, byte-identical to edgerun.store.lowbit.quantize
    dequantize_q4(qs, scales)     -> float32 [O, Kp], equal to edgerun.store.quant.dequantize
    attend_one(q, k, v, cos, sin, k_cache, v_cache, pos, ...) -> the attention of one new token (decode)
    rms_norm(x, weight, eps)      -> weight * x / rms(x) for one token

Weights are never expanded in RAM: one token streams every weight once (GEMV); a few tokens stream them
the same way, converting each weight once per pair of tokens; more tokens dequantize a few rows at a time
into a small buffer that stays in L1 and reuse it for every token (GEMM).

Where INT_DOT is true (CPUs with AVX-512 VNNI, see config.int_dot), one token on q4 weights in groups of
32 is quantized to int8 and multiplied with integer dot products, about 1.6 times as fast: the result
then differs from the float product by that rounding of x (about 0.5% of the output's RMS);
reference.matmul_int8 computes it exactly.
"""

from __future__ import annotations

import threading

import numpy as np

from ..store import quant
from . import config, reference

SILU, GELU_TANH, GELU, SWIGLU_OAI = reference.SILU, reference.GELU_TANH, reference.GELU, reference.SWIGLU_OAI
ACTIVATIONS = (SILU, GELU_TANH, GELU, SWIGLU_OAI)

_kernels = config.load_kernels()
BACKEND: str = "numpy" if _kernels is None else "numba"
_ready = _kernels is None
INT_DOT: bool = _kernels is not None and config.int_dot()


def warmup() -> None:
    """Compile every kernel now (or load it from the disk cache); falls back to NumPy if that fails."""
    global _kernels, _ready, BACKEND, INT_DOT
    if _ready:
        return
    _ready = True  # the calls below take the JIT path
    if _kernels is not None:
        config.compile_apart("kernels", "native.warmup()")  # the first time here: the compiler's memory is not ours
    try:
        rng = np.random.default_rng(0)
        for fmt in quant.FORMATS:
            gate_up = quantize(rng.standard_normal((64, 40)).astype(np.float32), fmt)
            quantize(rng.standard_normal((64, 40)).astype(np.float16), fmt)
            down = quantize(rng.standard_normal((40, 32)).astype(np.float32), fmt)
            for n_tok in (1, 3):
                x = rng.standard_normal((n_tok, 40)).astype(np.float32)
                matmul(x, *gate_up, np.empty((n_tok, 64), np.float32))
                for activation in ACTIVATIONS:
                    expert_ffn(x, *gate_up, *down, activation, np.empty((n_tok, 40), np.float32))
                expert_ffn(x, *gate_up, *down, SWIGLU_OAI, np.empty((n_tok, 40), np.float32),
                           np.zeros(64, np.float32), np.zeros(40, np.float32))
        warmup_decode()
        _kernels.low_q2_to_q4(np.zeros(2, np.uint64), np.zeros(4, np.uint64), 1)  # for low-bit copies
        _kernels.low_q3_to_q4(np.zeros(4, np.uint32), np.zeros(2, np.uint32), np.zeros(8, np.uint32), 2)
        _kernels.low_q2_to_q4_g32(np.zeros(2, np.uint64), np.zeros(4, np.uint64))  # groups of 32
        _kernels.low_q3_to_q4_g32(np.zeros(2, np.uint64), np.zeros(2, np.uint32), np.zeros(4, np.uint64))
        gate_up = quantize(rng.standard_normal((64, 64)).astype(np.float32), quant.MXFP4)
        down = quantize(rng.standard_normal((64, 32)).astype(np.float32), quant.MXFP4)
        for n_tok in (1, 3):
            x = rng.standard_normal((n_tok, 64)).astype(np.float32)
            matmul(x, *gate_up, np.empty((n_tok, 64), np.float32))
            expert_ffn(x, *gate_up, *down, SWIGLU_OAI, np.empty((n_tok, 64), np.float32),
                       np.zeros(64, np.float32), np.zeros(64, np.float32))
        from ..runtime.policy import ForecastPolicy  # the expert cache policy's arithmetic

        policy = ForecastPolicy(2, 4, 1)
        policy.access((0, 1), False)
        policy.observe(0, [1])
        policy.victim([(1, 2)], (0, 3))
    except Exception as e:  # a numba/LLVM that cannot compile them: keep running, on NumPy
        config.fall_back(e)
        _kernels, BACKEND, INT_DOT = None, "numpy", False
        return
    config.mark_compiled("kernels")


def warmup_decode() -> None:
    """Compile (or load) the kernels of a decode step's attention, norms and router alone: what a model with float
    weights uses, which needs no other kernel."""
    global _kernels, BACKEND, INT_DOT
    if _kernels is None:
        return
    try:
        rng = np.random.default_rng(0)
        q, kv, cache = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (2, 8), (2, 4, 8)))
        rot = np.ones(2, np.float32)
        attend_one(q, kv, kv, rot, rot, cache, cache.copy(), 1, 1.0, sinks=rot[:1].repeat(4))
        rms_norm(q[0], q[1], 1e-5)
        route_one(q[0], q, 1.0, 2, True)
        route_ahead(q[0], typed_list([q, q]), np.ones((2, 8), np.float32), 1.0, 2, True)
    except Exception as e:  # as in warmup: keep running, on NumPy
        config.fall_back(e)
        _kernels, BACKEND, INT_DOT = None, "numpy", False


def set_threads(n: int) -> None:
    """Run the kernels on n threads (at most the number numba started, by default the CPU count)."""
    config.set_threads(n)


_threads_set = threading.local()  # the number each thread last set numba to (numba's setting is per thread)


def _threads() -> int:
    n = config.threads(_kernels.max_threads())
    if getattr(_threads_set, "n", None) != n:  # asking numba costs more than the small kernels of a decode step
        _threads_set.n = _kernels.use_threads(n)
    return n


def _check_matrix(qs: np.ndarray, scales: np.ndarray, in_features: int, what: str = "matrix") -> int:
    """Validate a quantized matrix for in_features inputs; returns its padded in_features Kp."""
    if qs.dtype not in (np.int8, np.uint8) or qs.ndim != 2:
        raise ValueError(f"{what}: qs must be a 2D int8 (q8) or uint8 (q4, mxfp4) array; got {qs.dtype} {qs.shape}")
    scale_dtype = np.uint8 if qs.dtype == np.uint8 and scales.dtype == np.uint8 else np.float16  # mxfp4: E8M0
    if scales.dtype != scale_dtype or scales.ndim != 2 or scales.shape[0] != qs.shape[0] or scales.shape[1] == 0:
        raise ValueError(f"{what}: scales must be float16 (uint8 for mxfp4) [{qs.shape[0]}, groups]; got "
                         f"{scales.dtype} {scales.shape}")
    kp = qs.shape[1] * (1 if qs.dtype == np.int8 else 2)
    group = kp // scales.shape[1]
    if group * scales.shape[1] != kp or group % 32 or not kp - group < in_features <= kp or (
            scale_dtype == np.uint8 and group != 32):
        raise ValueError(f"{what}: qs {qs.shape} and scales {scales.shape} do not hold {in_features} inputs "
                         f"in groups of a multiple of 32")
    if not (qs.flags.c_contiguous and scales.flags.c_contiguous):
        raise ValueError(f"{what}: qs and scales must be C-contiguous")
    return kp


def _check_out(out: np.ndarray, shape: tuple[int, int]) -> None:
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"out must be a writeable C-contiguous float32 array of shape {shape}; "
                         f"got {out.dtype} {out.shape}")


def int_dot(qs: np.ndarray, scales: np.ndarray) -> bool:
    """Whether one token's product with the matrix (qs, scales) takes the int8 path: q4 in groups of 32, on a CPU
    with int8 dot products."""
    return INT_DOT and qs.dtype == np.uint8 and scales.dtype == np.float16 and 2 * qs.shape[1] == 32 * scales.shape[1]


def _int_dot(x: np.ndarray, qs: np.ndarray, scales: np.ndarray) -> bool:
    """Whether the product of x and the matrix (qs, scales) takes the int8 path (int_dot, for one token)."""
    return x.shape[0] == 1 and int_dot(qs, scales)


def _padded(x: np.ndarray, kp: int) -> np.ndarray:
    """x as float32 C-contiguous [T, kp], zero columns added past its own (a copy only when needed)."""
    if x.shape[1] == kp:
        return np.ascontiguousarray(x, dtype=np.float32)
    xp = np.zeros((x.shape[0], kp), dtype=np.float32)
    xp[:, :x.shape[1]] = x
    return xp


def matmul(x: np.ndarray, qs: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """out[t, o] = sum_k W[o, k] x[t, k] for x float32 [T, K] and the q8/q4 matrix W [O, K] = (qs, scales).

    The format follows from qs.dtype (int8 q8, uint8 q4); out is float32 [T, O]. T = 1 runs the GEMV
    kernel, T > 1 the GEMM kernel. Inputs are not modified."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2D [tokens, in_features]; got shape {x.shape}")
    kp = _check_matrix(qs, scales, x.shape[1])
    _check_out(out, (x.shape[0], qs.shape[0]))
    if x.shape[0] == 0:
        return
    if not _ready:
        warmup()
    if _kernels is None:
        reference.matmul(np.asarray(x, dtype=np.float32), qs, scales, out)
        return
    n_threads = _threads()
    if _int_dot(x, qs, scales):
        _kernels.gemv_q4_int8(_padded(x, kp), qs, scales.view(np.uint16), _kernels.F16_TO_F32, out)
        return
    _kernels.matmul(_padded(x, kp), qs, *_kernel_scales(scales), out, n_threads)


def _kernel_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(scales as the kernels take them, the table that turns them into float32): float16 as uint16 bits through
    F16_TO_F32, MXFP4's E8M0 bytes as they are through E8M0_TO_F32."""
    if quant.is_mxfp4(scales):
        return scales, _kernels.E8M0_TO_F32
    return scales.view(np.uint16), _kernels.F16_TO_F32


def _check_expert(hidden: int, gate_up_qs: np.ndarray, gate_up_scales: np.ndarray, down_qs: np.ndarray,
                  down_scales: np.ndarray, activation: int) -> int:
    """Validate an expert of hidden size `hidden` and its activation; returns gate_up's padded in_features."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation}; expected 0 (SiLU), 1 (GELU tanh), 2 (GELU) or 3 "
                         f"(gpt-oss SwiGLU)")
    if gate_up_qs.dtype != down_qs.dtype or gate_up_scales.dtype != down_scales.dtype:
        raise ValueError(f"gate_up and down must share a format; got {gate_up_qs.dtype}/{gate_up_scales.dtype} and "
                         f"{down_qs.dtype}/{down_scales.dtype}")
    kp = _check_matrix(gate_up_qs, gate_up_scales, hidden, "gate_up")
    if gate_up_qs.shape[0] % 2 or down_qs.shape[0] != hidden:
        raise ValueError(f"gate_up {gate_up_qs.shape} and down {down_qs.shape} do not make an expert of "
                         f"hidden size {hidden}")
    _check_matrix(down_qs, down_scales, gate_up_qs.shape[0] // 2, "down")
    return kp


def expert_ffn(x: np.ndarray, gate_up_qs: np.ndarray, gate_up_scales: np.ndarray, down_qs: np.ndarray,
               down_scales: np.ndarray, activation: int, out: np.ndarray, gate_up_bias: np.ndarray | None = None,
               down_bias: np.ndarray | None = None) -> None:
    """One expert on the tokens routed to it: out = down @ (act(gate @ x) * (up @ x)), or with biases
    down @ gated(gate @ x + b, up @ x + b) + b.

    x float32 [T, H]; gate_up [2I, H] is one quantized matrix, gate rows first, then up rows; down
    [H, I] in the same format; activation 0 = SiLU, 1 = GELU (tanh approximation), 2 = GELU (exact), 3 = gpt-oss's
    clamped SwiGLU; the optional biases are float32 [2I] (gate then up) and [H]; out float32 [T, H] is
    overwritten."""
    if x.ndim != 2:
        raise ValueError(f"x must be 2D [tokens, hidden]; got shape {x.shape}")
    hidden = x.shape[1]
    kp = _check_expert(hidden, gate_up_qs, gate_up_scales, down_qs, down_scales, activation)
    _check_out(out, (x.shape[0], hidden))
    b1, b2 = _bias(gate_up_bias, gate_up_qs.shape[0], "gate_up"), _bias(down_bias, hidden, "down")
    if x.shape[0] == 0:
        return
    if not _ready:
        warmup()
    if _kernels is None:
        reference.expert_ffn(np.asarray(x, dtype=np.float32), gate_up_qs, gate_up_scales, down_qs, down_scales,
                             activation, out, gate_up_bias=b1 if b1.size else None, down_bias=b2 if b2.size else None)
        return
    n_threads = _threads()
    if _int_dot(x, gate_up_qs, gate_up_scales) and _int_dot(x, down_qs, down_scales):
        _kernels.expert_ffn_int8(_padded(x, kp), gate_up_qs, gate_up_scales.view(np.uint16), down_qs,
                                 down_scales.view(np.uint16), b1, b2, activation, _kernels.F16_TO_F32, out)
        return
    (gate_up_k, lut), (down_k, _) = _kernel_scales(gate_up_scales), _kernel_scales(down_scales)
    _kernels.expert_ffn(_padded(x, kp), gate_up_qs, gate_up_k, down_qs, down_k, b1, b2, activation, lut, out,
                        n_threads)


def routed_experts(x: np.ndarray, experts: list[tuple], weights: np.ndarray, activation: int, out: np.ndarray) -> None:
    """out = sum_k weights[k] * expert_k(x) for one token x float32 [1, H] and experts of one layer, each a tuple
    (gate_up_qs, gate_up_scales, down_qs, down_scales, gate_up_bias, down_bias) as expert_ffn takes them (the biases
    may be None), all of one shape and format; weights float32 [K]: one kernel call."""
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"routed_experts takes one token, x [1, hidden]; got shape {x.shape}")
    if weights.shape != (len(experts),):
        raise ValueError(f"{len(experts)} experts but weights of shape {weights.shape}")
    _check_out(out, x.shape)
    out[:] = 0
    if not experts:
        return
    first = experts[0]
    if any(len(e) != 6 or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(e[:4], first[:4]))
           for e in experts):
        raise ValueError("routed_experts: the experts of a layer must share their shapes and format")
    if not _ready:
        warmup()
    gate_up_qs, gate_up_scales, down_qs, down_scales = first[:4]
    if _kernels is None:
        y = np.empty_like(out)
        for e, w in zip(experts, weights):
            expert_ffn(x, *e[:4], activation, y, *e[4:])
            out += w * y
        return
    hidden = x.shape[1]
    kp = _check_expert(hidden, gate_up_qs, gate_up_scales, down_qs, down_scales, activation)
    lut = _kernel_scales(gate_up_scales)[1]
    args = (_padded(x, kp), tuple(e[0] for e in experts), tuple(_kernel_scales(e[1])[0] for e in experts),
            tuple(e[2] for e in experts), tuple(_kernel_scales(e[3])[0] for e in experts),
            tuple(_bias(e[4], gate_up_qs.shape[0], "gate_up") for e in experts),
            tuple(_bias(e[5], hidden, "down") for e in experts), np.ascontiguousarray(weights, np.float32),
            activation, lut, out)
    n_threads = _threads()
    if _int_dot(x, gate_up_qs, gate_up_scales) and _int_dot(x, down_qs, down_scales):
        _kernels.routed_experts_int8(*args)
    else:
        _kernels.routed_experts(*args, n_threads)


def warmup_routed(top_k: int, fmt: str) -> None:
    """Compile routed_experts (one token's experts of a layer in one call, specialised for their number) for top_k
    experts in fmt (q8, q4, mxfp4), or load it from the disk cache: at load, not inside the first token (in a child
    process first, the first time on this machine: see config.compile_apart)."""
    if _kernels is None:
        return
    what = f"routed-{fmt}-{top_k}"
    config.compile_apart(what, f"native.warmup_routed({top_k}, {fmt!r})")
    rng = np.random.default_rng(0)
    d = 64
    gate_up = quantize(rng.standard_normal((2 * d, d)).astype(np.float32), fmt)
    down = quantize(rng.standard_normal((d, d)).astype(np.float32), fmt)
    routed_experts(rng.standard_normal((1, d)).astype(np.float32), [(*gate_up, *down, None, None)] * top_k,
                   np.ones(top_k, np.float32), SILU, np.empty((1, d), np.float32))
    config.mark_compiled(what)


_NO_BIAS = np.empty(0, np.float32)


def _bias(b: np.ndarray | None, size: int, what: str) -> np.ndarray:
    """A bias as the kernels take it: float32 [size], or empty for none."""
    if b is None:
        return _NO_BIAS
    if b.dtype != np.float32 or b.shape != (size,):
        raise ValueError(f"{what} bias must be float32 [{size}]; got {b.dtype} {b.shape}")
    return b


def quantize(w: np.ndarray, fmt: str, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(qs, scales) of the float matrix w [O, K] in fmt, in parallel; byte-identical to
    edgerun.store.quant.quantize (float16 input is read as is, other float types as float32)."""
    if w.ndim != 2:
        raise ValueError(f"quantize needs a 2D matrix; got shape {w.shape}")
    qs_shape, scales_shape = quant.packed_shapes(fmt, *w.shape, group=group)
    if not _ready:
        warmup()
    if _kernels is None:
        return reference.quantize(w, fmt, group)
    _threads()
    if w.dtype == np.float16:
        w = np.ascontiguousarray(w).view(np.uint16)
    else:
        w = np.ascontiguousarray(w, dtype=np.float32)
    lut = _kernels.F16_TO_F32
    if fmt == quant.MXFP4:
        qs, scales = np.empty(qs_shape, np.uint8), np.empty(scales_shape, np.uint8)
        _kernels.quantize_mxfp4(w, lut, quant.E2M1_MIDPOINTS, qs, scales)
        return qs, scales
    raw = np.empty(scales_shape, dtype=np.float32)
    _kernels.group_scales(w, lut, group, fmt == "q4", raw)
    scales = quant.round_scales(raw)
    qs = np.empty(qs_shape, dtype=np.int8 if fmt == "q8" else np.uint8)
    (_kernels.quantize_q8 if fmt == "q8" else _kernels.quantize_q4)(w, scales.view(np.uint16), lut, qs)
    return qs, scales


def quantize_low(w: np.ndarray, fmt: str, group: int = 32) -> list[np.ndarray]:
    """The sections of the float matrix w [O, K] as a q2/q3 low-bit copy, in parallel; byte-identical to
    edgerun.store.lowbit.quantize."""
    from ..store import lowbit

    if not _ready:
        warmup()
    if _kernels is None:
        return lowbit.quantize(w, fmt, group)
    _threads()
    o, k = w.shape
    kp = quant.padded_in_features(k, group)
    w = wp = np.ascontiguousarray(w, dtype=np.float32)
    if kp != k:  # the candidate scales are taken over whole groups, zeros past the matrix
        wp = np.zeros((o, kp), dtype=np.float32)
        wp[:, :k] = w
    candidates = lowbit.candidate_scales(wp.reshape(o, kp // group, group), fmt)
    codes = np.empty((o, kp), dtype=np.uint8)
    choice = np.empty((o, kp // group), dtype=np.int64)
    qmin, qmax = lowbit.LEVELS[fmt]
    _kernels.low_codes(w, candidates.view(np.uint16), _kernels.F16_TO_F32, qmin, qmax, codes, choice)
    scales = np.take_along_axis(candidates, choice[None], axis=0)[0]
    return lowbit.pack_codes(codes, fmt, group) + [scales]


def dequantize_q4(qs: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float32 matrix [O, Kp] (padded columns included) a q4 matrix stands for, in parallel; equal to
    edgerun.store.quant.dequantize."""
    if not _ready:
        warmup()
    if _kernels is None or not (qs.flags.c_contiguous and scales.flags.c_contiguous):
        return quant.dequantize(qs, scales, qs.shape[1] * 2)
    _threads()
    out = np.empty((qs.shape[0], qs.shape[1] * 2), dtype=np.float32)
    _kernels.dequantize_q4(qs, scales.view(np.uint16), _kernels.F16_TO_F32, out)
    return out


_NO_SINKS = np.empty(0, np.float32)


def route_one(x: np.ndarray, router: np.ndarray, cap: float | None, top_k: int,
              renormalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Softmax top-k routing of one token x [D] by router [E, D], float32 C-contiguous: (idx int64 [K], weights
    float32 [K], probs float32 [E]), with logits soft-capped by cap when given; the weights renormalised to sum to 1
    when asked. None without the numba kernels (the caller computes it with torch). The one-token router of
    decode steps, so that decode_layers routes exactly as the parts do."""
    if _kernels is None:
        return None
    if x.dtype != np.float32 or router.dtype != np.float32 or router.ndim != 2 or x.shape != router.shape[1:] or (
            not router.flags.c_contiguous) or not 0 < top_k <= router.shape[0]:
        raise ValueError(f"route_one takes float32 x [D] and a C-contiguous router [E, D] with 0 < top_k <= E; got "
                         f"{x.dtype} {x.shape}, {router.dtype} {router.shape}, top_k {top_k}")
    probs, idx, weights = np.empty(router.shape[0], np.float32), np.empty(top_k, np.int64), np.empty(top_k, np.float32)
    _kernels.route_one(np.ascontiguousarray(x), router, np.float32(cap or 0.0), top_k, bool(renormalize), probs, idx,
                       weights)
    return idx, weights, probs


def low_to_q4(sections: list[np.ndarray], fmt: str, quarter: int, qs: np.ndarray) -> bool:
    """The q4 bytes qs of a low-bit copy's bit sections (store/lowbit.to_q4, whose word operations these are; G/4 =
    quarter bytes a group); False, nothing done, without the numba kernels or with arrays that are not
    C-contiguous."""
    if _kernels is None or not all(a.flags.c_contiguous for a in (*sections[:-1], qs)):
        return False
    if quarter == 8:  # groups of 32: the flat loops
        if fmt == "q2":
            _kernels.low_q2_to_q4_g32(sections[0].reshape(-1).view(np.uint64), qs.reshape(-1).view(np.uint64))
        else:
            _kernels.low_q3_to_q4_g32(sections[0].reshape(-1).view(np.uint64), sections[1].reshape(-1).view(np.uint32),
                                      qs.reshape(-1).view(np.uint64))
    elif fmt == "q2":
        _kernels.low_q2_to_q4(sections[0].reshape(-1).view(np.uint64), qs.reshape(-1).view(np.uint64), quarter // 8)
    else:
        _kernels.low_q3_to_q4(sections[0].reshape(-1).view(np.uint32), sections[1].reshape(-1).view(np.uint32),
                              qs.reshape(-1).view(np.uint32), quarter // 8)
    return True


def policy(step: str, *args) -> bool:
    """The cache policy's arithmetic, in place: kernels.policy_observe (step "observe": ForecastPolicy.observe's
    counts) or kernels.policy_next_use ("next_use": its expected_next_use); False, nothing done, without the numba
    kernels."""
    if _kernels is None:
        return False
    getattr(_kernels, "policy_" + step)(*args)
    return True


def route_ahead(x: np.ndarray, routers, scales: np.ndarray, cap: float | None, top_k: int,
                renormalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """route_one of x [D] * scales[j] by routers[j] for each of the n routers (a typed list of float32 C-contiguous
    [E, D], scales float32 [n, D]): (idx int64 [n, K], weights float32 [n, K], probs float32 [n, E]), as n route_one
    calls on the products would give them; None without the numba kernels. A decode step's read-ahead of n later
    layers in one call."""
    if _kernels is None:
        return None
    n, experts = len(routers), routers[0].shape[0]
    if x.dtype != np.float32 or scales.dtype != np.float32 or scales.shape != (n, x.shape[0]) or not (
            0 < top_k <= experts):
        raise ValueError(f"route_ahead takes float32 x [D] and scales [{n}, D] with 0 < top_k <= {experts}; got "
                         f"{x.dtype} {x.shape}, {scales.dtype} {scales.shape}, top_k {top_k}")
    probs, idx, weights = np.empty((n, experts), np.float32), np.empty((n, top_k), np.int64), np.empty(
        (n, top_k), np.float32)
    _kernels.route_ahead(np.ascontiguousarray(x), routers, scales, np.float32(cap or 0.0), top_k,
                         bool(renormalize), probs, idx, weights)
    return idx, weights, probs


def fusable() -> bool:
    """Whether decode_layers can run (the numba kernels, not the NumPy fallback)."""
    return _kernels is not None


def typed_list(items: list) -> object:
    """A numba typed list of items, all of one type (see kernels.list_of)."""
    out = _kernels.list_of(items[0], len(items))
    for i, item in enumerate(items[1:], 1):
        _kernels.list_set(out, i, item)
    return out


def typed_set(items, i: int, item) -> None:
    _kernels.list_set(items, i, item)


def warmup_layers(dense_dtype, expert_dtype) -> None:
    """Compile decode_layers for dense matrices and experts of these qs dtypes (uint8: q4, int8: q8), or load it
    from the disk cache: at load, not inside the first token. A tiny model of one layer runs through it (in a child
    process first, the first time on this machine: see config.compile_apart)."""
    dense, experts = np.dtype(dense_dtype).name, np.dtype(expert_dtype).name
    what = f"layers-{dense}-{experts}"
    config.compile_apart(what, f"native.warmup_layers(np.{dense}, np.{experts})")
    rng = np.random.default_rng(0)
    d, dh, heads, n_exp = 64, 16, 2, 2
    typed = typed_list  # the lists are made as the decoder's are

    def matrix(rows: int, cols: int, dtype) -> tuple[np.ndarray, np.ndarray]:
        qs, scales = quantize(rng.standard_normal((rows, cols)).astype(np.float32), "q4" if dtype == np.uint8 else "q8")
        return qs, scales.view(np.uint16)

    qkv, o = matrix(3 * heads * dh, d, dense_dtype), matrix(d, heads * dh, dense_dtype)
    gu, dn = matrix(2 * d, d, expert_dtype), matrix(d, d, expert_dtype)
    cache = np.zeros((heads, 4, dh), np.float32)
    router = rng.standard_normal((n_exp, d)).astype(np.float32)
    for item in (_NO_SINKS, router, cache, qkv[0], qkv[1]):  # the lists' methods, for every type they hold
        typed_list([item, item])
    for int8 in (False, True) if INT_DOT else (False,):
        decode_layers(rng.standard_normal((1, d)).astype(np.float32), np.ones((2, d), np.float32), np.float32(1e-5),
                      typed([qkv[0]]), typed([qkv[1]]), typed([o[0]]), typed([o[1]]), int8 and dense_dtype == np.uint8,
                      heads, heads, typed([cache]), typed([cache.copy()]), 0, np.zeros(1, np.int64), np.float32(0.25),
                      np.float32(0.0), np.float32(1.0), typed([_NO_SINKS]), np.ones(dh // 2, np.float32),
                      np.zeros(dh // 2, np.float32), typed([router]),
                      np.float32(0.0), 1, True, typed([gu[0]] * n_exp), typed([gu[1]] * n_exp), typed([dn[0]] * n_exp),
                      typed([dn[1]] * n_exp), int8 and expert_dtype == np.uint8, SILU, 0, False,
                      np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32), False, np.empty((1, d), np.float32))
    config.mark_compiled(what)


def decode_layers(h: np.ndarray, norms: np.ndarray, eps, qkv_qs, qkv_scales, o_qs, o_scales, dense_int8: bool,
                  heads: int, kv_heads: int, k_caches, v_caches, pos: int, windows: np.ndarray, scale, cap,
                  temperature, sinks, cos: np.ndarray, sin: np.ndarray, routers, router_cap, top_k: int,
                  renormalize: bool, gu_qs, gu_scales, d_qs, d_scales, expert_int8: bool, activation: int, first: int,
                  resume_moe: bool, idx: np.ndarray, weights: np.ndarray, stop_moe: bool, x: np.ndarray) -> int:
    """Layers first.. of one decoded token in one call (kernels.decode_layers, which says what each argument is;
    the lists are numba typed lists, the scales float16 bits as uint16). h [1, D] float32 is updated in place.
    Returns -1 when done, or the layer whose chosen experts are not mapped yet, or with stop_moe the layer whose
    FFN input is in x [1, D]. The caller (runtime/fused.py) checks the shapes once, when it builds the lists."""
    n_threads = _threads()
    return _kernels.decode_layers(h, norms, eps, qkv_qs, qkv_scales, o_qs, o_scales, dense_int8, heads, kv_heads,
                                  k_caches, v_caches, pos, windows, scale, cap, temperature, sinks, cos, sin, routers,
                                  router_cap, top_k, renormalize, gu_qs, gu_scales, d_qs, d_scales, expert_int8,
                                  activation, _kernels.F16_TO_F32, n_threads, first, resume_moe, idx, weights,
                                  stop_moe, x)


def attend_one(q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray,
               v_cache: np.ndarray, pos: int, scale: float, window: int | None = None, cap: float | None = None,
               temperature: float = 1.0, sinks: np.ndarray | None = None) -> np.ndarray:
    """The attention of one new token at position pos, all float32: stores its key k [KV, Dh] (rotated) and value v
    at pos of the caches [KV, C, Dh], and returns [H, Dh], each head of q [H, Dh] (rotated) attending to the keys
    of its KV head at pos - window + 1 .. pos (0 .. pos without a window). cos and sin [R / 2] rotate the first R
    values of each head as two halves; the logits are scale * q.k, then cap * tanh(logit / cap) with a cap, then
    times temperature; a head's sink logit (sinks [H]) joins its softmax and attends nowhere."""
    n_heads, dh = q.shape
    n_kv, length = k.shape[0], k_cache.shape[1]
    arrays = (q, k, v, cos, sin, k_cache, v_cache) + (() if sinks is None else (sinks,))
    if any(a.dtype != np.float32 or not a.flags.c_contiguous for a in arrays):
        raise ValueError("attend_one takes C-contiguous float32 arrays")
    if (n_kv == 0 or n_heads % n_kv or k.shape != (n_kv, dh) or v.shape != k.shape
            or k_cache.shape != (n_kv, length, dh) or v_cache.shape != k_cache.shape or cos.shape != sin.shape
            or cos.ndim != 1 or 2 * cos.shape[0] > dh or (sinks is not None and sinks.shape != (n_heads,))):
        raise ValueError(f"attend_one: shapes do not match: q {q.shape}, k {k.shape}, v {v.shape}, caches "
                         f"{k_cache.shape}, cos {cos.shape}")
    if not 0 <= pos < length:
        raise ValueError(f"position {pos} is outside the cache of {length}")
    lo = 0 if window is None else max(0, pos - window + 1)
    out = np.empty((n_heads, dh), np.float32)
    args = (q, k, v, cos, sin, k_cache, v_cache, pos, lo, np.float32(scale), np.float32(cap or 0.0),
            np.float32(temperature), _NO_SINKS if sinks is None else sinks, out)
    if _kernels is None:  # (no warmup(): a float model needs this kernel alone, see warmup_decode)
        reference.attend_one(*args)
    else:
        _threads()
        _kernels.attend_one(*args)
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """weight * x / sqrt(mean(x^2) + eps) for one token's float32 x [D] and weight [D]."""
    if x.dtype != np.float32 or weight.dtype != np.float32 or x.ndim != 1 or weight.shape != x.shape:
        raise ValueError(f"rms_norm takes float32 x and weight of one shape [D]; got {x.dtype} {x.shape} and "
                         f"{weight.dtype} {weight.shape}")
    if _kernels is None:
        return (weight * (x / np.sqrt(np.mean(np.square(x)) + np.float32(eps)))).astype(np.float32)
    out = np.empty_like(x)
    _kernels.rms_norm(x, weight, np.float32(eps), out)
    return out
