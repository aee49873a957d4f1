"""The decoder's seams: parts declare the tensors, the router object serves decoder and read-ahead alike, the
attention parts size the KV cache, `load` and `edgerun plan` place a model the same way, and the engine talks to
its experts container through the declared contract only."""

from __future__ import annotations

import dataclasses
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import edgerun
from edgerun.checkpoint.safetensors_reader import SafetensorsReader
from edgerun.hw.plan import BASELINE_BYTES, predict
from edgerun.hw.profile import load_profile
from edgerun.models import FAMILIES, mixtral, spec_from_config
from edgerun.models.decoder import Decoder
from edgerun.models.parts import Part, TensorSpec, linear
from edgerun.models.routers import Routing
from edgerun.runtime import placement
from edgerun.runtime.offload import OffloadedExperts
from edgerun.store.convert import convert
from edgerun.store.store import ExpertStore
from hf_models import build, save
from test_grok import make_weights, write
from test_grok2 import make_weights as grok2_weights
from test_grok2 import write_release

PROMPT = [3, 17, 90, 5, 64, 12, 7, 81, 33, 2, 45, 88, 9, 71, 56, 23]
HF_FAMILIES = ["mixtral", "qwen2_moe", "qwen2_moe_step", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
               "glm4_moe", "gpt_oss"]
FAMILY_NAMES = HF_FAMILIES + ["grok-1", "grok-2"]
PROFILE = load_profile(Path(__file__).parent.parent / "profiles" / "cloud-vm-2core-epyc.json")


