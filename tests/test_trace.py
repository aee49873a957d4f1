"""Routing traces: reading and writing them, replaying them against the cache policies (on a real
Mixtral-8x7B trace), Belady's optimum, and `edgerun trace replay`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgerun.cli import main
from edgerun.errors import EdgerunError, TraceError
from edgerun.runtime.trace import (
    Trace,
    TracedRouting,
    TraceWriter,
    belady,
    capacity_from_fraction,
    read_trace,
    replay,
)

MIXTRAL = Path(__file__).parent / "data" / "mixtral_gsm8k_routing.jsonl"

# Replayed on MIXTRAL (32 layers x 8 experts, 15778 accesses), a step's experts pinned
EXPECTED = {  # capacity: (lru, lfu, belady)
    32: (0.0, 0.1608, 0.3775),
    64: (0.3421, 0.3134, 0.5842),
    128: (0.5349, 0.5851, 0.8094),
}


@pytest.fixture(scope="module")
def mixtral():
    return read_trace(MIXTRAL)


@pytest.fixture(scope="module")
def default_rates(mixtral):
    return {c: replay(mixtral, c, "default")["hit_rate"] for c in (3, 64, 128, 200, 240)}


def test_read_real_trace(mixtral):
    assert (mixtral.num_layers, mixtral.num_experts, mixtral.top_k) == (32, 8, 2)
    assert len(mixtral) == 7889 and mixtral.accesses == 15778
    # the file is grouped by layer; replay order is token by token, layer by layer
    assert [layer for layer, _ in mixtral[:34]] == list(range(32)) + [0, 1]
    assert mixtral[0] == (0, (7, 0)) and mixtral[1] == (1, (3, 6)) and mixtral[32] == (0, (5, 6))


@pytest.mark.parametrize("capacity", sorted(EXPECTED))
def test_baselines_on_real_trace(mixtral, capacity):
    lru, lfu, opt = EXPECTED[capacity]
    assert replay(mixtral, capacity, "lru")["hit_rate"] == pytest.approx(lru, abs=5e-4)
    assert replay(mixtral, capacity, "lfu")["hit_rate"] == pytest.approx(lfu, abs=5e-4)
    assert belady(mixtral, capacity) == pytest.approx(opt, abs=5e-4)


def test_default_policy_on_real_trace(mixtral, default_rates):
    assert default_rates[128] >= 0.60
    assert default_rates[64] >= 0.33
    for capacity, rate in default_rates.items():
        others = max(replay(mixtral, capacity, p)["hit_rate"] for p in ("lru", "lfu"))
        assert rate >= others, capacity
        assert rate <= belady(mixtral, capacity) or capacity < 4  # below 4 slots, bypassing beats Belady


def test_replay_counts_and_full_cache(mixtral):
    result = replay(mixtral, 256, "lru")
    assert result["accesses"] == 15778
    assert result["hits"] == 15778 - 256  # only the first use of each expert misses
    assert result["hit_rate"] == pytest.approx(result["hits"] / 15778)
    assert belady(mixtral, 256) == pytest.approx(result["hit_rate"])


def test_belady_by_hand():
    steps = [(0, (e,)) for e in (0, 1, 2, 0, 1, 2)]
    # 2 slots: 0 1 miss; 2 evicts 1 (used after 0); 0 hits; 1 evicts 0 (never used again); 2 hits
    assert belady(steps, 2) == pytest.approx(2 / 6)
    assert replay(steps, 2, "lru")["hits"] == 0


def test_replay_of_approximate_decoding_by_hand():
    # one layer of 4 experts, 2 slots, lru; light below 0.5, left out below 0.2
    routing = [((0, 1), (0.6, 0.4)),  # 0 read; 1 light but nothing in the cache to stand in: read as well
               ((2, 3), (0.7, 0.3)),  # 2 read (evicting 1, the least recent not in use); 3 replaced by 0, a hit
               ((1, 3), (0.85, 0.15))]  # 1 read; 3 left out
    trace = Trace([(0, e) for e, _ in routing], 1, 4, 2, [((0, t, 0), e, w) for t, (e, w) in enumerate(routing)])
    exact = replay(trace, 2, "lru")
    assert (exact["reads"], exact["accesses"]) == (5, 6)  # 0 1 | 2 3 | 1 (0 and 2 evicted for 3 and 1) 3
    assert exact["left_out_per_token"] == exact["replaced_per_token"] == exact["light_reads_per_token"] == 0
    r = replay(trace, 2, "lru", skip_below=0.2, substitute_below=0.5)
    assert (r["reads"], r["accesses"], r["hits"]) == (4, 5, 1)
    assert (r["light_reads_per_token"], r["replaced_per_token"], r["left_out_per_token"]) == (1 / 3, 1 / 3, 1 / 3)
    assert r["reads_per_token"] == pytest.approx(4 / 3)
    # per layer thresholds, and the weights they need
    assert replay(trace, 2, "lru", substitute_below=[0.5])["reads"] == 4  # 3 replaced at t2 as well: 0 is cached
    with pytest.raises(TraceError, match="substitute_below has 2 values; the model has 1 MoE layers"):
        replay(trace, 2, "lru", substitute_below=[0.5, 0.5])
    with pytest.raises(TraceError, match="routing weights"):
        replay(list(trace), 2, "lru", skip_below=0.2)


def test_replay_of_approximate_decoding_reads_fewer_on_the_mixtral_trace(mixtral):
    steps = len(mixtral) * mixtral.top_k
    for capacity in (64, 128):
        exact = replay(mixtral, capacity)
        skip = replay(mixtral, capacity, skip_below=0.2)
        sub = replay(mixtral, capacity, skip_below=0.2, substitute_below=[0.2] * 8 + [0.5] * 24)
        tokens = len(mixtral) / 32
        for r in (skip, sub):
            # every expert is looked up once but those left out (a replaced one's stand-in instead of it)
            assert r["accesses"] == steps - round(r["left_out_per_token"] * tokens)
            assert r["reads"] == r["accesses"] - r["hits"] and r["reads"] < exact["reads"]
        assert skip["replaced_per_token"] == skip["light_reads_per_token"] == 0
        assert sub["reads"] < skip["reads"] and sub["replaced_per_token"] > 0 and sub["light_reads_per_token"] > 0
        assert sub["left_out_per_token"] == pytest.approx(skip["left_out_per_token"], rel=0.1)


@pytest.mark.parametrize("capacity", [0, 257])
def test_capacity_out_of_range(mixtral, capacity):
    with pytest.raises(TraceError, match="between 1 and the trace's 256 experts"):
        replay(mixtral, capacity, "lru")


def test_replay_needs_steps():
    with pytest.raises(TraceError, match="no steps"):
        replay([], 1, "lru")


def test_capacity_from_fraction():
    assert capacity_from_fraction(0.5, 256) == 128
    assert capacity_from_fraction(0.001, 256) == 1
    with pytest.raises(TraceError, match=r"\(0, 1\]"):
        capacity_from_fraction(1.5, 256)


def test_writer_round_trip(tmp_path):
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        for problem in (1, 0):  # out of order: replay sorts by problem, token, layer
            for token in range(2):
                for layer in range(3):
                    w.record(problem, token, layer, [layer, 4 + token], [0.75, 0.25])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 12
    assert lines[0] == {"problem_id": 1, "layer": 0, "experts": [0, 4], "gating_probs": [0.75, 0.25], "token_idx": 0}
    trace = read_trace(path)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (3, 6, 2)
    assert list(trace) == [(layer, (layer, 4 + token)) for _ in range(2) for token in range(2) for layer in range(3)]


def test_writer_closed(tmp_path):
    w = TraceWriter(tmp_path / "t.jsonl")
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.record(0, 0, 0, [1], [1.0])


GOOD = '{"problem_id": 0, "layer": 0, "experts": [1, 2], "gating_probs": [0.5, 0.5], "token_idx": 0}'


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (GOOD.replace('"layer": 0, ', ''), '"layer" must be a non-negative integer, got None'),
    (GOOD.replace('"layer": 0', '"layer": -1'), '"layer" must be a non-negative integer, got -1'),
    (GOOD.replace('"token_idx": 0', '"token_idx": "3"'), '"token_idx" must be a non-negative integer'),
    (GOOD.replace("[1, 2]", "[]"), '"experts" must be a non-empty list'),
    (GOOD.replace("[1, 2]", "[1, 1.5]"), '"experts" must hold non-negative integers'),
    (GOOD.replace("[1, 2]", "[2, 2]"), '"experts" repeats an expert'),
    (GOOD.replace("[0.5, 0.5]", "[0.5]"), '"gating_probs" must be a list of numbers, one per expert'),
    (GOOD, "a second record for problem 0 token 0 layer 0 (first on line 1)"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n\n" + bad + "\n")
    with pytest.raises(TraceError) as info:
        read_trace(path)
    assert str(info.value).startswith(f"{path} line 3: ")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace .*nope.jsonl"):
        read_trace(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no routing records"):
        read_trace(tmp_path / "empty.jsonl")
    assert issubclass(TraceError, EdgerunError)


def test_cli_replay_json(capsys):
    assert main(["trace", "replay", str(MIXTRAL), "--capacity-frac", "0.25", "--policy", "lfu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"hit_rate", "belady_hit_rate", "accesses", "capacity", "policy"} <= set(out)
    assert (out["capacity"], out["policy"], out["accesses"]) == (64, "lfu", 15778)
    assert out["hit_rate"] == pytest.approx(EXPECTED[64][1], abs=5e-4)
    assert out["belady_hit_rate"] == pytest.approx(EXPECTED[64][2], abs=5e-4)


def test_cli_replay_text(capsys):
    assert main(["trace", "replay", str(MIXTRAL), "--capacity", "32", "--policy", "lru"]) == 0
    out = capsys.readouterr().out
    assert out == "policy lru: 0.0% hits (0 of 15778 accesses), capacity 32 of 256 experts; Belady optimum 37.7%\n"


def test_cli_replay_approximate(capsys):
    args = ["trace", "replay", str(MIXTRAL), "--capacity-frac", "0.25", "--skip-below", "0.2", "--substitute-below",
            "0.2x8,0.5x24"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    a = out["approximate"]
    assert a["reads_per_token"] < out["reads_per_token"] and out["accesses"] == 15778  # exact, as without options
    assert (a["skip_below"], a["substitute_below"]) == (0.2, [0.2] * 8 + [0.5] * 24)
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("policy default: ")
    exact, reads = out["reads_per_token"], a["reads_per_token"]
    assert lines[1].startswith(f"approximate: {reads:.1f} experts read per token against {exact:.1f} exactly "
                               f"({exact / reads:.2f}x fewer); ")
    assert f"{a['light_reads_per_token']:.1f} light misses read" in lines[1]
    assert main(["trace", "replay", str(MIXTRAL), "--capacity", "8", "--substitute-below", "0x32", "--json"]) == 0
    assert "approximate" not in json.loads(capsys.readouterr().out)  # thresholds of 0: exact decoding
    assert main(["trace", "replay", str(MIXTRAL), "--capacity", "8", "--substitute-below", "0.5x16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "edgerun: error: substitute_below has 16 values; the model has 32 MoE layers"


@pytest.mark.parametrize("args, message", [
    ([], "one of the arguments --capacity --capacity-frac is required"),
    (["--capacity", "0"], "--capacity: must be at least 1"),
    (["--capacity", "300"], "between 1 and the trace's 256 experts, got 300"),
    (["--capacity-frac", "0"], "--capacity-frac: must be in (0, 1]"),
    (["--capacity-frac", "1.5"], "--capacity-frac: must be in (0, 1]"),
    (["--capacity", "8", "--capacity-frac", "0.5"], "not allowed with"),
    (["--capacity", "8", "--policy", "fifo"], "invalid choice: 'fifo'"),
    (["--capacity", "8", "--skip-below", "1"], "--skip-below: '1': routing weights go from 0 up to 1"),
])
def test_cli_bad_arguments(capsys, args, message):
    assert main(["trace", "replay", str(MIXTRAL), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_cli_bad_file(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(GOOD + "\n{oops\n")
    for target in (path, tmp_path / "missing.jsonl"):
        assert main(["trace", "replay", str(target), "--capacity", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("edgerun: error: ") and str(target) in err and len(err.splitlines()) == 1
    assert main(["trace", "replay", str(path), "--capacity", "2"]) == 2
    assert "line 2: not valid JSON" in capsys.readouterr().err


# -- running a model with a trace's routing -------------------------------------------------------------------
@pytest.fixture(scope="module")
def store32(tmp_path_factory):
    """A tiny q4 Mixtral with the trace's shape: 32 MoE layers of 8 experts, top-2."""
    from edgerun.store.convert import convert
    from edgerun.synthetic import mixtral_config, write_random_mixtral

    base = tmp_path_factory.mktemp("traced")
    src = write_random_mixtral(base / "hf", mixtral_config(64, 32, 8, 96, heads=4, kv_heads=2))
    return convert(src, base / "q4", quant="q4", progress=False)


