"""The GPU tier: expert slots on a torch device in front of the RAM tier, misses computed where they cost least.

CI has no GPU: the tier takes a torch device, and these tests drive it with the CPU standing in for one (no pinned
memory, no streams: the same code otherwise). Tests that need CUDA are marked and skip without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from edgerun.native import reference
from hf_models import build, save

import edgerun
from edgerun import native
from edgerun.cli import main
from edgerun.errors import EdgerunError
from edgerun.hw.plan import predict
from edgerun.hw.profile import load_profile
from edgerun.runtime import placement
from edgerun.runtime.device import DeviceMatrix, ExpertKernel
from edgerun.runtime.offload import OffloadedExperts
from edgerun.runtime.quantized import QuantizedExperts
from edgerun.runtime.tier import DeviceTier, MissCosts
from edgerun.store import quant
from edgerun.store.convert import convert
from edgerun.store.layout import ExpertLayout
from edgerun.store.store import ExpertStore
from edgerun.synthetic import mixtral_config, write_random_mixtral

PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88, 9, 101, 56, 23]
NEW = 12
CONTEXT = 64
# a Mixtral expert of 4096 x 14336 in q4 on the laptop profile's figures (profiles/laptop-rtx4060-16gb.json)
MIXTRAL_Q4 = MissCosts(chunk_bytes=3 * 4096 * 14336 * 9 // 16, flops_per_token=2 * 3 * 4096 * 14336, h2d=12e9,
                       cpu_gemv=51e9, cpu_gemm=480e9, gpu_gemv=32e9, gpu_gemm=15000e9)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """q4 and q8 stores of a tiny Mixtral (4 MoE layers x 8 experts), a q4 Qwen2-MoE with a dense layer and a
    shared expert."""
    base = tmp_path_factory.mktemp("gpu-tier")
    mixtral = write_random_mixtral(base / "mixtral-hf", mixtral_config(64, 4, 8, 96, heads=4, kv_heads=2))
    qwen = save(build("qwen2_moe_step", num_hidden_layers=4, num_experts=8, layer_types=["full_attention"] * 4),
                base / "qwen2_moe_step-hf")
    out = {}
    for name, src, fmt in (("mixtral-q4", mixtral, "q4"), ("mixtral-q8", mixtral, "q8"), ("qwen-q4", qwen, "q4")):
        convert(src, base / name, quant=fmt, progress=False)
        out[name] = base / name
    return out


@pytest.fixture
def exact(monkeypatch):
    """The CPU kernels without their int8 shortcut for one q4 token (which has its own bound, tested with the
    kernels): the device computes in float32 here, so both sides then agree to float rounding."""
    monkeypatch.setattr(native, "INT_DOT", False)


def reference_run(store) -> tuple[list[int], np.ndarray]:
    """Tokens and logits on the CPU alone, in float32."""
    model = edgerun.load(store, context_length=CONTEXT, gpu=0)
    return model.generate_ids(PROMPT, NEW, temperature=0, ignore_eos=True), model.logits(PROMPT)


def tier(model: edgerun.Model, slots: int, misses: str = "copy", ram_slots: int | None = None,
         costs: MissCosts | None = None, **kwargs) -> DeviceTier:
    """Put a CPU-device tier of `slots` slots in front of the model's experts (all in RAM, or `ram_slots` of them
    streaming from the store)."""
    store, act = ExpertStore(model.path), model.spec.activation
    host = OffloadedExperts(store, act, ram_slots) if ram_slots else QuantizedExperts(store, act)
    experts = DeviceTier(host, store.expert_layout, act, "cpu", slots, costs, misses=misses, **kwargs)
    model.use_experts(experts).close()
    return experts


def assert_close(got: np.ndarray, want: np.ndarray, bound: float) -> None:
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < bound, f"relative error {err:.2e} above {bound:.0e}"


# -- outputs do not depend on placement ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral-q4", "mixtral-q8", "qwen-q4"])
def test_everything_on_the_device_gives_the_cpu_tokens_and_logits(stores, name, exact):
    want_tokens, want_logits = reference_run(stores[name])
    model = edgerun.load(stores[name], gpu="256MB", device="cpu", context_length=CONTEXT, misses="copy")
    plan = model.stats()["memory_plan"]["gpu"]
    assert plan["dense"] and plan["slots"] == model.stats()["memory_plan"]["total_experts"]
    assert model.decoder.w["embed"].__class__ is DeviceMatrix  # the dense weights live on the device
    assert model.generate_ids(PROMPT, NEW, temperature=0, ignore_eos=True) == want_tokens
    stats = model.stats()
    assert stats["gpu_expert_share"] == 1 and stats["cpu_expert_share"] == 0
    assert stats["tier_bytes"]["gpu"] == plan["dense_bytes"] + plan["kv_cache_bytes"] + plan["expert_cache_bytes"]
    assert_close(model.logits(PROMPT), want_logits, 1e-5)


@pytest.mark.parametrize("name", ["mixtral-q4", "qwen-q4"])
@pytest.mark.parametrize("misses", ["copy", "cpu", "auto"])
@pytest.mark.parametrize("ram_slots", [None, 4])
def test_a_tight_gpu_budget_gives_the_cpu_tokens_and_logits(stores, name, misses, ram_slots, exact):
    want_tokens, want_logits = reference_run(stores[name])
    model = edgerun.load(stores[name], context_length=CONTEXT)
    experts = tier(model, 3, misses, ram_slots, costs=MIXTRAL_Q4)
    assert model.generate_ids(PROMPT, NEW, temperature=0, ignore_eos=True) == want_tokens
    stats = model.stats()
    assert stats["gpu_expert_slots"] == 3 < stats["experts_total"]
    assert stats["gpu_expert_share"] + stats["cpu_expert_share"] == pytest.approx(1)
    if misses == "copy":  # as far as the slots go: the experts of a layer that find none run on the CPU
        assert stats["gpu_copies"]["demand"] > 0 and stats["h2d_bytes"] > 0
    elif misses == "cpu":
        assert stats["gpu_copies"]["demand"] == 0 and stats["cpu_expert_share"] > 0
    if ram_slots:
        assert stats["offload"] and stats["bytes_read"] > 0 and stats["expert_slots"] == 4
    assert_close(model.logits(PROMPT), want_logits, 1e-5)
    experts.close()


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_reduced_precision_on_the_device_stays_within_its_bound(stores, dtype, bound, exact):
    """float16 (CUDA's and MPS's default) and bfloat16 round the dequantized weights and the activations."""
    _, want_logits = reference_run(stores["mixtral-q8"])
    model = edgerun.load(stores["mixtral-q8"], context_length=CONTEXT)
    tier(model, 32, "copy", compute=dtype)
    got = model.logits(PROMPT)
    assert_close(got, want_logits, bound)
    assert (got.argmax(-1) == want_logits.argmax(-1)).mean() >= 0.9


# -- where misses run ------------------------------------------------------------------------------------------
def test_one_token_runs_on_the_cpu_and_a_prefill_copies():
    """Worked by hand for a Mixtral q4 expert (99 MB) on the laptop's figures: over PCIe it takes 8.3 ms, then
    3.1 ms on the GPU; the CPU reads it in 1.9 ms. At 512 tokens the CPU's GEMM needs 376 ms, the copy and the GPU
    20 ms."""
    c = MIXTRAL_Q4
    assert c.cpu(1) == pytest.approx(c.chunk_bytes / 51e9) and c.copy(1) == pytest.approx(
        c.chunk_bytes / 12e9 + c.chunk_bytes / 32e9)
    assert not c.copy_wins(1) and c.copy_wins(512)
    assert c.cpu(512) == pytest.approx(512 * c.flops_per_token / 480e9)
    crossover = next(n for n in range(1, 512) if c.copy_wins(n))
    assert crossover == 16  # where the CPU's GEMM time (0.73 ms a token) passes a copy's 11.4 ms


def test_the_tier_follows_its_costs(stores, exact):
    """Costs under which a copy wins from 2 tokens on: prefill copies, decode computes its misses on the CPU."""
    layout = ExpertStore(stores["mixtral-q4"]).expert_layout
    # a copy takes 1.5 s, the CPU 1 s a token
    costs = MissCosts(layout.nbytes, 1.0, h2d=layout.nbytes / 1.5, cpu_gemv=1e30, cpu_gemm=1.0, gpu_gemv=1e30,
                      gpu_gemm=1e30)
    assert not costs.copy_wins(1) and costs.copy_wins(2)
    want_tokens, _ = reference_run(stores["mixtral-q4"])
    model = edgerun.load(stores["mixtral-q4"], context_length=CONTEXT)
    experts = tier(model, 2, "auto", costs=costs, prefetch=False)
    assert model.generate_ids(PROMPT, NEW, temperature=0, ignore_eos=True) == want_tokens
    stats = model.stats()
    assert stats["gpu_copies"]["demand"] > 0  # prefill's experts, each with several tokens, were copied over
    assert stats["decode_cpu_expert_share"] > 0.5  # two slots hold few of a decode step's experts
    assert experts.calls["gpu"] > experts.decode_calls["gpu"]


def test_the_next_layers_experts_are_copied_ahead(stores, exact):
    model = edgerun.load(stores["mixtral-q4"], context_length=CONTEXT)
    tier(model, 16, "cpu")
    model.generate_ids(PROMPT, NEW, temperature=0, ignore_eos=True)
    stats = model.stats()
    assert stats["gpu_copies"]["prefetch"] > 0 and stats["gpu_prefetch_hit_rate"] > 0
    assert 0 < stats["gpu_prefetch_precision"] <= 1
    assert stats["gpu_hit_rate"] + stats["gpu_prefetch_hit_rate"] > 0.3


@pytest.mark.parametrize("misses", ["copy", "cpu"])
def test_light_misses_behind_the_tier_are_replaced_by_what_either_tier_holds(stores, misses, exact):
    """substitute_below applies behind a device tier: a light expert that neither the device nor RAM holds is
    replaced by the most probable expert either holds, and is never read; skip_below leaves the rest out."""
    model = edgerun.load(stores["mixtral-q4"], context_length=CONTEXT)
    ids = model.generate_ids(PROMPT, NEW, temperature=0, ignore_eos=True)
    want = model.logits(PROMPT + ids)
    store, act = ExpertStore(model.path), model.spec.activation
    host = OffloadedExperts(store, act, 4, prefetch=False, substitute_below=0.999)  # every miss but a lone expert's
    experts = DeviceTier(host, store.expert_layout, act, "cpu", 3, None, misses=misses)
    model.use_experts(experts).close()
    real, seen = host._light_misses, {"substituted": 0, "from_the_device": 0, "reads": 0}

    def checked(layer, x, chosen, weights, probs=None):
        pos = host.pos[layer]
        in_ram = {e for e in range(8) if host._complete((pos, e))}
        on_device = {e for e in range(8) if experts.cache.contains((pos, e))}
        got_idx, got_w = real(layer, x, chosen, weights, probs)
        router = model.decoder.lookahead(layer, layer, x).probs[0]
        for k, (e, sub) in enumerate(zip(chosen, got_idx)):
            held = in_ram | on_device
            free = [c for c in held if c not in chosen and c not in got_idx[:k]]
            if e in held or host.cache.contains((pos, e)) or not free:
                assert sub == e  # held (or being read), or nothing to stand in: as routed
                seen["reads"] += not host.cache.contains((pos, e)) and e not in on_device
                continue
            assert sub == max(free, key=lambda c: float(router[c]))  # the most probable expert either tier holds
            seen["substituted"] += 1
            seen["from_the_device"] += sub not in in_ram
        return got_idx, got_w
    host._light_misses = checked
    got = model.logits(PROMPT + ids, decode=True)
    stats = model.stats()
    assert stats["substituted_experts"] == seen["substituted"] > 0 and seen["from_the_device"] > 0
    assert stats["substituted_rate"] == pytest.approx(seen["substituted"] / experts.accesses)  # of every decoded one
    assert stats["decode_bytes_read"] == seen["reads"] * store.chunk_bytes  # a replaced expert is never read
    assert np.allclose(got[0], want[0], atol=1e-4) and not np.allclose(got, want, atol=1e-3)
    experts.close()
    # with skip_below as well, the misses below it are left out and those from it up replaced, behind the tier too
    host = OffloadedExperts(store, act, 4, prefetch=False, substitute_below=0.999, skip_below=0.3)
    model.use_experts(DeviceTier(host, store.expert_layout, act, "cpu", 3, None, misses=misses)).close()
    model.logits(PROMPT + ids, decode=True)
    stats = model.stats()
    assert stats["substituted_experts"] > 0 and stats["skipped_experts"] > 0
    assert 0 < stats["skipped_rate"] < 1 and 0 < stats["substituted_rate"] < 1
    model.experts.close()


def test_low_bit_copies_are_not_read_behind_the_tier_and_a_run_says_so(stores, tmp_path, monkeypatch, capsys):
    import shutil

    from test_offload import budget_for

    store = shutil.copytree(stores["mixtral-q4"], tmp_path / "with-copies")
    assert main(["convert", str(store), "--low-bits", "q2"]) == 0
    budget = budget_for(store, 6, monkeypatch)
    model = edgerun.load(store, context_length=CONTEXT, ram=budget, gpu="1MB", device="cpu", low_below=0.5,
                         low_when_late=True, substitute_below=0.3)
    stats = model.stats()
    assert stats["offload"] and stats["gpu_expert_slots"] > 0  # both tiers
    # the device would keep a copy's values for every later token: behind it the RAM tier reads chunks only
    assert stats["low_below"] == 0 and not stats["low_when_late"] and stats["substitute_below"] == 0.3
    why = "low-bit copies are not read behind a GPU tier"
    assert stats["runtime_settings"]["approximate_inactive"] == {"low_below": why, "low_when_late": why}
    capsys.readouterr()
    assert main(["run", str(store), "--ctx", str(CONTEXT), "--ram", str(budget), "--gpu", "1MB", "--device", "cpu",
                 "--low-below", "0.5", "--substitute-below", "0.3", "-p", "12 7 3", "-n", "2", "--temp", "0"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == [f"edgerun: note: {why}, so --low-below changes nothing"]


# -- the kernels -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_the_device_expert_kernel_matches_the_reference(fmt):
    torch.manual_seed(0)
    layout = ExpertLayout(fmt, 96, 80)
    chunks = [layout.pack(torch.randn(160, 96), torch.randn(96, 80)) for _ in range(3)]
    pool = torch.from_numpy(np.stack(chunks))
    x = torch.randn(5, 96)
    groups = [torch.tensor([0, 2, 4]), torch.tensor([1]), torch.tensor([0, 1, 2, 3, 4])]
    slots = [2, 0, 1]
    got = ExpertKernel(layout, "silu", torch.device("cpu"), torch.float32, batch=2)(pool, slots, x, groups)
    want = []
    for slot, g in zip(slots, groups):
        (gu_qs, gu_s), (d_qs, d_s) = layout.views(chunks[slot])
        out = np.empty((len(g), 96), dtype=np.float32)
        reference.expert_ffn(x[g].numpy(), gu_qs, gu_s, d_qs, d_s, reference.SILU, out)
        want.append(out)
    assert_close(got.numpy(), np.concatenate(want), 1e-5)


@pytest.mark.parametrize("fmt", ["q4", "q8"])
def test_a_dense_matrix_on_the_device_computes_block_by_block(fmt):
    w = torch.randn(300, 70)
    qs, scales = quant.quantize(w.numpy(), fmt)
    m = DeviceMatrix.from_arrays(qs, scales, 70, torch.device("cpu"), torch.float32)
    m.block = 64  # five blocks, the last one short
    x, bias = torch.randn(4, 70), torch.randn(300)
    dense = quant.dequantize(qs, scales, 70)
    assert_close(m.linear(x, bias).numpy(), x.numpy() @ dense.T + bias.numpy(), 1e-5)
    assert np.array_equal(m.rows(torch.tensor([3, 299])).numpy(), dense[[3, 299]])


# -- one placement path ----------------------------------------------------------------------------------------
def test_plan_predicts_the_placement_load_makes(stores, monkeypatch):
    monkeypatch.setattr(edgerun.api, "current_rss", lambda: 340 << 20)  # the baseline `edgerun plan` assumes
    store = ExpertStore(stores["mixtral-q4"])
    model = edgerun.load(store.path, context_length=CONTEXT, gpu="256MB", device="cpu", ram="2GB")
    loaded = model.stats()["memory_plan"]
    profile = load_profile(placement.__file__.rsplit("/edgerun/", 1)[0] + "/profiles/laptop-rtx4060-16gb.json")
    profile["gpu"]["device"] = "cpu"
    predicted = predict(store.config, profile, expert_format="q4", dense_format=store.quant["dense"],
                        ram=2_000_000_000, gpu=256_000_000, ctx=CONTEXT)
    assert predicted.memory_plan["gpu"] == loaded["gpu"] and predicted.memory_plan["slots"] == loaded["slots"]
    assert predicted.gpu_expert_slots == loaded["gpu"]["slots"] > 0
    assert loaded["gpu"]["dense"] and loaded["resident_bytes"] == loaded["kv_cache_bytes"] == 0  # not in RAM


# -- the command line and errors -------------------------------------------------------------------------------
def test_bench_reports_the_tiers(stores, capsys):
    assert main(["bench", str(stores["mixtral-q4"]), "--gpu", "256MB", "--device", "cpu", "--misses", "copy",
                 "--tokens", "6", "--prompt-tokens", "8", "--repeats", "1", "--no-kernels", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["device"] == "cpu" and d["misses"] == "copy" and d["gpu_expert_slots"] == d["experts_total"] == 32
    assert d["gpu_plan"]["dense"] and d["gpu_expert_share"] == 1 and d["gpu_hit_rate"] > 0.5  # warmed up
    assert d["decode_tokens_per_s"] > 0 and set(d["tier_bytes"]) == {"gpu", "ram", "disk"}
    assert main(["bench", str(stores["mixtral-q4"]), "--gpu", "256MB", "--device", "cpu", "--tokens", "6",
                 "--prompt-tokens", "8", "--repeats", "1", "--no-kernels"]) == 0
    out = capsys.readouterr().out
    assert "gpu        cpu:" in out and "expert calls" in out and "host-to-device per token" in out


def test_run_reports_the_gpu_share(stores, capsys):
    assert main(["run", str(stores["mixtral-q4"]), "--gpu", "256MB", "--device", "cpu", "-p", "12 7 3", "-n", "4",
                 "--temp", "0"]) == 0
    figures = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cpu: " in figures and "% of decoded experts" in figures and "copied per token" in figures


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA GPU")
def test_gpu_arguments_are_checked_in_one_line(stores):
    store = stores["mixtral-q4"]
    cases = [({"gpu": "4GB"}, "no CUDA GPU"), ({"device": "cpu"}, "only with a GPU budget"),
             ({"device": "tpu"}, "device must be"), ({"device": "cuda"}, "no CUDA device"),
             ({"gpu": "1GB", "device": "cpu", "misses": "sometimes"}, "misses must be"),
             ({"gpu": "lots", "device": "cpu"}, "as a size")]
    for kwargs, message in cases:
        with pytest.raises(EdgerunError, match=message) as e:
            edgerun.load(store, **kwargs)
        assert "\n" not in str(e.value)
    assert "gpu_hit_rate" not in edgerun.load(store, gpu=0).stats()  # 0: no GPU tier


def test_the_gpu_tier_needs_a_quantized_store(stores, tmp_path):
    with pytest.raises(EdgerunError, match="apply to converted models"):
        edgerun.load(stores["mixtral-q4"].parent / "mixtral-hf", gpu="1GB", device="cpu")
    convert(stores["mixtral-q4"].parent / "mixtral-hf", tmp_path / "bf16", quant="bf16", progress=False)
    with pytest.raises(EdgerunError, match="computes q8/q4 experts"):
        edgerun.load(tmp_path / "bf16", gpu="1GB", device="cpu")


# -- on a real GPU ---------------------------------------------------------------------------------------------
def assert_float16_close(model: edgerun.Model, store) -> None:
    """Greedy tokens as on the CPU in float32, and logits within 0.5% of the largest at each position, except where
    float16's rounding turned a near tie in a router's top-k (a random model has them): one such position at most
    in this prompt."""
    want_tokens, want_logits = reference_run(store)
    assert model.generate_ids(PROMPT, NEW, temperature=0, ignore_eos=True) == want_tokens
    err = np.abs(model.logits(PROMPT) - want_logits).max(axis=1) / np.abs(want_logits).max()
    assert np.sort(err)[-2] < 0.005 and err.max() < 0.5, err


@pytest.mark.parametrize("name", ["mixtral-q8", "mixtral-q4", "qwen-q4"])
@pytest.mark.parametrize("gpu", ["256MB", "1MB"])
def test_float16_on_the_stand_in_gives_the_cpu_tokens(stores, name, gpu, exact, monkeypatch):
    """The dtype a GPU computes in, on the CPU standing in for one: the same code as on CUDA but its kernels."""
    monkeypatch.setattr("edgerun.runtime.device.default_dtype", lambda device: torch.float16)
    model = edgerun.load(stores[name], gpu=gpu, device="cpu", context_length=CONTEXT, misses="copy")
    assert model.experts.compute == torch.float16
    assert_float16_close(model, stores[name])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["mixtral-q8", "mixtral-q4", "qwen-q4"])
@pytest.mark.parametrize("gpu", ["256MB", "1MB"])
def test_cuda_gives_the_cpu_tokens(stores, name, gpu, exact):
    model = edgerun.load(stores[name], gpu=gpu, device="cuda", context_length=CONTEXT, misses="copy")
    assert model.stats()["runtime_settings"]["device"].startswith("cuda")
    assert_float16_close(model, stores[name])


def test_the_device_kernels_keep_to_the_device(monkeypatch):
    """Under FakeTensorMode the weights sit on a fake "cuda": an index or a buffer left on the CPU fails."""
    from test_device_math import _posing_as_cpu, fake_cuda
    from torch._subclasses.fake_tensor import FakeTensor

    # copy_ may cross devices, so it need not be checked; on a CPU-only build it refuses fake cuda tensors
    monkeypatch.setattr(FakeTensor, "copy_", _posing_as_cpu(torch.Tensor.copy_), raising=False)
    layout = ExpertLayout("q4", 64, 96)
    qs, scales = quant.quantize(np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32), "q8")
    with fake_cuda(monkeypatch):
        cuda = torch.device("cuda:0")
        m = DeviceMatrix(torch.empty(qs.shape, dtype=torch.int8, device=cuda),
                         torch.empty(scales.shape, dtype=torch.float16, device=cuda), 64, torch.float16)
        x = torch.empty((3, 64), device=cuda)
        assert m.linear(x, torch.empty(40, device=cuda)).device == cuda
        assert m.rows(torch.tensor([1, 5], device=cuda)).device == cuda
        pool = torch.empty((4, layout.nbytes), dtype=torch.uint8, device=cuda)
        kernel = ExpertKernel(layout, "silu", cuda, torch.float16, batch=2)
        y = kernel(pool, [3, 0, 1], x, [torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([0, 1, 2])])
        assert y.device == cuda and y.shape == (6, 64) and y.dtype == torch.float32
