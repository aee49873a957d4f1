"""Low-bit copies of a q4 store's experts: the format, the copies in a store, and decoding that reads them for light
experts missing from RAM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgerun
from edgerun import native
from edgerun.cli import main
from edgerun.errors import CheckpointError, EdgerunError
from edgerun.runtime.offload import OffloadedExperts
from edgerun.store import lowbit, quant
from edgerun.store.convert import convert
from edgerun.store.store import ExpertStore
from edgerun.synthetic import mixtral_config, write_random_mixtral

PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88, 9, 101, 56, 23]


def decode_codes(sections: list[np.ndarray], fmt: str, group: int = 32) -> np.ndarray:
    """The values a copy stands for, read straight from its bit planes as the format's description lays them out
    (not through its q4 form)."""
    lo, scales = sections[0], sections[-1]
    o, ng = scales.shape
    codes = np.zeros((o, ng, group), dtype=np.int32)
    plane = lo.reshape(o, ng, group // 4).astype(np.int32)
    for pair in range(4):
        codes[:, :, pair * group // 4:(pair + 1) * group // 4] = (plane >> (2 * pair)) & 3
    if fmt == "q3":
        hi = sections[1].reshape(o, ng, group // 8).astype(np.int32)
        for bit in range(8):
            codes[:, :, bit * group // 8:(bit + 1) * group // 8] |= ((hi >> bit) & 1) << 2
    values = codes + lowbit.LEVELS[fmt][0]
    return (values * scales.astype(np.float32)[..., None]).reshape(o, -1)


# -- the format --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt, bound", [("q3", 0.18), ("q2", 0.35)])
def test_a_copy_round_trips_within_its_bound_and_its_q4_form_is_exact(fmt, bound):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 200)).astype(np.float32)
    w[3, :32] = 0  # a group of zeros
    sections = lowbit.quantize(w, fmt)
    assert [s.shape for s in sections] == lowbit.packed_shapes(fmt, 96, 200)
    bits = sum(s.nbytes for s in sections) * 8 / (96 * quant.padded_in_features(200))
    assert bits == lowbit.BITS[fmt] + 0.5  # and a float16 scale per 32 values
    direct = decode_codes(sections, fmt)[:, :200]
    assert np.linalg.norm(direct - w) / np.linalg.norm(w) < bound
    assert not direct[3, :32].any()
    assert np.array_equal(lowbit.dequantize_low(sections, fmt, 200), direct)  # the q4 form holds the same values
    # a coarser grid is coarser: q2 loses more than q3, which loses more than q4
    q4 = quant.dequantize(*quant.quantize(w, "q4"), 200)
    assert np.linalg.norm(q4 - w) < np.linalg.norm(direct - w)


@pytest.mark.parametrize("fmt", lowbit.FORMATS)
def test_the_kernels_make_the_references_copy_byte_for_byte(fmt):
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, (130, 200)).astype(np.float32)
    w[5, :64] = 0
    w[7, 40:72] = 1e-6  # scales below float16's normal range
    got, want = native.quantize_low(w, fmt), lowbit.quantize(w, fmt)
    assert [a.dtype for a in got] == [a.dtype for a in want] and all(np.array_equal(a, b) for a, b in zip(got, want))
    qs, scales = quant.quantize(w, "q4")
    assert np.array_equal(native.dequantize_q4(qs, scales), quant.dequantize(qs, scales, qs.shape[1] * 2))


@pytest.mark.parametrize("fmt", lowbit.FORMATS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_kernels_expand_a_copy_as_numpy_does_at_every_group_size(fmt, group):
    w = np.random.default_rng(3).standard_normal((48, 256)).astype(np.float32)
    sections = lowbit.quantize(w, fmt, group)
    quarter = group // 4
    got, want = np.empty((48, 128), dtype=np.uint8), np.empty((48, 128), dtype=np.uint8)
    assert native.low_to_q4(sections, fmt, quarter, got)  # groups of 32 take their own flat loop
    lowbit._q4_words(sections, fmt, quarter, want)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("fmt", lowbit.FORMATS)
def test_scales_are_divided_as_float16_divides_them(fmt):
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    finite = every[np.isfinite(every)].reshape(-1, 8)
    got = np.empty_like(finite)
    lowbit.divided_scales(finite, fmt, got)
    assert np.array_equal(got.view(np.uint16), np.divide(finite, np.float16(lowbit.TO_Q4[fmt])).view(np.uint16))


def test_the_scale_search_beats_the_plain_scale():
    w = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    searched = decode_codes(lowbit.quantize(w, "q2"), "q2")
    plain = quant.dequantize(*quant.quantize(w, "q4"), 256)  # q4's scale rule, kept to the 4 levels of q2
    g = w.reshape(64, 8, 32)
    top = np.take_along_axis(g, np.argmax(np.abs(g), axis=2)[..., None], axis=2) / -2
    s = top.astype(np.float16).astype(np.float32)
    plain = (np.clip(np.rint(g / s), -2, 1) * s).reshape(64, 256)
    assert np.linalg.norm(searched - w) < 0.95 * np.linalg.norm(plain - w)


# -- copies in a store -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("lowbit")
    hf = write_random_mixtral(base / "hf", mixtral_config(128, 4, 8, 256, heads=4, kv_heads=2))
    convert(hf, base / "q4", quant="q4", progress=False)
    convert(hf, base / "plain", quant="q4", progress=False)
    convert(hf, base / "q8", quant="q8", progress=False)
    assert main(["convert", str(base / "q4"), "--low-bits", "q2"]) == 0
    return base


@pytest.mark.parametrize("fmt", ["q2", "q3"])
def test_copies_are_written_and_expand_to_the_experts_they_copy(stores, tmp_path, fmt, monkeypatch):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(stores / "plain", path)
    meta = lowbit.add_low_copies(path, fmt, progress=False)
    store = ExpertStore(path)
    layout = store.low_layout
    assert meta["format"] == fmt and layout.fmt == fmt and layout.nbytes < store.chunk_bytes
    ex = store.expert_layout
    for layer in store.moe_layers[:2]:
        for e in (0, 5):
            raw = np.fromfile(store.low_path(layer, e), dtype=np.uint8)
            store.verify_expert(layer, e, raw, low=True)
            chunk = np.zeros(store.chunk_bytes, dtype=np.uint8)
            layout.expand(raw, chunk)  # by the kernels
            with monkeypatch.context() as m:  # and by NumPy
                m.setattr(native, "_kernels", None)
                by_numpy = np.zeros_like(chunk)
                layout.expand(raw, by_numpy)
            assert np.array_equal(chunk, by_numpy) and native._kernels is not None
            # the q4 chunk made from the copy holds the copy's values, which are near the expert's own
            for (qs, scales), sections, (q_ref, s_ref), cols in zip(ex.views(chunk), layout.views(raw),
                                                                   store.expert_views(layer, e),
                                                                   (ex.hidden, ex.inter)):
                got = quant.dequantize(qs, scales, cols)
                assert np.array_equal(got, decode_codes(sections, fmt)[:, :cols])
                exact = quant.dequantize(q_ref, s_ref, cols)
                assert 0 < np.linalg.norm(got - exact) / np.linalg.norm(exact) < (0.2 if fmt == "q3" else 0.4)


def test_damaged_or_missing_copies_are_caught(stores, tmp_path):
    import shutil

    path = tmp_path / "store"
    shutil.copytree(stores / "q4", path)
    store = ExpertStore(path)
    raw = np.fromfile(store.low_path(1, 2), dtype=np.uint8)
    raw[100] ^= 0xFF
    with pytest.raises(CheckpointError, match="checksum mismatch in layer 1 expert 2.*low-bit copies"):
        store.verify_expert(1, 2, raw, low=True)
    with open(store.low_path(1, 2), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="low-bit copy"):
        ExpertStore(path)


def test_copies_need_a_q4_store_and_the_command_line_says_what_to_do(stores, capsys):
    with pytest.raises(EdgerunError, match="made for q4 experts"):
        lowbit.add_low_copies(stores / "q8", "q2", progress=False)
    with pytest.raises(EdgerunError, match="unknown low-bit format"):
        lowbit.add_low_copies(stores / "plain", "q1", progress=False)
    assert main(["convert", str(stores / "plain")]) == 2
    assert "already a store" in capsys.readouterr().err
    with pytest.raises(EdgerunError, match="no low-bit copies"):
        edgerun.load(stores / "plain", low_below=0.3)
    with pytest.raises(EdgerunError, match="low_below must be"):
        edgerun.load(stores / "q4", low_below=1.0)
    with pytest.raises(EdgerunError, match="no low-bit copies of its experts for low_when_late"):
        edgerun.load(stores / "plain", low_when_late=True)
    with pytest.raises(EdgerunError, match="low_when_late must be True or False"):
        edgerun.load(stores / "q4", low_when_late="yes")


# -- decoding with them ------------------------------------------------------------------------------------------
def offload(model: edgerun.Model, slots: int, **kwargs) -> OffloadedExperts:
    experts = OffloadedExperts(ExpertStore(model.path), model.spec.activation, slots, **kwargs)
    model.use_experts(experts).close()
    return experts


def one_layer(stores, monkeypatch, **approximate):
    """The q4 model with its experts streaming through 4 slots (no read-ahead, the given approximate settings), its
    first MoE layer, an input x [1, D], and out(e, copy=True): expert e's output for x, computed by the kernel from
    its copy expanded into a q4 chunk (or, copy=False, from its chunk)."""
    monkeypatch.setattr(native, "INT_DOT", False)  # one token at a time computes as a prefill does
    model = edgerun.load(stores / "q4")
    experts = offload(model, slots=4, prefetch=False, **approximate)
    store, layer, x = experts.store, experts.store.moe_layers[0], torch.randn(1, 128)

    def out(e: int, copy: bool = True) -> np.ndarray:
        chunk = store.map_expert(layer, e)
        if copy:
            chunk = np.zeros(store.chunk_bytes, dtype=np.uint8)
            store.low_layout.expand(np.fromfile(store.low_path(layer, e), dtype=np.uint8), chunk)
        (gq, gs), (dq, ds) = store.expert_layout.views(chunk)
        y = np.empty((1, x.shape[1]), dtype=np.float32)
        native.expert_ffn(x.numpy(), gq, gs, dq, ds, experts.activation, y)
        return y
    return model, experts, layer, x, out


def test_a_light_miss_is_computed_from_its_copy_and_a_heavy_one_from_its_chunk(stores, monkeypatch):
    model, experts, layer, x, ffn = one_layer(stores, monkeypatch, low_below=0.3)
    store = experts.store
    idx, weights = torch.tensor([[6, 1]]), torch.tensor([[0.8, 0.2]])
    experts.begin_step("decode", 1)
    got = experts(layer, x, idx, weights)

    heavy = ffn(6, copy=False)
    want = 0.8 * heavy + 0.2 * ffn(1)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    assert not np.allclose(got.numpy(), 0.8 * heavy + 0.2 * ffn(1, copy=False), atol=1e-4)
    stats = experts.stats()
    assert stats["low_reads"] == 1 and stats["low_served"] == 1 and stats["bytes_read"] == (
        store.chunk_bytes + store.low_layout.nbytes)
    # the same copy, now needed with a heavy weight, is read over by the chunk first
    experts.begin_step("decode", 1)
    got = experts(layer, x, torch.tensor([[1, 6]]), torch.tensor([[0.7, 0.3]]))
    assert np.allclose(got.numpy(), 0.7 * ffn(1, copy=False) + 0.3 * heavy, atol=1e-5)
    assert experts.stats()["low_read_overs"] == 1 and experts.stats()["low_served"] == 1
    experts.close()


def test_a_late_expert_is_read_from_its_copy_whatever_its_weight_and_serves_heavier_tokens(stores, monkeypatch):
    """low_when_late: a decoded token's experts that no read-ahead brought are read from their copies, heavy or
    light; the copies then serve a heavy token too (nothing is read) and are marked for the upgrade."""
    model, experts, layer, x, ffn = one_layer(stores, monkeypatch, low_when_late=True)
    store = experts.store

    experts.begin_step("decode", 1)
    got = experts(layer, x, torch.tensor([[6, 1]]), torch.tensor([[0.8, 0.2]]))
    assert np.allclose(got.numpy(), 0.8 * ffn(6) + 0.2 * ffn(1), atol=1e-5)
    stats = experts.stats()
    assert stats["low_reads"] == 2 and stats["bytes_read"] == 2 * store.low_layout.nbytes
    assert stats["low_when_late"] and stats["low_below"] == 0
    experts.begin_step("decode", 1)
    got = experts(layer, x, torch.tensor([[1, 6]]), torch.tensor([[0.7, 0.3]]))
    assert np.allclose(got.numpy(), 0.7 * ffn(1) + 0.3 * ffn(6), atol=1e-5)
    stats = experts.stats()
    assert stats["bytes_read"] == 2 * store.low_layout.nbytes and stats["low_served"] == 4
    assert stats["low_read_overs"] == 0 and experts._upgrade == {(0, 1), (0, 6)}
    # a prefill still computes the exact experts: the chunks are read over the copies
    experts.begin_step("prefill", 1)
    experts(layer, x, torch.tensor([[1, 6]]), torch.tensor([[0.7, 0.3]]))
    assert experts.stats()["low_read_overs"] == 2
    experts.close()


def test_a_copy_in_memory_stands_in_for_a_light_miss_as_it_is(stores, monkeypatch):
    """With copies and replacements both on, a copy in the cache stands in for a light miss as a chunk would, and is
    computed as it is: neither read over by its chunk nor read again."""
    model, experts, layer, x, ffn = one_layer(stores, monkeypatch, low_below=0.999, substitute_below=0.5)
    store = experts.store

    experts.begin_step("decode", 1)
    experts(layer, x, torch.tensor([[6, 1]]), torch.tensor([[0.8, 0.2]]))  # nothing in memory yet: both read
    assert experts.stats()["low_reads"] == 2 and experts.stats()["substituted_experts"] == 0
    experts.begin_step("decode", 1)
    got = experts(layer, x, torch.tensor([[2, 3]]), torch.tensor([[0.7, 0.3]]))
    router = torch.softmax(x @ model.decoder.moe[layer].router.w["router"].float().T, dim=-1)[0]
    sub = max((6, 1), key=lambda e: float(router[e]))  # the more probable of the copies in memory
    want = 0.7 * ffn(2) + 0.3 * float(router[sub] / router[3]) * ffn(sub)
    assert np.allclose(got.numpy(), want, atol=1e-5)
    stats = experts.stats()
    assert stats["substituted_experts"] == 1 and stats["low_read_overs"] == 0
    assert stats["low_reads"] == 3 and stats["bytes_read"] == 3 * store.low_layout.nbytes  # only expert 2 read
    experts.close()


def test_a_copy_read_ahead_into_scratch_serves_a_light_token_and_is_dropped_for_a_heavy_one(stores, monkeypatch):
    """A forecast the cache declines is read ahead into a scratch slot as a copy when its forecast weight is below
    low_below; the token that then weighs it below too computes the copy, one that weighs it more reads the chunk."""
    model, experts, layer, x, ffn = one_layer(stores, monkeypatch, low_below=0.5)
    for light, heavy in ((2, 6), (5, 1)):
        experts.begin_step("decode", 1)
        experts._read_ahead((0, light), low=True)
        experts._read_ahead((0, heavy), low=True)
        got = experts(layer, x, torch.tensor([[heavy, light]]), torch.tensor([[0.7, 0.3]]))
        assert np.allclose(got.numpy(), 0.7 * ffn(heavy, False) + 0.3 * ffn(light, True), atol=1e-5)
        assert not experts._ahead
        # the cache took the copy from its scratch slot (4 slots, nothing to evict) and knows it for a copy: a token
        # that weighs it more reads the chunk over it; this token is the first it served (UPGRADE_AFTER counts them)
        assert experts.cache.contains((0, light)) and experts._low[(0, light)] == 1
    stats = experts.stats()
    assert stats["low_reads"] == 4 and stats["low_served"] == 2
    experts.close()


def test_experts_read_ahead_stay_exact_with_low_when_late(stores):
    """Decoding with read-ahead: what the read-ahead brings is read as chunks, what it missed as copies, so the
    bytes read lie between exact decoding's and that of copies for every miss."""
    model = edgerun.load(stores / "q4")
    ids = model.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True)
    runs = {}
    for name, kwargs in (("exact", {}), ("late", {"low_when_late": True}), ("all", {"low_below": 0.999})):
        experts = offload(model, slots=8, **kwargs)
        model.logits(PROMPT + ids, decode=True)
        runs[name] = experts.stats()
        experts.close()
    late = runs["late"]
    assert late["prefetch_precision"] > 0  # the read-ahead ran
    assert late["low_reads"] > 0 and runs["exact"]["low_reads"] == 0
    assert late["low_reads"] < runs["all"]["low_reads"]
    assert runs["all"]["decode_bytes_read"] < late["decode_bytes_read"] < runs["exact"]["decode_bytes_read"]


