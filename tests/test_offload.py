"""The offloading engine: memory planner, reader, and experts streamed from the store under a budget."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import edgerun
from edgerun.cli import main
from edgerun.errors import CheckpointError, EdgerunError
from edgerun.models.routers import Routing
from edgerun.runtime import reader as reader_module
from edgerun.runtime import placement
from edgerun.runtime.placement import SAFETY_MIN, BudgetError, choose_prefill_chunk, split_budget
from edgerun.units import parse_size
from edgerun.runtime import offload as offload_module
from edgerun.runtime.offload import OffloadedExperts
from edgerun.runtime.policy import ForecastPolicy
from edgerun.runtime.reader import CANCELLED, DONE, ExpertReader
from edgerun.runtime.trace import read_trace
from edgerun.store.convert import convert
from edgerun.store.store import ExpertStore, expert_chunk_path
from edgerun.synthetic import mixtral_config, write_random_mixtral
from hf_models import build, save

PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88, 9, 101, 56, 23]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """q4 stores of a tiny Mixtral with 4 MoE layers x 8 experts, and of a Qwen2-MoE with a dense layer."""
    base = tmp_path_factory.mktemp("offload")
    sources = {
        "mixtral": write_random_mixtral(base / "mixtral-hf", mixtral_config(64, 4, 8, 96, heads=4, kv_heads=2)),
        "qwen2_moe_step": save(build("qwen2_moe_step", num_hidden_layers=4, num_experts=8,
                                     layer_types=["full_attention"] * 4), base / "qwen2_moe_step-hf"),
        # latent attention and a grouped sigmoid router; GLM-4.5's half-rotary heads
        "deepseek_v3": save(build("deepseek_v3", num_hidden_layers=3), base / "deepseek_v3-hf"),
        "glm4_moe": save(build("glm4_moe", num_hidden_layers=3), base / "glm4_moe-hf"),
    }
    for name, src in sources.items():
        convert(src, base / name, quant="q4", progress=False)
    return {name: base / name for name in sources}


def offload(model: edgerun.Model, slots: int, **kwargs) -> OffloadedExperts:
    """Swap the model's experts for an offloading container of `slots` slots over the same store."""
    experts = OffloadedExperts(ExpertStore(model.path), model.spec.activation, slots, **kwargs)
    model.use_experts(experts).close()
    return experts


# -- sizes and the planner ---------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("12GiB") == 12 << 30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("800 MiB") == 800 << 20
    assert parse_size("4096") == 4096
    for bad in ("", "lots", "12XB", "-1GiB", "0"):
        with pytest.raises(EdgerunError, match="size"):
            parse_size(bad)


def test_plan_splits_the_budget():
    kw = dict(given=True, baseline=300 << 20, resident=100 << 20, kv_cache=50 << 20, scratch=20 << 20,
              slot_bytes=10 << 20, total_experts=64, top_k=2, context_length=512, prefill_chunk=512)
    plan = split_budget(budget=1 << 30, **kw)
    assert plan.slots == (plan.budget_bytes - plan.fixed_bytes) // (10 << 20)
    assert 4 <= plan.slots < 64 and plan.fixed_bytes + plan.slots * plan.slot_bytes <= 1 << 30
    assert split_budget(budget=8 << 30, **kw).slots == 64  # never more slots than experts
    with pytest.raises(BudgetError, match=r"minimum of (\d+\.\d+) MiB") as e:
        split_budget(budget=400 << 20, **kw)
    minimum = float(e.value.args[0].split("minimum of ")[1].split(" MiB")[0]) * (1 << 20)
    assert minimum >= (300 + 100 + 50 + 20 + 4 * 10) << 20  # what every token needs and 2 x top_k slots
    # the line names every part of it, the process's own memory first
    assert "(the process itself 300.00 MiB, weights 100.00 MiB, KV cache 50.00 MiB, scratch 20.00 MiB, 4 expert " \
        "slots of 10.00 MiB, and a margin)" in e.value.args[0]
    assert split_budget(budget=int(minimum) + (1 << 20), **kw).slots >= 4


def test_tight_budgets_prefill_in_shorter_chunks():
    scratch_of = lambda chunk: chunk << 20  # noqa: E731 - 1 MiB per token
    assert choose_prefill_chunk(None, scratch_of, 512) == 512
    assert choose_prefill_chunk(16 << 30, scratch_of, 512) == 512
    assert choose_prefill_chunk(2 << 30, scratch_of, 512) == 64  # 64 MiB <= 5% of 2 GiB < 128 MiB
    assert choose_prefill_chunk(1 << 20, scratch_of, 512) == 32  # never below 32


def test_budget_below_the_minimum_is_refused_in_one_line(stores, capsys):
    with pytest.raises(BudgetError, match="minimum"):
        edgerun.load(stores["mixtral"], ram="64MiB")
    assert main(["run", str(stores["mixtral"]), "-p", "hi", "--ram", "64MiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "minimum" in err[0] and "give more RAM" in err[0]
    assert main(["run", str(stores["mixtral"]), "-p", "hi", "--ram", "plenty"]) == 2
    assert "size" in capsys.readouterr().err


def test_budget_needs_a_store(stores, tmp_path):
    with pytest.raises(EdgerunError, match="quant"):
        edgerun.load(stores["mixtral"].parent / "mixtral-hf", ram="8GiB")


# -- identical output under a budget -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe_step", "deepseek_v3", "glm4_moe"])
@pytest.mark.parametrize("policy", ["default", "lru", "lfu"])
def test_tight_budget_gives_identical_tokens_and_logits(stores, name, policy):
    resident = edgerun.load(stores[name])
    want_tokens = resident.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True)
    want_logits = resident.logits(PROMPT)
    tight = edgerun.load(stores[name])
    experts = offload(tight, slots=4, policy=policy)
    total = len(experts.layers) * experts.store.num_experts
    assert tight.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True) == want_tokens
    stats = tight.stats()
    assert stats["offload"] and stats["expert_slots"] == 4 < total
    assert stats["bytes_read"] > 0 and 0 <= stats["hit_rate"] < 1
    assert np.array_equal(tight.logits(PROMPT), want_logits)
    experts.close()


