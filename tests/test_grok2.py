"""Grok-2 as xai-org released it, against the plain reference of grok2_reference.py.

The tiny random checkpoints are written the way the release is: config.json with "model_type": "git", every
tensor family in its own `pytorch_model-000NN-TP-common.safetensors`, and the experts sliced across eight
tensor-parallel rank files (w1 and w3 along dim 0, w2 along dim 1). Their scales are chosen so that every
Grok-2 detail changes the result: soft caps are reached, the attention temperature engages, the top-2 router
weights do not sum to 1, the residual MLP and the multipliers matter.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import edgerun
from edgerun.cli import main
from edgerun.models import spec_from_config
from edgerun.store.convert import convert
from edgerun.store.store import ExpertStore
from grok2_reference import forward, greedy

PROMPT = [3, 17, 90, 5, 64, 12, 7, 81, 33, 2, 45, 88, 9, 71, 56, 23]
STEPS = 8
TOL = 1e-4
RANKS = 8
Q8_LOGIT_TOLERANCE = 0.1  # as for the other families: max |logit error| <= 0.1 std(logits)

RELEASE_KEYS = {  # the release's config keys that do not change the tiny model's sizes
    "architectures": ["Grok1ForCausalLM"], "model_type": "git", "torch_dtype": "float32", "residual_moe": True,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "sliding_window_size": -1,
    "global_attn_every_n": 1, "rope_type": "original", "original_max_position_embeddings": 8192,
    "scaling_factor": 16.0, "extrapolation_factor": 1.0, "attn_factor": 1.0, "beta_fast": 8, "beta_slow": 1,
}
SIZES = {"vocab_size": 288, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
         "max_position_embeddings": 256}
VARIANTS = {
    # the release's multipliers, caps, temperature length and rope theta
    "real": dict(config={"embedding_multiplier_scale": 90.50966799187809, "output_multiplier_scale": 0.5,
                         "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0,
                         "final_logit_softcapping": 50, "attn_temperature_len": 1024, "rope_theta": 208533496},
                 embed=0.004, qk=0.9, router=0.12, final_norm=60.0, seed=3),
    # caps, multipliers and temperature small enough that each one visibly changes a 24-token run
    "exaggerated": dict(config={"embedding_multiplier_scale": 20.0, "output_multiplier_scale": 3.0,
                                "attn_logit_softcapping": 4.0, "router_logit_softcapping": 3.0,
                                "final_logit_softcapping": 6.0, "attn_temperature_len": 5, "rope_theta": 10000.0},
                        embed=0.02, qk=0.3, router=0.6, final_norm=4.0, seed=5),
}
# the release's values with attention logits below the cap: a random model this small is chaotic where its
# attention is near one-hot, and 8-bit weights are held to the other families' bound on a calm one
VARIANTS["calm"] = dict(VARIANTS["real"], qk=0.1, seed=4)


def make_weights(variant: str) -> tuple[dict, dict]:
    v = VARIANTS[variant]
    cfg = {**RELEASE_KEYS, **SIZES, **v["config"]}
    g = torch.Generator().manual_seed(v["seed"])
    V, D, I, Ie = cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["moe_intermediate_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]

    def randn(*shape, std):
        return (torch.randn(*shape, generator=g) * std).contiguous()

    def norm(mean):  # uneven around mean: "x * w" and "x * (1 + w)" disagree, and read-ahead must rescale
        return (mean * (1 + 0.3 * torch.randn(D, generator=g))).contiguous()

    w = {"model.embed_tokens.weight": randn(V, D, std=v["embed"]), "lm_head.weight": randn(V, D, std=v["embed"]),
         "model.norm.weight": norm(v["final_norm"])}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        w |= {f"{p}.self_attn.q_proj.weight": randn(nh * hd, D, std=v["qk"]),
              f"{p}.self_attn.k_proj.weight": randn(nkv * hd, D, std=v["qk"]),
              f"{p}.self_attn.v_proj.weight": randn(nkv * hd, D, std=0.2),
              f"{p}.self_attn.o_proj.weight": randn(D, nh * hd, std=0.2),
              f"{p}.block_sparse_moe.gate.weight": randn(cfg["num_local_experts"], D, std=v["router"]),
              f"{p}.mlp.gate_proj.weight": randn(I, D, std=0.15), f"{p}.mlp.up_proj.weight": randn(I, D, std=0.15),
              f"{p}.mlp.down_proj.weight": randn(D, I, std=0.15)}
        for e in range(cfg["num_local_experts"]):
            x = f"{p}.block_sparse_moe.experts.{e}"
            w |= {f"{x}.w1.weight": randn(Ie, D, std=0.15), f"{x}.w3.weight": randn(Ie, D, std=0.15),
                  f"{x}.w2.weight": randn(D, Ie, std=0.15)}
        for name in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm"):
            w[f"{p}.{name}.weight"] = norm(1.0)
    return w, cfg


# the release's files: one tensor family per common file, the experts' w1 / w2 / w3 in rank files 6 / 7 / 8
COMMON = ["model.embed_tokens", "lm_head", "model.norm", "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj", None, None,
          None, "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj", "pre_attn_norm",
          "post_attn_norm", "pre_moe_norm", "post_moe_norm", "block_sparse_moe.gate"]
SLICED = {6: ("w1", 0), 7: ("w2", 1), 8: ("w3", 0)}


def write_release(path, weights: dict, cfg: dict, tokenizer: bool = True):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    written = []
    for number, family in enumerate(COMMON):
        if family is None:
            proj, dim = SLICED[number]
            mine = {n: t for n, t in weights.items() if re.search(rf"\.experts\.\d+\.{proj}\.weight$", n)}
            for rank in range(RANKS):
                part = {n: t.chunk(RANKS, dim=dim)[rank].contiguous() for n, t in mine.items()}
                save_file(part, str(path / f"pytorch_model-{number:05d}-TP-{rank:03d}.safetensors"))
        else:
            mine = {n: t for n, t in weights.items() if n.startswith(family) or f".{family}." in n}
            save_file(mine, str(path / f"pytorch_model-{number:05d}-TP-common.safetensors"))
        written += mine
    assert sorted(written) == sorted(weights)  # every tensor in exactly one family
    if tokenizer:
        write_tok_json(path / "tokenizer.tok.json")
    return path


def write_tok_json(path):
    """A byte-level table in the release's format: the 256 bytes, then the three named special tokens."""
    specials = ["<|pad|>", "<|separator|>", "<|eos|>"]
    data = {"regular_tokens": [{"bytes": [b], "token": b} for b in range(256)],
            "special_tokens": [{"bytes": list(s.encode()), "token": 256 + i} for i, s in enumerate(specials)],
            "word_split": "V1"}
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module", params=list(VARIANTS))
def release(request, tmp_path_factory):
    weights, cfg = make_weights(request.param)
    return request.param, weights, cfg, write_release(tmp_path_factory.mktemp(request.param), weights, cfg)