def test_decoding_with_copies_reads_fewer_bytes_and_exact_stays_exact(stores, monkeypatch):
    monkeypatch.setattr(native, "INT_DOT", False)  # one token at a time computes as a prefill does
    exact = edgerun.load(stores / "plain")
    ids = exact.generate_ids(PROMPT, 10, temperature=0, ignore_eos=True)
    want = exact.logits(PROMPT + ids)
    model = edgerun.load(stores / "q4")
    runs = {}
    for low in (0.0, 0.999):
        experts = offload(model, slots=4, prefetch=False, low_below=low)
        runs[low] = (model.logits(PROMPT + ids, decode=True), model.stats())
        experts.close()
    got, stats = runs[0.999]
    assert stats["low_reads"] > 0 and stats["low_served"] >= stats["low_reads"] and stats["low_format"] == "q2"
    assert stats["decode_bytes_read"] < 0.8 * runs[0.0][1]["decode_bytes_read"]
    assert np.allclose(got[0], want[0], atol=1e-4)  # the prompt's first token: a prefill, computed exactly
    assert not np.allclose(got, want, atol=1e-3)
    # off, the copies change nothing
    assert np.allclose(runs[0.0][0], want, atol=1e-4) and runs[0.0][1]["low_reads"] == 0


def test_a_copy_used_again_is_upgraded_when_the_disk_is_idle(stores):
    model = edgerun.load(stores / "q4")
    experts = offload(model, slots=16, prefetch=False, low_below=0.999)
    upgraded = []
    read_over = experts._read_over_low

    def record(key, layer, e, slot, demand=True):
        if not demand:  # the background upgrades
            upgraded.append(key)
        read_over(key, layer, e, slot, demand)
    experts._read_over_low = record
    model.generate_ids(PROMPT, 24, temperature=0, ignore_eos=True)
    stats = experts.stats()
    assert stats["low_served"] > stats["low_reads"] > 0 and stats["low_upgrades"] == len(upgraded) > 0
    # an upgraded expert still cached as such (not evicted and read as a copy again since) holds its exact chunk
    kept = [k for k in upgraded if experts.cache.contains(k) and k not in experts._low]
    assert kept
    for pos, e in kept:
        req = experts._pending.get((pos, e))
        if req is not None:
            experts.reader.wait(req)
        slot = experts.cache.slot_of((pos, e))
        assert np.array_equal(experts.pool.buffer(slot), experts.store.map_expert(experts.layers[pos], e))
    experts.close()