def test_a_trace_routes_every_layer_and_the_read_ahead_foresees_it(store32):
    import torch

    import edgerun

    trace = read_trace(MIXTRAL)
    given = {where: (list(experts), probs) for where, experts, probs in trace.records}
    model = edgerun.load(store32)
    TracedRouting(trace).install(model.decoder)
    seen: dict[int, list] = {}
    model.decoder.observers.append(lambda layer, idx, w: seen.setdefault(layer, []).extend(zip(idx.tolist(),
                                                                                              w.tolist())))
    model.generate_ids([5, 9, 2, 7, 1], 3, temperature=0, ignore_eos=True)  # a 5-token prefill, 2 decode steps
    for layer in range(32):  # trace tokens 0..6 of problem 0, with their gating weights
        assert [experts for experts, _ in seen[layer]] == [given[(0, t, layer)][0] for t in range(7)]
        assert [w for _, ws in seen[layer] for w in ws] == pytest.approx(
            [w for t in range(7) for w in given[(0, t, layer)][1]])
    # a forecast from layer 3 for the next token gives layer 9's experts of trace token 7, and moves nothing on
    x = torch.randn(1, 64)
    assert model.decoder.lookahead(3, 9, x).idx.tolist() == [given[(0, 7, 9)][0]]
    ahead = model.decoder.lookahead(3, 9, x)
    assert ahead.idx.tolist() == [given[(0, 7, 9)][0]]
    probs = [0.0] * 8  # the forecast's probabilities: the trace's weights, 0 for the experts it did not choose
    for e, p in zip(*given[(0, 7, 9)]):
        probs[e] = p
    assert ahead.probs.tolist() == [pytest.approx(probs)] and ahead.weights.dtype == x.dtype
    # the read-ahead's forecasts of several layers at once: the same, as rows
    rows = model.decoder.lookahead_many(3, [9, 4, 30], x)
    for i, layer in enumerate([9, 4, 30]):
        one = model.decoder.lookahead(3, layer, x)
        assert all(torch.equal(getattr(rows, n)[i:i + 1], getattr(one, n)) for n in ("idx", "weights", "probs"))
    assert rows.idx[0].tolist() == given[(0, 7, 9)][0]