def budget_for(store: Path, slots: int, monkeypatch) -> int:
    """A budget leaving room for `slots` experts, with this process's baseline RSS pinned so the plan is exact."""
    monkeypatch.setattr(edgerun.api, "current_rss", lambda: 300 << 20)
    monkeypatch.setattr(placement, "choose_prefill_chunk", lambda budget, scratch_of, largest: 64)
    plan = edgerun.load(store, context_length=64).stats()["memory_plan"]
    assert plan["slots"] == plan["total_experts"]  # no budget: all of a tiny model fits
    # at these sizes the safety margin is its minimum; the no-budget plan's margin is a share of the machine's RAM
    core = plan["fixed_bytes"] - plan["safety_bytes"]
    return core + SAFETY_MIN + slots * plan["slot_bytes"] + plan["slot_bytes"] // 2


def test_load_with_ram_offloads_and_keeps_output(stores, monkeypatch):
    want = edgerun.load(stores["mixtral"]).generate_ids(PROMPT, 8, temperature=0, ignore_eos=True)
    budget = budget_for(stores["mixtral"], 6, monkeypatch)
    model = edgerun.load(stores["mixtral"], context_length=64, ram=budget)
    stats = model.stats()
    assert stats["offload"] and stats["expert_slots"] == 6 and stats["memory_plan"]["prefill_chunk"] == 64
    # the engine took its reader threads and prefetch depth from this machine's profile
    assert stats["runtime_settings"]["profile"].endswith(".json")
    assert stats["runtime_settings"]["readers"] in (1, 2) and stats["prefetch_depth"] >= 1
    assert stats["runtime_settings"]["threads"] == stats["threads"] >= 1
    assert stats["runtime_settings"]["direct_io"] == stats["direct_io"]
    assert model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True) == want
    stats = model.stats()
    assert stats["ram_budget_bytes"] == budget
    for key in ("hit_rate", "prefetch_recall", "bytes_read", "peak_rss_bytes", "decode_tokens_per_s"):
        assert key in stats
    assert 0 < stats["bytes_read"] and 0 <= stats["hit_rate"] < 1


def test_a_reserve_is_counted_with_the_process_and_the_slots_give_way(stores, monkeypatch):
    """load(reserve=): memory the process will take besides the model (the chat page's server) is kept out of the
    budget's split, as the process's own memory is."""
    budget = budget_for(stores["mixtral"], 6, monkeypatch)
    plain = edgerun.load(stores["mixtral"], context_length=64, ram=budget).stats()["memory_plan"]
    kept = edgerun.load(stores["mixtral"], context_length=64, ram=budget,
                        reserve=2 * plain["slot_bytes"]).stats()["memory_plan"]
    assert kept["baseline_bytes"] == plain["baseline_bytes"] + 2 * plain["slot_bytes"]
    assert (plain["slots"], kept["slots"]) == (6, 4)
    with pytest.raises(EdgerunError, match="as a size"):
        edgerun.load(stores["mixtral"], context_length=64, ram=budget, reserve="plenty")


def test_prefetch_predicts_with_the_next_routers(stores):
    model = edgerun.load(stores["mixtral"])
    experts = offload(model, slots=16)
    model.generate_ids(PROMPT, 16, temperature=0, ignore_eos=True)
    stats = model.stats()
    assert experts.prefetches > 0
    assert 0 < stats["prefetch_recall"] <= 1
    no_prefetch = edgerun.load(stores["mixtral"])
    plain = offload(no_prefetch, slots=16, prefetch=False)
    no_prefetch.generate_ids(PROMPT, 16, temperature=0, ignore_eos=True)
    assert plain.prefetches == 0 and no_prefetch.stats()["prefetch_recall"] == 0
    experts.close(), plain.close()


def test_the_read_ahead_routes_the_next_layers_in_one_call_as_each_router_would(stores, monkeypatch):
    from edgerun import native

    model = edgerun.load(stores["mixtral"])
    decoder = model.decoder
    layers = decoder.moe_layers
    calls = []
    kernel = native.route_ahead
    monkeypatch.setattr(native, "route_ahead", lambda *args: calls.append(len(args[1])) or kernel(*args))
    torch.manual_seed(0)
    for _ in range(4):
        x = torch.randn(1, model.spec.hidden_size)
        rows = decoder.lookahead_many(layers[0], layers[1:], x)
        for i, layer in enumerate(layers[1:]):
            one = decoder.lookahead(layers[0], layer, x)
            for name in ("idx", "weights", "probs"):
                assert torch.equal(getattr(rows, name)[i:i + 1], getattr(one, name)), name
    assert calls == ([len(layers) - 1] * 4 if native.fusable() else [])
    # a router of another kind: one by one, the same rows
    decoder.moe[layers[-1]].router = FixedRouter(decoder.moe[layers[-1]].router)
    rows = decoder.lookahead_many(layers[0], layers[1:], x)
    assert rows.idx[-1].tolist() == [0, 1] and len(calls) == 4 * (native.fusable())