def test_the_memory_plan_counts_each_readers_buffer_for_copies(stores, monkeypatch):
    """A copy is read into its reader's own buffer before it is expanded into a slot: with copies on, the plan
    counts one such buffer per reader among the scratch, and the slots give way to them."""
    from test_offload import budget_for

    store = ExpertStore(stores / "q4")
    budget = budget_for(stores / "q4", 6, monkeypatch)  # half a slot above 6 slots: less than a copy's buffer
    assert store.low_layout.nbytes > store.chunk_bytes // 2
    plans = {}
    for low in (0.0, 0.999):
        model = edgerun.load(stores / "q4", context_length=64, ram=budget, low_below=low)
        stats = model.stats()
        plans[low] = stats["memory_plan"], stats["runtime_settings"]["readers"], model.experts.capacity
    (exact, _, exact_slots), (copies, readers, slots) = plans[0.0], plans[0.999]
    assert copies["scratch_bytes"] - exact["scratch_bytes"] == readers * store.low_layout.nbytes
    assert copies["fixed_bytes"] + slots * copies["slot_bytes"] <= budget
    assert slots == copies["slots"] < exact_slots == exact["slots"] == 6


def test_load_and_bench_take_the_threshold(stores, capsys, monkeypatch):
    from test_offload import budget_for

    budget = budget_for(stores / "q4", 6, monkeypatch)
    model = edgerun.load(stores / "q4", context_length=64, ram=budget, low_below=0.999)
    model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True)
    stats = model.stats()
    assert stats["offload"] and stats["low_below"] == 0.999 and stats["low_reads"] > 0
    assert main(["bench", str(stores / "q4"), "--ram", str(budget), "--low-below", "0.999", "--tokens", "8",
                 "--prompt-tokens", "8", "--repeats", "1", "--no-kernels", "--ctx", "64"]) == 0
    out = capsys.readouterr().out
    assert "served by q2 copies (weight below 0.999)" in out
    assert main(["bench", str(stores / "q4"), "--ram", str(budget), "--low-when-late", "--tokens", "8",
                 "--prompt-tokens", "8", "--repeats", "1", "--no-kernels", "--ctx", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["low_when_late"] and result["low_below"] == 0 and result["low_served_rate"] > 0
    assert main(["run", str(stores / "q4"), "--ram", str(budget), "--ctx", "64", "--low-below", "0.999", "-p", "Hi",
                 "-n", "6", "--temp", "0"]) == 0
    figures = capsys.readouterr().err.strip().splitlines()[-1]
    assert "% from q2 copies" in figures and "expert hits" in figures