def test_a_trace_needs_a_model_of_its_shape_and_complete_tokens(store32, tmp_path):
    import edgerun

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"problem_id": 0, "token_idx": t, "layer": layer, "experts": [1, 0],
                                         "gating_probs": [0.7, 0.3]}) + "\n"
                             for t, layer in ((0, 0), (0, 1), (1, 0))))
    routing = TracedRouting(read_trace(small))  # token 1 lacks layer 1: only token 0 is replayed
    assert routing.idx.shape == (1, 2, 2)
    with pytest.raises(TraceError, match="the trace routes 2 MoE layers to 2 of at least 2 experts; this model has "
                                         "32 MoE layers") as e:
        routing.install(edgerun.load(store32).decoder)
    assert "\n" not in str(e.value)


def test_bench_runs_a_budget_with_a_trace_routing(store32, capsys):
    assert main(["bench", str(store32), "--routing-trace", str(MIXTRAL), "--tokens", "8", "--prompt-tokens", "8",
                 "--repeats", "1", "--no-kernels", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["routing_trace"] == str(MIXTRAL) and d["decode_tokens_per_s"] > 0
    assert main(["bench", str(store32), "--routing-trace", str(MIXTRAL), "--tokens", "4", "--prompt-tokens", "4",
                 "--repeats", "1", "--no-kernels"]) == 0
    assert f"routing    as recorded in {MIXTRAL}" in capsys.readouterr().out