class FixedRouter:
    """A router that always picks experts 0 and 1, equally."""

    def __init__(self, router):
        self.router = router

    def __call__(self, x):
        r = self.router(x)
        idx = torch.tensor([[0, 1]] * x.shape[0])
        return Routing(idx, torch.full(idx.shape, 0.5), r.probs)


def test_the_policy_reads_forecast_hints_from_at_most_two_layers_back(stores, monkeypatch):
    """Every hint is given here (HINTED_LAYERS raised), and each one the policy reads is recorded with the layer
    it was forecast from: none is read from further back than HINTED_LAYERS, so not giving those changes no
    eviction."""
    monkeypatch.setattr(offload_module, "HINTED_LAYERS", 99)
    source, given, read = {}, [], []
    predict, expected = ForecastPolicy.predict, ForecastPolicy.expected_next_use

    def recording_predict(self, layer, probs):
        source[layer] = self._layer  # the layer being computed: its schedule forecasts the later ones
        given.append(layer - self._layer)
        predict(self, layer, probs)

    def recording_expected(self):
        nxt = self._layer + 1
        if nxt in self._forecast:
            read.append(nxt - source[nxt])
        return expected(self)
    monkeypatch.setattr(ForecastPolicy, "predict", recording_predict)
    monkeypatch.setattr(ForecastPolicy, "expected_next_use", recording_expected)
    model = edgerun.load(stores["mixtral"])
    experts = offload(model, slots=12, depth=4)
    model.generate_ids(PROMPT, 24, temperature=0, ignore_eos=True)
    assert max(given) >= 3  # hints from three layers back were given
    assert read and max(read) <= 2, read
    experts.close()


def test_the_first_layers_are_protected_while_the_disk_has_time_to_spare(stores, monkeypatch):
    """Decoding with a disk that is idle (its reads made to take no time), the policy is told to keep the layers the
    read-ahead cannot reach, as many as the budget allows; with a disk that reads all the time (its read time made
    to follow the clock), or without read-ahead, none."""
    protected = []
    protect = ForecastPolicy.protect

    def recording_protect(self, layers):
        protected.append(layers)
        protect(self, layers)
    monkeypatch.setattr(ForecastPolicy, "protect", recording_protect)

    def decode(share, busy=False, prefetch=True):
        protected.clear()
        monkeypatch.setattr(offload_module, "PROTECTED_SHARE", share)
        model = edgerun.load(stores["mixtral"])
        experts = offload(model, slots=16, depth=2, prefetch=prefetch)
        read_seconds = (lambda self: time.perf_counter()) if busy else (lambda self: 0.0)
        monkeypatch.setattr(type(experts.reader), "read_seconds", property(read_seconds, lambda self, value: None),
                            raising=False)
        model.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True)
        experts.close()
        assert len(protected) >= 10  # told at every decoded token after the first
        return experts
    # 16 slots of 8-expert layers: all the experts of 2 layers fill a whole cache, of 1 half of it
    experts = decode(1.0)
    assert protected[-1] == 2 <= experts.depth  # the depth adapts; the budget allows 2
    assert decode(0.5) and protected[-1] == 1
    assert decode(0.25) and set(protected) == {0}  # none at a quarter
    assert decode(1.0, busy=True) and set(protected) == {0}
    assert decode(1.0, prefetch=False) and set(protected) == {0}  # without read-ahead every miss stalls


def test_a_token_whose_experts_are_all_in_memory_takes_one_kernel_call(stores, monkeypatch):
    import torch

    from edgerun import native
    from edgerun.runtime.experts import RoutedExperts

    want = edgerun.load(stores["mixtral"]).generate_ids(PROMPT, 6, temperature=0, ignore_eos=True)
    model = edgerun.load(stores["mixtral"])
    experts = offload(model, slots=32)  # every expert of the 4 MoE layers
    assert model.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True) == want  # reads what it uses
    calls = {"routed": 0, "one": 0}
    routed, ffn = native.routed_experts, native.expert_ffn

    def count_routed(*a, **k):
        calls["routed"] += 1
        return routed(*a, **k)

    def count_ffn(x, *a, **k):
        calls["one"] += x.shape[0] == 1
        return ffn(x, *a, **k)
    monkeypatch.setattr(native, "routed_experts", count_routed)
    monkeypatch.setattr(native, "expert_ffn", count_ffn)
    resumed = []
    layers = native.decode_layers
    monkeypatch.setattr(native, "decode_layers", lambda *a: resumed.append(a[-5]) or layers(*a))
    # through the decode step's calls (runtime/fused.py), the layers kernel computes them from their slots
    assert model._engine.decoder.token_layers.in_slots
    assert model.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True) == want
    steps = experts.decode_tokens  # of this generation (the prompt's last token, reused, is one more step)
    assert calls == {"routed": 0, "one": 0} and sum(resumed) >= 4 * steps > 0 and sum(resumed) % 4 == 0
    # through the parts: one call of the container's a layer
    model._engine.decoder.token_layers = None
    assert model.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True) == want
    assert calls["one"] == 0 and calls["routed"] >= 4 * steps > 0 and calls["routed"] % 4 == 0
    # the same sum as expert by expert
    x, idx, w = torch.randn(1, 64), torch.tensor([[5, 2]]), torch.tensor([[0.7, 0.3]])
    assert torch.allclose(experts(0, x, idx, w), RoutedExperts.__call__(experts, 0, x, idx, w), atol=1e-5)
    # a token with an expert to read computes expert by expert, as its reads arrive
    tight = edgerun.load(stores["mixtral"])
    offload(tight, slots=4)
    calls.update(routed=0, one=0)
    assert tight.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True) == want
    assert calls["one"] > 0
    experts.close()