# -- the reference on its own -------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["real", "exaggerated"])
def test_reference_exercises_caps_temperature_and_routing(variant):
    weights, cfg = make_weights(variant)
    stats = {}
    logits = forward(weights, cfg, PROMPT + greedy(weights, cfg, PROMPT, STEPS)[0], stats)
    assert torch.isfinite(logits).all() and 0.3 < logits.std().item() < 30
    assert stats["max_attn_logit"] > 2 * cfg["attn_logit_softcapping"]  # the attention cap is reached
    used = {e for pair in stats["experts"] for e in pair}
    assert len(used) >= 6 and len(set(stats["experts"])) > 4 and stats["min_route_gap"] > 1e-4
    if variant == "exaggerated":
        assert stats["max_router_logit"] > 2 * cfg["router_logit_softcapping"]
        assert max(stats["topk_mass"]) < 0.95  # renormalising the top-2 weights would show
        assert logits.abs().max() > 0.8 * cfg["final_logit_softcapping"]  # the final cap bends the logits


def test_reference_every_grok2_detail_matters():
    weights, cfg = make_weights("exaggerated")
    base = forward(weights, cfg, PROMPT)
    changes = [("attn_logit_softcapping", 0), ("router_logit_softcapping", 0), ("final_logit_softcapping", None),
               ("attn_temperature_len", -1), ("residual_moe", False), ("embedding_multiplier_scale", 1.0),
               ("output_multiplier_scale", 1.0), ("rope_theta", 500.0)]
    for key, value in changes:
        assert (forward(weights, {**cfg, key: value}, PROMPT) - base).abs().max() > 100 * TOL, key


