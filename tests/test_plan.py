"""`edgerun plan`: placement and speed predictions checked against the formulas worked out by hand."""

import json
from pathlib import Path

import pytest

from edgerun.cli import main
from edgerun.hw.plan import predict
from edgerun.hw.profile import load_profile

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
MiB = 1 << 20

TINY = {"model_type": "mixtral", "vocab_size": 1024, "hidden_size": 256, "intermediate_size": 4096,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 1024}
GROK = {"model_type": "grok-1", "vocab_size": 131072, "hidden_size": 6144, "intermediate_size": 32768,
        "num_hidden_layers": 64, "num_attention_heads": 48, "num_key_value_heads": 8, "num_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 8192}
MIXTRAL = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
           "num_experts_per_tok": 2, "max_position_embeddings": 32768}


def synthetic_profile() -> dict:
    kernel = lambda gemv, gemm: {"gemv_gbps": {"1": gemv / 2, "4": gemv}, "gemm_gflops": {"1": gemm / 4, "4": gemm}}
    disk = {"262144": 1.0, "4194304": 2.0, "16777216": 3.0, "67108864": 3.5}
    return {
        "schema_version": 1, "created": "2026-01-01T00:00:00+00:00", "hostname": "test", "edgerun_version": "0",
        "source": "test", "quick": False,
        "cpu": {"model": "test", "physical_cores": 4, "logical_cores": 8, "simd": [],
                "kernels": {"q4": kernel(20.0, 200.0), "q8": kernel(24.0, 240.0)}},
        "ram": {"total_bytes": 16 << 30, "available_bytes": 12 << 30, "read_gbps": {"1": 20.0, "4": 40.0}},
        "disk": {"path": "test", "direct_io": True, "file_bytes": 1 << 30, "seq_read_gbps": 2.0,
                 "random_read": {k: {"qd1_gbps": v, "parallel_gbps": v, "parallel_readers": 4}
                                 for k, v in disk.items()}},
        "gpu": None, "duration_s": 0.0,
    }


@pytest.fixture
def profile_file(tmp_path) -> Path:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(synthetic_profile()))
    return path


# The tiny model by hand. q4: 0.5 byte per weight, one fp16 scale per 32 weights; q8: 1 byte + the scale.
CHUNK = (8192 * 128 + 8192 * 8 * 2) + (256 * 2048 + 256 * 128 * 2)  # gate_up [8192, 256] + down [256, 4096]
assert CHUNK % 4096 == 0  # already page-aligned: no padding
Q8 = lambda rows, cols: rows * cols + rows * cols // 32 * 2
EMBED = Q8(1024, 256)
LAYER = 2 * 256 * 4 + Q8(256, 256) * 2 + Q8(128, 256) * 2 + 8 * 256 * 4  # norms, q/o, k/v, router (f32)
RESIDENT = 2 * EMBED + 256 * 4 + 2 * LAYER  # embed, lm_head, final norm, layers
TOKEN_DENSE = EMBED // 1024 + EMBED + 256 * 4 + 2 * LAYER  # one embedding row, the rest whole
KV = 2 * 2 * 2 * 1024 * 64 * 4


def scratch(T: int) -> int:
    return 16 * T * 256 * 4 + 3 * T * 2 * 4096 * 4 + 4 * T * 1024 * 4 + T * 1024 * 4 + 2 * CHUNK


def hand_step(budget: int) -> int:
    T = 512
    while T > 32 and scratch(T) > 0.05 * budget:
        T //= 2
    return T