# -- the reader ----------------------------------------------------------------------------------------------
def buffers(store: ExpertStore, n: int) -> list[np.ndarray]:
    import mmap

    mem = mmap.mmap(-1, n * store.chunk_bytes)
    data = np.frombuffer(mem, dtype=np.uint8)
    return [data[i * store.chunk_bytes:(i + 1) * store.chunk_bytes] for i in range(n)]


def test_reader_reads_chunks_with_and_without_direct_io(stores):
    store = ExpertStore(stores["mixtral"])
    for direct in (False, None):
        reader = ExpertReader(store, direct=direct)
        bufs = buffers(store, 2)
        reqs = [reader.submit(None, 1, e, bufs[i], demand=i == 0) for i, e in enumerate((3, 5))]
        for req in reqs:
            reader.wait(req)
        assert np.array_equal(bufs[0], store.map_expert(1, 3)) and np.array_equal(bufs[1], store.map_expert(1, 5))
        assert reader.bytes_read == 2 * store.chunk_bytes
        reader.close()


def test_reader_counts_the_time_its_reads_take(stores, monkeypatch):
    """read_seconds is the time spent in read calls: with each call made to take 20 ms, two chunks read in a piece
    each count 40 ms or more, and waiting for them with the disk idle counts nothing."""
    store = ExpertStore(stores["mixtral"])
    real = os.preadv

    def slow_preadv(fd, bufs, offset):
        time.sleep(0.02)
        return real(fd, bufs, offset)
    monkeypatch.setattr(reader_module.os, "preadv", slow_preadv)
    reader = ExpertReader(store, direct=False)
    bufs = buffers(store, 2)
    start = time.perf_counter()
    for i, e in enumerate((3, 5)):
        reader.wait(reader.submit(None, 1, e, bufs[i], demand=True))
    busy = reader.read_seconds
    assert 0.04 <= busy <= time.perf_counter() - start
    time.sleep(0.05)
    assert reader.read_seconds == busy
    reader.close()


def gated_preadv(monkeypatch):
    """Make the reader's first read block until the returned event is set, and log each read's file."""
    gate, log = threading.Event(), []
    real = os.preadv

    def preadv(fd, bufs, offset):
        log.append(os.readlink(f"/proc/self/fd/{fd}"))
        if len(log) == 1:
            gate.wait(10)
        return real(fd, bufs, offset)

    monkeypatch.setattr(reader_module.os, "preadv", preadv)
    return gate, log


def test_demand_reads_overtake_prefetches_and_cancelled_ones_never_run(stores, monkeypatch):
    store = ExpertStore(stores["mixtral"])
    monkeypatch.setattr(reader_module, "PIECE", 4096)  # a running prefetch yields between pieces
    gate, log = gated_preadv(monkeypatch)
    reader = ExpertReader(store, workers=1, direct=False)
    bufs = buffers(store, 4)
    first = reader.submit(None, 0, 0, bufs[0], demand=False)  # running, held at its first piece
    while not log:
        time.sleep(0.001)
    stale = reader.submit(None, 0, 1, bufs[1], demand=False)
    later = reader.submit(None, 0, 2, bufs[2], demand=False)
    urgent = reader.submit(None, 0, 3, bufs[3], demand=True)
    reader.cancel(stale)
    assert stale.state == CANCELLED and stale.done.is_set()
    gate.set()
    for req in (urgent, first, later):
        reader.wait(req)
    assert first.state == DONE and np.array_equal(bufs[0], store.map_expert(0, 0))
    order = [p for i, p in enumerate(log) if i == 0 or p != log[i - 1]]
    chunk = lambda e: str(expert_chunk_path(store.path, 0, e))  # noqa: E731
    assert chunk(1) not in log  # the cancelled prefetch never read a byte
    assert order.index(chunk(3)) < order.index(chunk(2))  # the demand read went first
    assert order[1] == chunk(3)  # ... and even paused the running prefetch
    assert not bufs[1].any()
    reader.close()


def test_speculative_reads_make_way_for_prefetches(stores, monkeypatch):
    store = ExpertStore(stores["mixtral"])
    monkeypatch.setattr(reader_module, "PIECE", 4096)  # a running read yields between pieces
    monkeypatch.setattr(reader_module, "SPECULATIVE_PIECE", 4096)
    gate, log = gated_preadv(monkeypatch)
    reader = ExpertReader(store, workers=1, direct=False)
    bufs = buffers(store, 3)
    guess = reader.submit(None, 0, 0, bufs[0], demand=False, speculative=True)  # running, held at its first piece
    while not log:
        time.sleep(0.001)
    later = reader.submit(None, 0, 1, bufs[1], demand=False, speculative=True)
    prefetch = reader.submit(None, 0, 2, bufs[2], demand=False)
    gate.set()
    for req in (prefetch, guess, later):
        reader.wait(req)
    order = [p for i, p in enumerate(log) if i == 0 or p != log[i - 1]]
    chunk = lambda e: str(expert_chunk_path(store.path, 0, e))  # noqa: E731
    # the prefetch paused the running speculative read, which then went on ahead of the one queued after it
    assert order == [chunk(0), chunk(2), chunk(0), chunk(1)]
    for e in range(3):
        assert np.array_equal(bufs[e], store.map_expert(0, e))
    reader.close()