# -- edgerun against the reference ------------------------------------------------------------------------------
def test_the_release_layout_is_what_was_written(release):
    _, _, _, path = release
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) == 15 + 3 * RANKS
    assert "pytorch_model-00006-TP-007.safetensors" in files and "pytorch_model-00017-TP-common.safetensors" in files


def test_recognised_as_grok2_by_its_keys(release):
    _, _, cfg, _ = release
    family, spec = spec_from_config(cfg)
    assert spec.model_type == "grok-2" and spec.ffn[0].__name__ == "ResidualMoE" and spec.activation == "gelu"
    grok1 = {k: v for k, v in cfg.items() if k not in ("residual_moe", "moe_intermediate_size", "num_local_experts",
                                                       "router_logit_softcapping", "attn_logit_softcapping",
                                                       "final_logit_softcapping", "attn_temperature_len")}
    grok1.update(model_type="grok-1", num_experts=8, rope_type=None)
    assert spec_from_config(grok1)[1].model_type == "grok-1"
    with pytest.raises(edgerun.UnsupportedModelError, match="'git'"):
        spec_from_config({k: v for k, v in cfg.items() if k != "architectures"})


def check_against_reference(model: edgerun.Model, weights: dict, cfg: dict, tol: float = TOL):
    want = forward(weights, cfg, PROMPT).numpy()
    got = model.logits(PROMPT)
    assert got.shape == want.shape and np.abs(got - want).max() <= tol
    assert np.abs(model.logits(PROMPT, decode=True) - want).max() <= tol  # one decode step per token
    tokens, margin = greedy(weights, cfg, PROMPT, STEPS)
    assert margin > 10 * tol
    assert model.generate_ids(PROMPT, STEPS, temperature=0, ignore_eos=True) == tokens


def test_logits_and_greedy_match_the_reference(release):
    _, weights, cfg, path = release
    model = edgerun.load(path)
    assert model.spec.model_type == "grok-2" and model.stats()["dtype"] == "float32"
    check_against_reference(model, weights, cfg)


def q8_round_trip(weights: dict) -> dict:
    """The weights a q8 store holds: every matrix but the routers through 8 bits and back."""
    from edgerun.store import quant

    def rt(t):
        return torch.from_numpy(quant.dequantize(*quant.quantize(t.numpy(), "q8", 32), t.shape[1]))
    return {n: rt(t) if t.dim() == 2 and not n.endswith("gate.weight") else t for n, t in weights.items()}


def test_q8_store_and_an_offloaded_store(release, tmp_path):
    from edgerun.runtime.offload import OffloadedExperts

    variant, weights, cfg, path = release
    store = convert(path, tmp_path / "q8", quant="q8", progress=False)
    assert ExpertStore(store).expert_layout.fmt == "q8" and (store / "tokenizer" / "tokenizer.tok.json").is_file()
    resident = edgerun.load(store)
    # the store computes exactly the model its 8-bit weights define
    check_against_reference(resident, q8_round_trip(weights), cfg)
    got = resident.logits(PROMPT)
    continuation = greedy(q8_round_trip(weights), cfg, PROMPT, STEPS)[0]
    if variant == "calm":  # and stays as close to float32 as the other families' q8 stores
        want = forward(weights, cfg, PROMPT).numpy()
        assert np.abs(got - want).max() <= Q8_LOGIT_TOLERANCE * want.std()
    offloaded = edgerun.load(store)
    experts = OffloadedExperts(ExpertStore(store), offloaded.spec.activation, slots=4)
    offloaded.use_experts(experts)
    assert offloaded.generate_ids(PROMPT, STEPS, temperature=0, ignore_eos=True) == continuation
    stats = offloaded.stats()
    assert stats["offload"] and stats["expert_slots"] == 4 and stats["bytes_read"] > 0
    assert np.array_equal(offloaded.logits(PROMPT), got)
    experts.close()


