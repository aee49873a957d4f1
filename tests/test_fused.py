"""A decoded token through every layer in one kernel call (runtime/fused.py), or one call a layer where the layers'
own FFN parts compute the FFN: where each applies, what it computes (the parts' own logits, bit for bit) and where
it steps aside."""

from __future__ import annotations

import numpy as np
import pytest

import edgerun
from edgerun import native
from edgerun.store.convert import convert
from hf_models import build, save

PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88]

pytestmark = pytest.mark.skipif(not native.fusable(), reason="needs the numba kernels")


@pytest.fixture(scope="module")
def mixtral_src(tmp_path_factory):
    base = tmp_path_factory.mktemp("fused")
    return {window: save(build("mixtral", sliding_window=window), base / f"w{window}") for window in (None, 5)}


def counting(monkeypatch) -> list:
    calls = []
    kernel = native.decode_layers

    def count(*args):
        # (the first layer of the call, whether it resumes that layer's experts, whether it stops at every FFN, the
        # layer it returned at or -1)
        out = kernel(*args)
        calls.append((args[-6], args[-5], args[-2], out))
        return out
    monkeypatch.setattr(native, "decode_layers", count)
    return calls


@pytest.mark.parametrize("quant, dense, window, int_dot", [("q4", "q4", None, True), ("q4", "q8", 5, True),
                                                           ("q8", "q8", None, True), ("q4", "q4", 5, False)])
def test_a_decoded_token_is_one_call_with_the_parts_logits_bit_for_bit(mixtral_src, tmp_path, monkeypatch, quant,
                                                                      dense, window, int_dot):
    if not int_dot:  # the kernels of CPUs without int8 dot products: float activations
        monkeypatch.setattr(native, "INT_DOT", False)
    model = edgerun.load(convert(mixtral_src[window], tmp_path / "s", quant=quant, dense=dense, progress=False))
    assert model._engine.decoder.token_layers.expert_int8 == (native.INT_DOT and quant == "q4")
    decoder = model._engine.decoder
    step = decoder.token_layers
    assert step is not None
    calls = counting(monkeypatch)
    fused = model.logits(PROMPT, decode=True)
    # one call a one-token step (the first token's too), and one more from the layer of an expert mapped on first use
    resumed = [first for first, resume, *_ in calls if resume]
    assert len(calls) - len(resumed) == len(PROMPT) and 0 < len(resumed) <= step._mapped.sum()
    assert step.routes and not any(stop for _, _, stop, _ in calls)
    decoder.token_layers = None
    parts = model.logits(PROMPT, decode=True)
    assert np.array_equal(fused, parts)
    decoder.token_layers = step
    calls.clear()
    ids = model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True)
    # the prompt's last token (the others are cached from the logits above), then 7 decode steps
    assert len([c for c in calls if not c[1]]) == 8
    decoder.token_layers = None
    assert model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True) == ids


def test_observers_see_the_fused_routing(mixtral_src, tmp_path):
    model = edgerun.load(convert(mixtral_src[None], tmp_path / "s", quant="q4", progress=False))
    decoder = model._engine.decoder
    seen = []
    decoder.observers.append(lambda layer, idx, w: seen.append((layer, idx.tolist(), w.tolist())))
    model.logits(PROMPT[:4], decode=True)
    fused, step = list(seen), decoder.token_layers
    seen.clear()
    decoder.token_layers = None
    model.logits(PROMPT[:4], decode=True)
    assert step is not None and fused == seen and len(seen) == 4 * 2  # the first token and 3 decode steps, 2 layers
    # a position past the cache is refused before the kernel would write there
    import torch

    from edgerun.errors import ContextLengthError
    from edgerun.models.attention import Positions

    cache = model._engine.cache
    with pytest.raises(ContextLengthError, match="outside the context"):
        step(torch.zeros(1, model.spec.hidden_size), Positions(cache.context_length, 1, torch.float32, {}), cache)


def stepped_against_parts(model, monkeypatch) -> tuple[list, dict]:
    """Decode PROMPT's tokens through the stepped calls and through the parts, check they give the same logits bit
    for bit and the same greedy tokens, and return the stepped calls and the stepped generation's stats."""
    decoder = model._engine.decoder
    step = decoder.token_layers
    assert step is not None and not step.current()
    calls = counting(monkeypatch)
    stepped = model.logits(PROMPT, decode=True)
    ids = model.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True)
    stats = model.stats()
    decoder.token_layers = None
    assert np.array_equal(stepped, model.logits(PROMPT, decode=True))
    assert model.generate_ids(PROMPT, 6, temperature=0, ignore_eos=True) == ids
    decoder.token_layers = step
    return calls, stats


def test_experts_streamed_through_a_cache_are_computed_between_stepped_calls(mixtral_src, tmp_path, monkeypatch):
    from test_offload import budget_for

    path = convert(mixtral_src[None], tmp_path / "s", quant="q4", progress=False)
    model = edgerun.load(path, context_length=64, ram=budget_for(path, 4, monkeypatch))
    step = model._engine.decoder.token_layers
    assert model.stats()["offload"] and not step.routes and step.in_slots
    calls, stats = stepped_against_parts(model, monkeypatch)
    layers = len(model._engine.decoder.blocks)
    # each one-token step (the prompt's tokens one by one, then the last prompt token and 5 decode steps) stops at
    # every layer's FFN; there the layer's experts are computed by the kernel, resuming that layer, where they are
    # all whole in slots, else by the container (reads under way), and the next call starts at the next layer
    tokens, kernel_computed, container_computed, stopped = 0, 0, 0, None
    for first, resume, stop, out in calls:
        assert stop
        if resume:
            assert first == stopped
            kernel_computed += 1
        elif first == 0:
            assert stopped in (None, -1, layers - 1)
            tokens += 1
        else:
            assert first == stopped + 1
            container_computed += 1
        assert out == (first + resume if first + resume < layers else -1)
        stopped = out
    assert tokens == len(PROMPT) + 6 and kernel_computed and container_computed
    assert stats["generated_tokens"] == 6 and stats["hit_rate"] + stats["prefetch_hit_rate"] < 1 < stats["bytes_read"]


def test_the_parts_path_stays_where_the_step_does_not_apply(mixtral_src, hf_dirs_fused, tmp_path, monkeypatch):
    from test_offload import FixedRouter

    path = convert(mixtral_src[None], tmp_path / "s", quant="q4", progress=False)
    # families with parts it does not cover (q/k norms, biases), and float weights
    for name, src in hf_dirs_fused.items():
        assert edgerun.load(convert(src, tmp_path / name, quant="q4", progress=False))._engine.decoder.token_layers \
            is None, name
    assert edgerun.load(mixtral_src[None])._engine.decoder.token_layers is None
    # routers replaced after loading (as a routing trace does): stepped calls, whose FFN parts follow them
    model = edgerun.load(path)
    assert model._engine.decoder.token_layers.current()
    seen = []
    model.decoder.observers.append(lambda layer, idx, w: seen.append(idx.tolist()))
    for part in model._engine.decoder.moe.values():
        part.router = FixedRouter(part.router)
    calls, _ = stepped_against_parts(model, monkeypatch)
    assert calls and all(stop and not resume for _, resume, stop, _ in calls)
    assert seen and all(idx == [[0, 1]] * len(idx) for idx in seen)


@pytest.fixture(scope="module")
def hf_dirs_fused(tmp_path_factory):
    base = tmp_path_factory.mktemp("others")
    return {family: save(build(family), base / family) for family in ("qwen2_moe", "qwen3_moe", "olmoe")}