def test_reads_of_one_priority_go_in_the_order_of_their_layers(stores, monkeypatch):
    """Behind a running read, queued prefetches go earliest layer first, whatever order they came in, and a
    speculative read promoted to a prefetch (taken into the cache) joins them by its layer, ahead of the other
    speculative reads."""
    store = ExpertStore(stores["mixtral"])
    gate, log = gated_preadv(monkeypatch)
    reader = ExpertReader(store, workers=1, direct=False)
    bufs = buffers(store, 6)
    running = reader.submit(None, 0, 0, bufs[0], demand=False)  # held at its first piece
    while not log:
        time.sleep(0.001)
    reqs = [reader.submit(None, 3, 1, bufs[1], demand=False), reader.submit(None, 1, 2, bufs[2], demand=False),
            reader.submit(None, 1, 3, bufs[3], demand=False, speculative=True),
            reader.submit(None, 2, 4, bufs[4], demand=False, speculative=True),
            reader.submit(None, 2, 5, bufs[5], demand=False)]
    reader.promote(reqs[3], reader_module.PREFETCH)
    reader.promote(reqs[0], reader_module.SPECULATIVE)  # never lowers a priority
    gate.set()
    for req in [running, *reqs]:
        assert req.done.wait(10)  # not reader.wait: it would make the read a demand read
    order = [p for i, p in enumerate(log) if i == 0 or p != log[i - 1]]
    assert order == [str(expert_chunk_path(store.path, layer, e)) for layer, e in
                     [(0, 0), (1, 2), (2, 4), (2, 5), (3, 1), (1, 3)]]
    for i, (layer, e) in enumerate([(0, 0), (3, 1), (1, 2), (1, 3), (2, 4), (2, 5)]):
        assert np.array_equal(bufs[i], store.map_expert(layer, e))
    reader.close()


def test_forecasts_the_cache_declines_are_read_into_scratch_slots_and_change_nothing_it_holds(stores, monkeypatch):
    monkeypatch.setattr(offload_module, "SPECULATE_PRECISION", 0.0)  # whatever the tiny model's routers forecast
    # a policy and a read-ahead depth that do not change with the disk's pace
    monkeypatch.setattr(offload_module, "PROTECTED_SHARE", 0.0)
    monkeypatch.setattr(offload_module, "MAX_PREFETCH_DEPTH", 2)
    resident = edgerun.load(stores["mixtral"])
    want = resident.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True)
    want_logits = resident.logits(PROMPT[:6] + want, decode=True)

    def run(speculate: bool):
        model = edgerun.load(stores["mixtral"])
        experts = offload(model, slots=6, depth=2)
        experts.speculate = speculate
        held, now = [], {}
        schedule, admit = experts.schedule, experts.cache.admit

        def scheduled(layer, chosen):  # what the cache holds as each layer begins
            now["pos"] = experts.pos[layer]
            held.append(sorted(experts.cache.resident()))
            return schedule(layer, chosen)

        def admit_now(key, pinned=()):  # the cache takes the layer being computed only: it declines every forecast
            return admit(key, pinned) if key[0] == now.get("pos") else None
        monkeypatch.setattr(experts, "schedule", scheduled)
        monkeypatch.setattr(experts.cache, "admit", admit_now)
        assert model.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True) == want
        stats = model.stats()
        logits = model.logits(PROMPT[:6] + want, decode=True)
        return model, experts, stats, held, logits

    model, experts, stats, held, logits = run(True)
    plain_model, plain, plain_stats, plain_held, plain_logits = run(False)
    assert np.array_equal(logits, want_logits) and np.array_equal(plain_logits, want_logits)
    assert plain_stats["speculative_reads"] == 0
    assert 0 < stats["speculative_reads_used"] <= stats["speculative_reads"]
    assert stats["demand_read_rate"] < plain_stats["demand_read_rate"]  # they were read ahead instead
    assert held == plain_held  # a read ahead is cached only where the policy takes it, as its demand read would be
    # a cache that declines every expert: the layer's own reads take the scratch slots, stopping reads ahead
    monkeypatch.setattr(experts.cache, "admit", lambda key, pinned=(): None)
    steals = []
    drop = experts._drop_ahead
    monkeypatch.setattr(experts, "_drop_ahead", lambda key: steals.append(key) or drop(key))
    assert np.array_equal(model.logits(PROMPT[:6] + want, decode=True), want_logits)
    assert model.stats()["speculative_reads"] > 0 and steals
    experts.close(), plain.close()