def test_bf16_release_runs_in_bf16_close_to_float32(tmp_path):
    weights, cfg = make_weights("calm")
    path = write_release(tmp_path / "bf16", {n: t.to(torch.bfloat16) for n, t in weights.items()},
                         {**cfg, "torch_dtype": "bfloat16"})
    rounded = {n: t.to(torch.bfloat16).float() for n, t in weights.items()}
    exact = edgerun.load(path, dtype="float32")
    assert np.abs(exact.logits(PROMPT) - forward(rounded, cfg, PROMPT).numpy()).max() <= TOL
    auto = edgerun.load(path)
    assert auto.stats()["dtype"] == "bfloat16"
    want = forward(rounded, cfg, PROMPT).numpy()
    assert np.abs(auto.logits(PROMPT) - want).max() < 0.2 * want.std()


# -- what the release's files and config may get wrong -------------------------------------------------------
def copy(path, dst):
    shutil.copytree(path, dst)
    return dst


def test_a_missing_shard_is_named(release, tmp_path, capsys):
    _, _, _, path = release
    broken = copy(path, tmp_path / "m")
    (broken / "pytorch_model-00007-TP-005.safetensors").unlink()
    for quant in (None, "q8"):
        with pytest.raises(edgerun.CheckpointError, match="pytorch_model-00007-TP-005.safetensors"):
            edgerun.load(broken, quant=quant)
    assert main(["convert", str(broken), str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "00007-TP-005" in err and not (tmp_path / "s.partial").exists()


def test_slices_that_do_not_add_up_are_named(release, tmp_path):
    _, weights, cfg, path = release
    broken = copy(path, tmp_path / "m")
    name = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
    file = broken / "pytorch_model-00006-TP-002.safetensors"
    from safetensors.torch import load_file

    part = load_file(str(file))
    part[name] = part[name][:-1].contiguous()  # one row short in rank 2
    save_file(part, str(file))
    with pytest.raises(edgerun.CheckpointError, match=f"{name}.*do not add up"):
        edgerun.load(broken)
    # slices of equal shape that join to the wrong size: the joined shape is checked against the model's
    narrow = copy(path, tmp_path / "n")
    cfg2 = {**cfg, "moe_intermediate_size": cfg["moe_intermediate_size"] * 2}
    (narrow / "config.json").write_text(json.dumps(cfg2))
    with pytest.raises(edgerun.CheckpointError, match="8 tensor-parallel slices joined along dim 0"):
        edgerun.load(narrow, quant="q8")


@pytest.mark.parametrize("change,match", [
    ({"rope_type": "yarn"}, "rope_type"), ({"sliding_window_size": 4096}, "sliding_window_size"),
    ({"hidden_act": "silu"}, "hidden_act"), ({"attn_logit_softcapping_method": "clip"}, "method"),
    ({"mystery_scale": 2.0}, "mystery_scale"),
])
def test_config_keys_edgerun_does_not_implement_are_refused(release, tmp_path, capsys, change, match):
    _, _, cfg, path = release
    d = copy(path, tmp_path / "m")
    (d / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(edgerun.UnsupportedModelError, match=match):
        edgerun.load(d)
    assert main(["run", str(d), "-p", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json" in err and match in err


def test_chat_uses_the_release_format(release, capsys):
    _, _, _, path = release
    model = edgerun.load(path)
    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": " Hello "}], add_generation_prompt=True)
    assert text == "Human: Hello<|separator|>\n\nAssistant:"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.token_to_id("<|separator|>") in ids and tok.bos_id is None
    model.chat([{"role": "user", "content": "Hello"}], max_new_tokens=4, temperature=0)
    assert model.stats()["prompt_tokens"] == len(ids)
    assert tok.chat_stop_ids == {tok.token_to_id("<|separator|>")}
    assert main(["run", str(path), "--chat", "-p", "Hello", "-n", "3", "--temp", "0"]) == 0
    assert "tokens" in capsys.readouterr().err


def test_plan_for_grok2_streams_the_residual_mlp_with_the_experts():
    from pathlib import Path

    from edgerun.hw.plan import model_sizes, predict
    from edgerun.hw.profile import load_profile
    from edgerun.synthetic import grok2_config

    config = {**grok2_config(8192, 64, 8, 16384, 32768, vocab=131072, heads=64, kv_heads=8, context=131072),
              "beta_fast": 8, "beta_slow": 1, "extrapolation_factor": 1.0, "attn_factor": 1.0}
    D, layers = 8192, 64
    for dense, per_byte in (("q8", 17 / 16), ("q4", 9 / 16)):  # 8 or 4 bits and a float16 scale per 32 weights
        def matrix(rows, cols):
            return int(rows * cols * per_byte)
        # resident: attention, then the float32 norms and router per layer; embedding, lm_head and final norm
        per_layer = matrix(D, D) * 2 + matrix(1024, D) * 2 + (4 * D + 8 * D) * 4
        # the embedding at the dense format, the output head at q8 at least (every logit comes from it)
        resident = matrix(131072, D) + int(131072 * D * 17 / 16) + D * 4 + layers * per_layer
        sizes = model_sizes(config, "q4", dense)
        assert sizes.resident_bytes == resident
        assert sizes.kv_bytes(4096) == 2 * layers * 8 * 4096 * 128 * 4
        # per layer 8 routed experts and the 32768-wide MLP as two more of the experts' 16384 width
        assert sizes.chunk_bytes == 3 * D * 16384 * 9 // 16 and sizes.total_experts == 64 * 10
        assert sizes.layout.experts_per_token == 4
    profile = load_profile(Path(__file__).resolve().parent.parent / "profiles" / "minipc-cpu-32gb.json")
    p = predict(config, profile, ctx=4096)
    assert p.possible and p.bottleneck == "disk reads" and 0 < p.decode_tokens_per_s < 1
    # a token reads (or finds cached) four expert chunks per layer: two routed, two of the MLP
    assert p.bytes_per_token["ram"] + p.bytes_per_token["disk"] / 1.1 == pytest.approx(64 * 4 * sizes.chunk_bytes,
                                                                                      rel=1e-6)


def test_synthetic_grok2_release_loads_converts_and_chats(tmp_path, capsys):
    from edgerun.synthetic import grok2_config, write_random_grok2

    cfg = grok2_config(64, 2, 4, 32, 80, vocab=300, heads=2, kv_heads=1, context=256)
    path = write_random_grok2(tmp_path / "g", cfg, ranks=4)
    assert len(list(path.glob("*-TP-00[0-3].safetensors"))) == 3 * 4
    model = edgerun.load(path)
    assert model.spec.model_type == "grok-2" and model.decoder.stored_experts == 4 + 3  # 80 wide = 3 slices of 32
    assert model.tokenizer.decode(model.tokenizer.encode("grüß dich 👋")) == "grüß dich 👋"
    store = convert(path, tmp_path / "q8", quant="q8", progress=False)
    assert ExpertStore(store).num_experts == 7
    assert main(["run", str(store), "--chat", "-p", "Hello", "-n", "4", "--temp", "0"]) == 0
    assert re.search(r"\[\d+ tokens?, (length|stop)", capsys.readouterr().err)