def checkpoint(name: str, path):
    """A tiny random checkpoint of the family, four MoE layers where the family allows, in its HF layout."""
    if name == "grok-1":
        weights, cfg = make_weights("real")
        return write(path, weights, cfg)
    if name == "grok-2":  # the release's layout: tensor-parallel shards, "model_type": "git"
        weights, cfg = grok2_weights("exaggerated")
        return write_release(path, weights, {**cfg, "num_hidden_layers": 2})
    overrides = {"num_hidden_layers": 4}
    if name.startswith("qwen2_moe"):
        overrides["layer_types"] = ["full_attention"] * 4
    return save(build(name, **overrides), path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("parts")
    return {name: checkpoint(name, base / name) for name in FAMILY_NAMES}


@pytest.fixture(scope="module")
def stores(sources, tmp_path_factory):
    base = tmp_path_factory.mktemp("parts-stores")
    return {name: convert(src, base / name, quant="q4", progress=False) for name, src in sources.items()}


# -- the parts declare the tensors -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_declared_tensors_are_exactly_the_checkpoints(sources, name):
    """The union of the parts' declarations names every tensor of a real checkpoint of the family, and nothing
    else (per-expert tensors stand for the fused expert tensors they are stacked into)."""
    cfg = json.loads((sources[name] / "config.json").read_text())
    family, spec = spec_from_config(cfg)
    declared = Decoder(spec).tensors()
    found = set()
    rules = [(re.compile(p + "$"), r) for p, r in family.RULES]
    for src in SafetensorsReader(sources[name], split=getattr(family, "TP_SPLIT", ())).names():
        canonical = next(rx.sub(r, src) for rx, r in rules if rx.match(src))
        found.add(re.sub(r"experts\.\d+\.(gate|up)$", "experts.gate_up", re.sub(r"experts\.\d+\.down$",
                                                                                "experts.down", canonical)))
    assert found == set(declared)
    # the experts container holds the experts, and Grok-2's residual MLP, which it streams like them
    held = (".experts.", ".mlp.") if name == "grok-2" else (".experts.",)
    assert all(t.expert == any(h in n for h in held) for n, t in declared.items())
    assert all(t.exact for n, t in declared.items() if n.endswith(("norm", "router", "shared_gate", "bias")))
    assert not any(t.exact for n, t in declared.items() if n.endswith((".q", ".k", ".v", ".o", "embed")))


# -- one router object for the decoder and the read-ahead --------------------------------------------------------
class Recording:
    """An experts container that notes the routing it is handed and the steps it is told of, and hands the work
    to the container it wraps."""

    def __init__(self, inner):
        self.inner, self.calls, self.steps = inner, [], []

    def __call__(self, layer, x, idx, weights):
        self.calls.append((layer, idx.clone()))
        return self.inner(layer, x, idx, weights)

    def begin_step(self, phase, tokens):
        self.steps.append((phase, tokens))
        self.inner.begin_step(phase, tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def forecast_matches_decoder(model: edgerun.Model, seeds=range(6)) -> int:
    """Checks, on random hidden states, that the offloading container's forecast for each later MoE layer is the
    set of experts that layer's MoE part hands to its container; returns how many comparisons were made."""
    experts = OffloadedExperts(ExpertStore(model.path), model.spec.activation, slots=8, depth=4)
    recording = Recording(experts)
    previous = model.use_experts(recording)
    decoder = model.decoder
    layers = decoder.moe_layers
    compared = 0
    for seed in seeds:
        h = torch.randn(1, model.spec.hidden_size, generator=torch.Generator().manual_seed(seed)) * 3
        for pos, layer in enumerate(layers[:-1]):
            ahead = experts.forecast(pos, decoder.blocks[layer].ffn_norm(h))
            for j, (picked, _, _) in ahead.items():
                target = layers[j]
                recording.calls.clear()
                decoder.blocks[target].ffn(decoder.blocks[target].ffn_norm(h))
                (called_layer, idx), = recording.calls
                assert called_layer == target
                assert sorted(picked) == sorted(idx[0].tolist()), (seed, layer, target)
                compared += 1
    model.use_experts(previous)
    experts.close()
    return compared


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_read_ahead_forecast_is_what_the_decoder_picks(stores, name):
    model = edgerun.load(stores[name])
    assert forecast_matches_decoder(model) >= 6


class LowestLogits(Part):
    """A router unlike every real one: the K experts with the *lowest* logits, equal weights."""

    def __init__(self, spec, layer):
        super().__init__(f"layers.{layer}.")
        self.E, self.K, self.D = spec.num_experts, spec.top_k, spec.hidden_size

    def declare(self):
        return {"router": TensorSpec((self.E, self.D), exact=True)}

    def __call__(self, x):
        logits = linear(x, self.w["router"]).float()
        idx = torch.topk(-logits, self.K, dim=-1).indices
        return Routing(idx, torch.full(idx.shape, 1 / self.K, dtype=x.dtype), torch.softmax(-logits, -1))


def test_a_new_router_is_a_part_and_a_small_family(tmp_path, monkeypatch):
    """A family with its own router kind needs a part and a family module; the read-ahead follows it."""
    family = types.ModuleType("lowest")
    family.ARCHITECTURES, family.RULES, family.ModelArgs = ("LowestForCausalLM",), mixtral.RULES, mixtral.ModelArgs
    family.to_spec = lambda args, cfg: dataclasses.replace(mixtral.to_spec(args, cfg), model_type="lowest",
                                                           router=LowestLogits)
    monkeypatch.setitem(FAMILIES, "lowest", family)
    hf = build("mixtral", num_hidden_layers=4)
    src = save(hf, tmp_path / "mixtral")
    cfg = json.loads((src / "config.json").read_text())
    lowest_src = tmp_path / "lowest"
    lowest_src.mkdir()
    for f in src.iterdir():
        (lowest_src / f.name).write_bytes(f.read_bytes())
    (lowest_src / "config.json").write_text(json.dumps({**cfg, "model_type": "lowest"}))
    plain, lowest = edgerun.load(src), edgerun.load(lowest_src)
    assert not np.allclose(plain.logits(PROMPT), lowest.logits(PROMPT), atol=1e-3)  # the router really differs
    store = convert(lowest_src, tmp_path / "store", quant="q8", progress=False)
    model = edgerun.load(store)
    assert model.spec.router is LowestLogits
    assert forecast_matches_decoder(model) >= 6
    want = model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True)
    offloaded = edgerun.load(store)
    experts = OffloadedExperts(ExpertStore(store), offloaded.spec.activation, slots=4)
    offloaded.use_experts(experts)
    assert offloaded.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True) == want
    assert offloaded.stats()["prefetch_recall"] > 0.5  # read-ahead follows the new router
    experts.close()