def test_when_the_layers_read_ahead_need_nothing_the_first_further_layer_that_does_is_read_into_scratch(
        stores, monkeypatch):
    """Layers 1 and 2 replace every light miss, so a read-ahead of depth 1 from layer 1 finds nothing to read: the
    experts that layer 3 will need are read then, into scratch slots, instead of when layer 2 runs."""
    monkeypatch.setattr(offload_module, "SPECULATE_PRECISION", 0.0)  # whatever the tiny model's routers forecast
    monkeypatch.setattr(offload_module, "MAX_PREFETCH_DEPTH", 1)  # a depth that does not grow
    monkeypatch.setattr(offload_module, "PROTECTED_SHARE", 0.0)
    monkeypatch.setattr(offload_module, "SLACK_LIMIT", 0.0)  # as if the disk set the pace, as it does not here
    sub = [0.0, 0.99, 0.99, 0.0]

    def run(speculate: bool):
        model = edgerun.load(stores["mixtral"])
        experts = offload(model, slots=6, depth=1, substitute_below=sub)
        experts.speculate = speculate
        far, now = [], {"further": False}
        read_ahead, read_further = experts._read_ahead, experts._read_further

        def further(pos):
            now["pos"], now["further"] = pos, True
            try:
                read_further(pos)
            finally:
                now["further"] = False

        def read(key, low=False):  # reads ahead into scratch past the depth (not those of forecasts within it)
            if now["further"]:
                far.append((now["pos"], key))
            return read_ahead(key, low)
        monkeypatch.setattr(experts, "_read_further", further)
        monkeypatch.setattr(experts, "_read_ahead", read)
        tokens = model.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True)
        return model, experts, tokens, model.stats(), far

    model, experts, tokens, stats, far = run(True)
    plain_model, plain, plain_tokens, plain_stats, plain_far = run(False)
    assert tokens == plain_tokens  # what a token computes does not depend on when its experts were read
    assert not plain_far and plain_stats["speculative_reads"] == 0
    # read from layer 1 for layer 3, past the depth: layer 2 replaces its light misses and reads nothing
    assert far and all(key[0] - pos > 1 for pos, key in far)
    assert {pos for pos, _ in far} <= {0, 1} and any(key[0] == 3 for _, key in far)
    assert 0 < stats["speculative_reads_used"] <= stats["speculative_reads"]
    # nothing is read from that far where forecasts from there do not come true often enough, nor where the disk
    # does not set the pace (it reads less than SLACK_LIMIT of the decoded tokens' time)
    for name in ("SPECULATE_PRECISION", "SLACK_LIMIT"):
        with monkeypatch.context() as m:
            m.setattr(offload_module, name, 1.01)
            far.clear()
            model.generate_ids(PROMPT, 4, temperature=0, ignore_eos=True)
            assert not far
    far.clear()
    model.generate_ids(PROMPT, 4, temperature=0, ignore_eos=True)
    assert far
    experts.close(), plain.close()


def test_read_errors_surface_without_hanging(stores, monkeypatch):
    store = ExpertStore(stores["mixtral"])

    def failing(fd, bufs, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(reader_module.os, "preadv", failing)
    reader = ExpertReader(store, direct=False)
    req = reader.submit(None, 2, 6, buffers(store, 1)[0], demand=True)
    with pytest.raises(CheckpointError, match="layer 2 expert 6.*Input/output error"):
        reader.wait(req)
    reader.close()


def test_damaged_chunk_fails_generation_with_a_clear_error(stores, tmp_path):
    import shutil

    store_dir = tmp_path / "store"
    shutil.copytree(stores["mixtral"], store_dir)
    model = edgerun.load(store_dir)
    offload(model, slots=4)
    for e in range(8):
        path = expert_chunk_path(store_dir, 0, e)
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch in layer 0 expert"):
        model.generate_ids(PROMPT, 4, temperature=0, ignore_eos=True)
    # truncated after opening: a short read, reported, not a hang
    model = edgerun.load(stores["mixtral"])
    experts = offload(model, slots=4)
    monkey_size = experts.store.chunk_bytes
    experts.store = experts.reader.store = ExpertStore(store_dir)
    for e in range(8):
        os.truncate(expert_chunk_path(store_dir, 1, e), monkey_size // 2)
    with pytest.raises(CheckpointError, match="layer [01] expert"):
        model.generate_ids(PROMPT, 4, temperature=0, ignore_eos=True)


def test_a_failed_read_into_a_scratch_slot_gives_the_slot_back(stores, monkeypatch):
    """With a cache that declines every expert, each is read into a scratch slot; when one of those reads fails,
    the step raises, and the next generation has every scratch slot and decodes as the resident model does."""
    resident = edgerun.load(stores["mixtral"])
    want = resident.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True)
    model = edgerun.load(stores["mixtral"])
    experts = offload(model, slots=4)
    experts.speculate = False
    monkeypatch.setattr(experts.cache, "admit", lambda key, pinned=(): None)
    read, calls = experts.reader._read, []

    def failing_once(req):
        calls.append(req)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return read(req)
    monkeypatch.setattr(experts.reader, "_read", failing_once)
    with pytest.raises(CheckpointError, match="Input/output error"):
        model.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True)
    assert model.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True) == want
    assert sorted(experts._scratch_free) == list(range(4, 4 + experts.top_k)) and not experts._scratch
    assert experts.stats()["demand_read_rate"] == 1.0  # every expert was read into a scratch slot
    experts.close()