def hand_slots(budget: int) -> int:
    T = hand_step(budget)
    safety = max(32 * MiB, int(budget * 0.02))
    return min(16, (budget - 340 * MiB - RESIDENT - KV - scratch(T) - safety) // CHUNK)


def test_tiny_model_by_hand():
    budget = 410 * MiB
    slots = hand_slots(budget)
    assert 4 <= slots < 16
    p = predict(TINY, synthetic_profile(), ram=budget, prompt=300)
    assert p.possible and p.expert_slots == slots and p.experts_total == 16
    rows = {r["part"].split(" (")[0]: r for r in p.placement}
    assert rows["weights resident"]["bytes"] == RESIDENT and rows["KV cache"]["bytes"] == KV
    assert rows["expert slots RAM"]["bytes"] == slots * CHUNK
    h = slots / 16
    used = 2 * 2 * CHUNK  # 2 MoE layers x top-2
    # 1.7 MB chunks: nearest measured size is 4 MiB, 2 GB/s, one reader (parallel is no faster); read-ahead
    # reads 10% more than the tokens use
    read = used * (1 - h) * 1.1 / 2.0e9
    experts, dense, kv = used / 20e9, TOKEN_DENSE / 24e9, KV / 2 / 40e9
    assert p.readers == 1
    assert p.times == pytest.approx({"read": read, "experts": experts, "dense": dense, "kv": kv})
    assert p.decode_tokens_per_s == pytest.approx(1 / (max(read, experts + dense + kv) * 1.02))
    assert p.bottleneck == "disk reads"
    assert p.bytes_per_token == {"ram": int(used * h), "disk": int(used * (1 - h) * 1.1)}
    # prefill in engine steps of T tokens: 300 tokens = 2 steps when T = 256, 1 when T = 512
    T = hand_step(budget)
    steps = -(-300 // T)
    step = min(T, 300)
    touched = 8 * (1 - (6 / 8) ** step)  # experts of a layer some token of the step picks
    # lm_head, final norm, layers; not the embedding (a lookup)
    dense_params = 1024 * 256 + 256 + 2 * (2 * 256 + 2 * 256 * 256 + 2 * 128 * 256 + 8 * 256)
    per_expert = max(CHUNK / 20e9, 2 * 3 * 256 * 4096 * (step * 2 / touched) / 200e9)
    compute = 2 * touched * per_expert + max(TOKEN_DENSE / 24e9, 2 * dense_params * step / 200e9)
    reads = 2 * touched * CHUNK * (1 - h) / 2.0e9
    assert p.prefill_tokens_per_s == pytest.approx(300 / (steps * max(compute, reads) * 1.02))


def test_parallel_readers_when_they_pay_off():
    profile = synthetic_profile()
    profile["disk"]["random_read"]["4194304"]["parallel_gbps"] = 3.0  # 1.5x one reader's 2 GB/s
    slow, fast = predict(TINY, synthetic_profile(), ram=410 * MiB), predict(TINY, profile, ram=410 * MiB)
    assert (slow.readers, fast.readers) == (1, 4)  # as many as the profile measured in parallel
    assert fast.times["read"] == pytest.approx(slow.times["read"] * 2 / 3)


def test_compute_bound_when_every_expert_fits():
    p = predict(TINY, synthetic_profile(), ram=2 << 30)
    assert p.expert_slots == 16 and p.hit_rate == 1 and p.times["read"] == 0
    assert p.bottleneck == "expert kernels" and p.bytes_per_token["disk"] == 0


def test_impossible_budget_says_what_would_fit():
    p = predict(TINY, synthetic_profile(), ram=360 * MiB)
    assert not p.possible and "more RAM" in p.reason
    assert predict(TINY, synthetic_profile(), ram=600 * MiB).possible
    q8 = predict(TINY, synthetic_profile(), expert_format="q8", ram=402 * MiB)
    assert not q8.possible and "--quant q4" in q8.reason


def test_shorter_context_is_offered():
    big = dict(TINY, max_position_embeddings=65536)
    p = predict(big, synthetic_profile(), ram=400 * MiB, ctx=65536)
    assert not p.possible and "--ctx" in p.reason


def test_grok1_on_the_desktop_is_disk_bound():
    profile = load_profile(PROFILES / "desktop-rtx4090-64gb.json")
    p = predict(GROK, profile, ctx=4096)
    chunk = 3 * 6144 * 32768 // 2 + 3 * 6144 * 32768 // 32 * 2  # q4, already page-aligned
    budget = 56_000_000_000 - int(56e9 * 0.15)
    resident = 131072 * 6144 * 17 // 16 + 64 * (2 * 6144 * 6144 + 2 * 1024 * 6144) * 17 // 16 \
        + (64 * (4 * 6144 + 8 * 6144) + 6144) * 4  # q8 embedding (tied) and attention; f32 norms and routers
    kv = 2 * 64 * 8 * 4096 * 128 * 4
    T = 512  # its scratch is well below 5% of the budget
    scratch_ = 16 * T * 6144 * 4 + 3 * T * 2 * 32768 * 4 + 48 * T * 4096 * 4 + T * 131072 * 4 + 2 * chunk
    # the dense weights and the KV cache go on the GPU, so RAM holds experts besides the scratch and two pinned
    # chunks that copies to the GPU go through
    slots = (budget - 340 * MiB - scratch_ - 2 * chunk - int(budget * 0.02)) // chunk
    assert p.expert_slots == slots and 120 < slots < 140  # of 512: 174 GB of experts
    gpu = (24 << 30) - 500 * MiB - int((24 << 30) * 0.10)  # the card less the CUDA context and a margin
    D, I = 6144, 32768
    gpu_scratch = 2 * max(2 * I * D, D * I) * 2 + 2 * T * (D + 3 * I) * 2 \
        + scratch_ - 2 * chunk + 64 * MiB  # two experts dequantized to float16, activations, a dense block
    assert p.memory_plan["gpu"]["dense"]
    assert p.gpu_expert_slots == (gpu - 256 * MiB - gpu_scratch - resident - kv) // chunk
    assert p.bottleneck == "disk reads" and p.decode_tokens_per_s < 1


def test_mixtral_fits_the_desktop_and_is_compute_bound():
    profile = load_profile(PROFILES / "desktop-rtx4090-64gb.json")
    p = predict(MIXTRAL, profile, ctx=4096)
    assert p.experts_total == 256 and p.expert_slots == 256 and p.hit_rate == 1
    chunk = 3 * 4096 * 14336 * 9 // 16
    # GPU hits at the GPU kernel's rate (124 GB/s), the rest on the CPU (63.8 GB/s): one token's copy over PCIe
    # (25 GB/s) and GPU compute cost more than the CPU kernel
    g = p.gpu_expert_slots / 256
    assert 0.6 < g < 0.8 and any("on the CPU in decode" in n for n in p.notes)
    assert p.times["experts"] == pytest.approx(32 * 2 * chunk * (g / 124e9 + (1 - g) / 63.8e9))
    assert p.bottleneck == "expert kernels"
    small = predict(MIXTRAL, load_profile(PROFILES / "laptop-rtx4060-16gb.json"), ctx=4096, gpu=0)
    assert small.possible and small.expert_slots < 256 and small.bottleneck == "disk reads"


def test_cli_json(tmp_path, profile_file, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    assert main(["plan", str(cfg), "--profile", str(profile_file), "--ram", "410MiB", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["possible"] and d["expert_slots"] == hand_slots(410 * MiB) and d["experts_total"] == 16
    assert set(d["times"]) == {"read", "experts", "dense", "kv"} and set(d["bytes_per_token"]) == {"ram", "disk"}
    assert main(["plan", str(tmp_path), "--profile", str(profile_file), "--ram", "410MiB"]) == 0
    assert "bottleneck: disk reads" in capsys.readouterr().out
    assert main(["plan", str(cfg), "--profile", str(profile_file), "--ram", "300MiB", "--json"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["possible"] is False and "more RAM" in d["reason"]


def test_cli_without_a_profile_measures_a_quick_one(tmp_path, capsys, monkeypatch):
    """As edgerun.load does, plan measures (and saves) a quick profile of a machine that has none, says so on
    stderr, and predicts with it."""
    from edgerun.hw.profile import default_profile_path

    monkeypatch.setenv("EDGERUN_CONFIG", str(tmp_path / "config"))
    measured = dict(synthetic_profile(), quick=True, duration_s=4.2)
    calls = []

    def measure(store_path=None, quick=False, **kwargs):  # the real one takes seconds: kernels, RAM, disk reads
        calls.append(quick)
        return measured

    monkeypatch.setattr("edgerun.hw.profile.measure_profile", measure)
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    assert main(["plan", str(cfg), "--ram", "410MiB", "--json"]) == 0
    out, err = capsys.readouterr()
    assert calls == [True]
    want = predict(TINY, measured, ram=410 * MiB).as_dict()
    assert json.loads(out) == json.loads(json.dumps(want | {"prompt_tokens": 512}))
    assert json.loads(out)["expert_slots"] == hand_slots(410 * MiB)
    # another machine's profile would plan differently: the figures are the measured profile's
    other = predict(TINY, load_profile(PROFILES / "cloud-vm-2core-epyc.json"), ram=410 * MiB)
    assert other.decode_tokens_per_s != pytest.approx(want["decode_tokens_per_s"])
    assert "measured a quick profile" in err and str(default_profile_path()) in err
    assert load_profile(default_profile_path()) == measured  # saved: the next plan (and load) reads it
    assert main(["plan", str(cfg), "--ram", "410MiB", "--json"]) == 0
    out, err = capsys.readouterr()
    assert calls == [True] and "quick" not in err and json.loads(out)["expert_slots"] == hand_slots(410 * MiB)


def test_cli_missing_profile_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("edgerun.hw.profile.measure_profile", lambda *a, **k: pytest.fail("measured a profile"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    assert main(["plan", str(cfg), "--profile", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--profile" in err and "missing.json" in err and "no such file" in err and "\n" not in err


def test_experts_every_token_uses_are_cached_first():
    from edgerun.hw.plan import cached_share

    # 4 layers of 8 routed experts (top-2) and 2 always-used ones: 8 slots hold the always-used ones of every layer
    assert cached_share(8, 4, 8, 2, 2) == pytest.approx(2 / 4)
    assert cached_share(4, 4, 8, 2, 2) == pytest.approx(1 / 4)  # half of them
    assert cached_share(24, 4, 8, 2, 2) == pytest.approx((2 + 2 * 16 / 32) / 4)  # and half the routed ones
    assert cached_share(40, 4, 8, 2, 2) == 1.0
    assert cached_share(16, 4, 8, 2, 0) == pytest.approx(16 / 32)  # without them: the cached share, uniform