# -- the engine announces every step -----------------------------------------------------------------------------
def test_the_engine_announces_prefill_and_decode_steps(stores, monkeypatch):
    monkeypatch.setattr(placement, "PREFILL_CHUNK", 10)
    model = edgerun.load(stores["mixtral"])
    recording = Recording(model.experts)
    model.use_experts(recording)
    ids = (PROMPT * 2)[:23]
    out = model.generate_ids(ids, 4, temperature=0, ignore_eos=True)
    assert recording.steps == [("prefill", 10), ("prefill", 10), ("prefill", 3)] + [("decode", 1)] * 3
    recording.steps.clear()
    # the cache holds the prompt and all but the last new token: the whole of it is one token more, which is a
    # one-token prefill, not a decode step
    assert len(model.generate_ids(ids + out, 2, temperature=0, ignore_eos=True)) == 2
    assert model.stats()["cached_prompt_tokens"] == len(ids + out) - 1
    assert recording.steps == [("prefill", 1), ("decode", 1)]


# -- attention parts size the cache; one placement path for load and plan -----------------------------------------
@pytest.mark.parametrize("quant", ["q8", "bf16"])
def test_kv_cache_is_the_size_the_attention_parts_report(sources, tmp_path, quant):
    store = convert(sources["qwen3_moe"], tmp_path / quant, quant=quant, progress=False)
    stats = edgerun.load(store, context_length=100).stats()
    spec = edgerun.load(store).spec
    elem = 2 if quant == "bf16" else 4  # an all-bf16 store computes (and caches) in bf16
    assert stats["kv_cache_bytes"] == stats["memory_plan"]["kv_cache_bytes"] == \
        2 * spec.num_layers * spec.num_kv_heads * 100 * spec.head_dim * elem


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_plan_and_load_place_a_model_alike(stores, name, monkeypatch):
    monkeypatch.setattr(edgerun.api, "current_rss", lambda: BASELINE_BYTES)
    store = ExpertStore(stores[name])
    ctx = 96
    loose = predict(store.config, PROFILE, expert_format="q4", dense_format="q8", ram=64 << 30, ctx=ctx)
    total, slot, minimum = loose.experts_total, loose.memory_plan["slot_bytes"], loose.memory_plan["minimum_bytes"]
    slots = []
    for budget in (minimum, minimum + slot, minimum + (total + 4) * slot):
        planned = predict(store.config, PROFILE, expert_format="q4", dense_format="q8", ram=budget, ctx=ctx)
        loaded = edgerun.load(stores[name], ram=budget, context_length=ctx)
        got = loaded.stats()["memory_plan"]
        for key in ("resident_bytes", "kv_cache_bytes", "scratch_bytes", "slots", "prefill_chunk", "minimum_bytes"):
            assert planned.memory_plan[key] == got[key], (budget, key)
        assert planned.expert_slots == got["slots"]
        assert loaded.stats()["kv_cache_bytes"] == got["kv_cache_bytes"]
        if got["slots"] < total:
            settings = loaded.stats()["runtime_settings"]
            assert (planned.readers, planned.prefetch_depth) == (settings["readers"], settings["prefetch_depth"])
        loaded.experts.close()
        slots.append(got["slots"])
    assert slots[0] < slots[1] < total == slots[2]  # tight budgets really offload


# -- load's own errors -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="float64"), "dtype"), (dict(policy="mru"), "policy"), (dict(quant="q3"), "quant"),
    (dict(quant="q8", dense="q2"), "dense"), (dict(threads=0), "threads"), (dict(context_length=1), "context"),
    (dict(ram="lots", quant="q8"), "size"), (dict(dense="q8"), "dense"), (dict(ram="4GiB"), "budget"),
])
def test_bad_load_arguments_are_argument_errors(sources, kwargs, match):
    with pytest.raises(edgerun.ArgumentError, match=match) as e:
        edgerun.load(sources["mixtral"], **kwargs)
    assert isinstance(e.value, ValueError) and not isinstance(e.value, edgerun.GenerationError)


def test_a_missing_tensor_is_a_checkpoint_error_on_every_path(sources, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "m"
    src.mkdir()
    for f in sources["mixtral"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    from edgerun.checkpoint.source import locate
    from edgerun.store.convert import cached_store_path

    for quant in (None, "q8", "q4"):
        with pytest.raises(edgerun.CheckpointError, match="layers.2.k"):
            edgerun.load(src, quant=quant)
        if quant:  # refused before anything was written
            store = cached_store_path(locate(src), quant, None, 32)
            assert not store.exists() and not store.with_name(store.name + ".partial").exists()