# -- traces and bench ----------------------------------------------------------------------------------------
def test_run_records_a_routing_trace(stores, tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    assert main(["run", str(stores["mixtral"]), "-p", "Hello there", "-n", "5", "--temp", "0",
                 "--trace-out", str(trace)]) == 0
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    layers = sorted({r["layer"] for r in rows})
    assert layers == [0, 1, 2, 3]
    tokens = {r["token_idx"] for r in rows}
    assert len(rows) == 4 * len(tokens) and len(tokens) >= 5
    assert all(len(r["experts"]) == 2 and abs(sum(r["gating_probs"]) - 1) < 1e-3 for r in rows)
    steps = read_trace(trace)
    assert len(steps) == len(rows)
    assert main(["trace", "replay", str(trace), "--capacity", "8", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["accesses"] == 2 * len(rows) and 0 <= result["hit_rate"] <= result["belady_hit_rate"] <= 1


def test_bench_with_a_budget_reports_the_offload_figures(stores, capsys, monkeypatch):
    budget = budget_for(stores["mixtral"], 8, monkeypatch)
    assert main(["bench", str(stores["mixtral"]), "--ram", str(budget), "--cold", "--json", "--prompt-tokens",
                 "16", "--tokens", "8", "--repeats", "1", "--no-kernels", "--ctx", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "prefetch_recall", "bytes_read",
                "peak_rss_bytes", "ram_budget_bytes"):
        assert key in result, key
    assert result["offload"] and result["expert_slots"] == 8 and result["bytes_read"] > 0
    assert result["ram_budget_bytes"] == budget
    # the disk's share of the decode time (one reader thread: at most all of it), its rate, the waits per token
    assert 0 < result["read_busy_share"] <= 1 and result["decode_read_bytes_per_s"] > 0
    # 8 new tokens: the first from the prompt's pass, then 7 decode steps
    assert result["read_stall_per_token"] * 7 == pytest.approx(result["read_stall_seconds"])


def test_a_store_that_fits_is_read_into_the_page_cache_after_loading(stores, monkeypatch, capsys):
    store = ExpertStore(stores["mixtral"])
    model = edgerun.load(store.path)
    files = [p for part in ("dense", "experts") for p in (store.path / part).rglob("0") if p.is_file()]  # chunks
    deadline = time.monotonic() + 30
    while not model.stats()["warmup"]["done"] and time.monotonic() < deadline:
        time.sleep(0.05)
    warm = model.stats()["warmup"]
    assert warm["done"] and warm["error"] is None and warm["bytes"] == sum(p.stat().st_size for p in files)
    assert "warmup" not in edgerun.load(store.path, prefetch=False).stats()  # read-ahead off
    budget = budget_for(store.path, 8, monkeypatch)
    assert "warmup" not in edgerun.load(store.path, context_length=64, ram=budget).stats()  # streaming instead
    # bench --cold reports the first generation after loading on its own
    assert main(["bench", str(store.path), "--cold", "--json", "--prompt-tokens", "8", "--tokens", "4",
                 "--repeats", "1", "--no-kernels"]) == 0
    cold = json.loads(capsys.readouterr().out)["cold_run"]
    assert cold["time_to_first_token_s"] > 0 and cold["decode_tokens_per_s"] > 0 and "warmup" in cold


def test_the_read_ahead_reads_every_file_in_order_and_stops_when_asked(tmp_path):
    from edgerun.runtime.warmup import PageCacheWarmer

    files = [tmp_path / "empty", tmp_path / "small", tmp_path / "large"]
    for path, size in zip(files, (0, 5000, 9 << 20)):
        path.write_bytes(os.urandom(size))
    warm = PageCacheWarmer(files)
    deadline = time.monotonic() + 30
    while not warm.done and warm.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert warm.stats() == {**warm.stats(), "bytes": 5000 + (9 << 20), "done": True, "error": None}
    # a file cut short while mapped (rewritten under a running model) is an error, where touching its pages would
    # kill the process with SIGBUS
    from edgerun.runtime import warmup
    from edgerun.store.store import map_file

    data = map_file(files[2])
    files[2].write_bytes(b"")
    try:
        if warmup._populate(data[: 4 << 20]):
            pytest.fail("populating pages past the end of the file succeeded")
        pytest.skip("this kernel has no MADV_POPULATE_READ")  # the warmer reads with read() instead
    except OSError as e:
        assert "reading ahead" in str(e)
    files[2].write_bytes(os.urandom(9 << 20))
    stopped = PageCacheWarmer([tmp_path / "large"] * 50)
    stopped.stop()
    time.sleep(0.5)
    assert not stopped.done and stopped.bytes < 50 * (9 << 20)


def test_light_experts_missing_from_ram_are_left_out_when_asked(stores, monkeypatch):
    from edgerun import native

    monkeypatch.setattr(native, "INT_DOT", False)  # one token at a time computes as a prefill does
    exact = edgerun.load(stores["mixtral"])
    ids = exact.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True)
    want = exact.logits(PROMPT + ids)
    model = edgerun.load(stores["mixtral"])
    experts = offload(model, slots=4, prefetch=False, skip_below=0.999)  # every miss but a lone expert's
    got = model.logits(PROMPT + ids, decode=True)
    stats = model.stats()
    # decode steps read nothing: what is missing is left out, never read
    assert stats["skipped_experts"] > 0 and stats["decode_bytes_read"] == 0 and 0 < stats["skipped_rate"] < 1
    assert np.allclose(got[0], want[0], atol=1e-4)  # the first token is a prompt: computed exactly
    assert not np.allclose(got, want, atol=1e-3)  # and decoding without those experts changes the logits
    # exact modes stay exact: with skip_below 0 token-by-token decoding gives the prefill's logits
    experts.close()
    experts = offload(model, slots=4, prefetch=False)
    assert np.allclose(model.logits(PROMPT + ids, decode=True), want, atol=1e-4)
    assert model.stats()["skipped_experts"] == 0
    experts.close()
    # read-ahead does not read what its forecast weighs below the threshold: with it on, decoding reads nothing
    experts = offload(model, slots=4, depth=2, skip_below=0.999)
    model.logits(PROMPT + ids, decode=True)
    assert model.stats()["decode_bytes_read"] == 0 and model.stats()["skipped_experts"] > 0
    experts.close()
    with pytest.raises(EdgerunError, match="skip_below must be"):
        edgerun.load(stores["mixtral"], skip_below=1.5)


def test_light_experts_missing_from_ram_are_replaced_by_experts_in_memory_when_asked(stores, monkeypatch):
    import torch

    from edgerun import native

    monkeypatch.setattr(native, "INT_DOT", False)
    exact = edgerun.load(stores["mixtral"])
    ids = exact.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True)
    want = exact.logits(PROMPT + ids)
    model = edgerun.load(stores["mixtral"])
    experts = offload(model, slots=8, prefetch=False, substitute_below=0.999)  # every miss but a lone expert's
    real, seen = experts._light_misses, {"substituted": 0, "reads": 0}

    def checked(layer, x, chosen, weights, probs=None):
        # what the routing asked for against what is computed, the router's probabilities computed here
        pos = experts.pos[layer]
        router = torch.softmax(x.float() @ model.decoder.moe[layer].router.w["router"].float().T, dim=-1)[0]
        cached = {e for e in range(8) if experts.cache.contains((pos, e))}
        got_idx, got_w = real(layer, x, chosen, weights, probs)
        assert len(got_idx) == len(chosen)  # nothing left out without skip_below
        for k, (e, w) in enumerate(zip(chosen, weights)):
            sub, sub_w = got_idx[k], got_w[k]
            free = [c for c in cached if c not in chosen and c not in got_idx[:k]]
            if e in cached or not free:
                assert (sub, sub_w) == (e, pytest.approx(w))  # in memory, or nothing to stand in: as routed
                seen["reads"] += e not in cached
                continue
            assert sub == max(free, key=lambda c: float(router[c]))  # the most probable expert in memory
            assert sub_w == pytest.approx(w * float(router[sub] / router[e]), rel=1e-4)
            seen["substituted"] += 1
        return got_idx, got_w
    experts._light_misses = checked
    got = model.logits(PROMPT + ids, decode=True)
    stats = model.stats()
    assert seen["substituted"] > 0 and stats["substituted_experts"] == seen["substituted"]
    assert 0 < stats["substituted_rate"] < 1
    # a replaced expert is never read: decoding reads only the misses nothing stood in for
    assert stats["decode_bytes_read"] == seen["reads"] * experts.store.chunk_bytes
    assert np.allclose(got[0], want[0], atol=1e-4)  # the first token is a prompt: computed exactly
    assert not np.allclose(got, want, atol=1e-3)
    experts.close()
    # with skip_below as well, a light miss below it is left out, never replaced; those from it up are replaced
    experts = offload(model, slots=8, prefetch=False, substitute_below=0.999, skip_below=0.3)
    real, seen = experts._light_misses, {"left out": 0, "replaced": 0}

    def banded(layer, x, chosen, w, probs=None):
        pos = experts.pos[layer]
        missing = [k for k, e in enumerate(chosen) if not experts.cache.contains((pos, e))]
        got, got_w = real(layer, x, chosen, w, probs)
        lightest = [k for k in missing if w[k] < 0.3]
        assert len(got) == len(chosen) - len(lightest) and not {chosen[k] for k in lightest} & set(got)
        seen["left out"] += len(lightest)
        seen["replaced"] += sum(chosen[k] not in got for k in missing if 0.3 <= w[k])  # a stand-in is not chosen
        return got, got_w
    experts._light_misses = banded
    model.logits(PROMPT + ids, decode=True)
    stats = model.stats()
    assert stats["skipped_experts"] == seen["left out"] > 0 and stats["substituted_experts"] == seen["replaced"] > 0
    experts.close()
    with pytest.raises(EdgerunError, match="substitute_below must be"):
        edgerun.load(stores["mixtral"], substitute_below=-0.1)


def test_run_and_bench_take_the_substitution_threshold(stores, capsys, monkeypatch):
    budget = budget_for(stores["mixtral"], 6, monkeypatch)
    args = ["--ram", str(budget), "--ctx", "64", "--substitute-below", "0.999"]
    assert main(["bench", str(stores["mixtral"]), *args, "--tokens", "8", "--prompt-tokens", "8", "--repeats", "1",
                 "--no-kernels"]) == 0
    out = capsys.readouterr().out
    assert "replaced by experts in memory (weight below 0.999)" in out and "\ndisk       reading " in out
    assert main(["run", str(stores["mixtral"]), *args, "-p", "Hi", "-n", "6", "--temp", "0"]) == 0
    err = capsys.readouterr().err
    figures = err.strip().splitlines()[-1]
    assert "% substituted" in figures and "expert hits" in figures and "note:" not in err
    assert re.search(r", disk busy \d+% of decode", figures)
    # with every expert in RAM the option is taken, changes nothing, and the run says so in one line
    assert main(["run", str(stores["mixtral"]), "--ctx", "64", "--substitute-below", "0.5", "--low-when-late", "-p",
                 "Hi", "-n", "2", "--temp", "0"]) == 2  # low_when_late needs a store's low-bit copies
    capsys.readouterr()
    assert main(["run", str(stores["mixtral"]), "--ctx", "64", "--substitute-below", "0.5", "--skip-below", "0.2",
                 "-p", "Hi", "-n", "2", "--temp", "0"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert notes == ["edgerun: note: every expert is in RAM, so --skip-below and --substitute-below change nothing"]
    assert main(["run", str(stores["mixtral"]), "--substitute-below", "2", "-p", "Hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "routing weights go from 0 up to 1" in err[0]


def test_reader_threads_end_with_the_model(stores):
    import gc

    model = edgerun.load(stores["mixtral"])
    reader = offload(model, slots=4).reader
    model.generate_ids(PROMPT, 2, temperature=0, ignore_eos=True)
    assert all(t.is_alive() for t in reader._threads)
    del model
    gc.collect()
    assert not any(t.is_alive() for t in reader._threads)
