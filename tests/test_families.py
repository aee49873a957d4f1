"""Every supported HF family against transformers' own implementation, through edgerun's real loading code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import edgerun
from hf_models import build, hf_greedy, hf_logits, save

FAMILIES = ["mixtral", "qwen2_moe", "qwen2_moe_step", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v2_groups",
            "deepseek_v3", "glm4_moe", "gpt_oss"]
PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88, 9, 101, 56, 23]  # 16 tokens


@pytest.fixture(scope="module", params=FAMILIES)
def hf_model(request):
    return build(request.param)


@pytest.mark.parametrize("layout", ["default", "fused", "sharded"])
def test_logits_and_greedy_match_transformers(hf_model, layout, tmp_path):
    path = save(hf_model, tmp_path / layout, layout)
    files = sorted(p.name for p in path.iterdir())
    if layout == "sharded":
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    model = edgerun.load(path)

    got = model.logits(PROMPT)
    want = hf_logits(hf_model, PROMPT).numpy()
    assert got.dtype == np.float32 and got.shape == (16, 128)
    assert np.abs(got - want).max() <= 1e-4

    assert model.generate_ids(PROMPT, max_new_tokens=8, temperature=0.0, ignore_eos=True) == hf_greedy(
        hf_model, PROMPT, 8)


def test_decode_steps_give_transformers_logits(hf_model, tmp_path):
    """Every token after the first as its own decode step (the one-token attention kernel) gives the logits of
    transformers' forward pass over the whole prompt."""
    model = edgerun.load(save(hf_model, tmp_path / "m", "default"))
    got = model.logits(PROMPT, decode=True)
    assert np.abs(got - hf_logits(hf_model, PROMPT).numpy()).max() <= 1e-4


def test_fused_layout_really_is_fused(tmp_path):
    from safetensors import safe_open

    path = save(build("mixtral"), tmp_path / "m", "fused")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.endswith("experts.gate_up_proj") for n in names)
    assert not any(".experts.0." in n for n in names)


def test_transposed_fused_experts_load(tmp_path):
    """Some checkpoints store fused experts as [E, H, 2I] / [E, I, H]; they must give the same logits."""
    from safetensors.torch import load_file, save_file

    hf = build("qwen3_moe")
    path = save(hf, tmp_path / "t", "fused")
    tensors = load_file(str(path / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = tensors[name].transpose(1, 2).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    got = edgerun.load(path).logits(PROMPT)
    assert np.abs(got - hf_logits(hf, PROMPT).numpy()).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(dtype, tmp_path):
    """bf16/fp16 weights, computed in float32, equal transformers run in float32 on the same rounded weights."""
    hf = build("mixtral")
    path = save(hf, tmp_path / "h", dtype=dtype)
    rounded = type(hf).from_pretrained(path, dtype=torch.float32).eval()
    model = edgerun.load(path, dtype="float32")
    assert np.abs(model.logits(PROMPT) - hf_logits(rounded, PROMPT).numpy()).max() <= 1e-4
    auto = edgerun.load(path)
    assert auto.stats()["dtype"] == ("bfloat16" if dtype == torch.bfloat16 else "float32")
    # bf16 compute stays close to float32 on the same weights
    assert np.abs(auto.logits(PROMPT) - hf_logits(rounded, PROMPT).numpy()).max() < 0.1


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
def test_rope_scaling_variants(variant, tmp_path):
    params = {"rope_theta": 10000.0, **ROPE_VARIANTS[variant]}
    # a short trained length makes the 16-token prompt exceed it, so dynamic scaling really engages
    hf = build("qwen3_moe", rope_parameters=params, max_position_embeddings=12)
    path = save(hf, tmp_path / variant)
    model = edgerun.load(path, context_length=64)
    assert np.abs(model.logits(PROMPT) - hf_logits(hf, PROMPT).numpy()).max() <= 1e-4
    assert model.generate_ids(PROMPT, 8, temperature=0.0, ignore_eos=True) == hf_greedy(hf, PROMPT, 8)


def test_legacy_rope_scaling_key(tmp_path):
    """Older config files say rope_theta + rope_scaling {"type": ...}; they mean the same thing."""
    hf = build("mixtral", rope_parameters={"rope_theta": 5000.0, "rope_type": "linear", "factor": 3.0})
    path = save(hf, tmp_path / "legacy")
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 3.0})
    (path / "config.json").write_text(json.dumps(cfg))
    assert np.abs(edgerun.load(path).logits(PROMPT) - hf_logits(hf, PROMPT).numpy()).max() <= 1e-4


def test_sliding_window_matches(tmp_path):
    hf = build("mixtral", sliding_window=5)
    path = save(hf, tmp_path / "sw")
    model = edgerun.load(path)
    assert np.abs(model.logits(PROMPT) - hf_logits(hf, PROMPT).numpy()).max() <= 1e-4
    assert model.generate_ids(PROMPT, 8, temperature=0.0, ignore_eos=True) == hf_greedy(hf, PROMPT, 8)


def test_prefix_reuse_gives_the_same_tokens(tmp_path):
    """A second prompt extending the first reuses the cache; its continuation must equal a cold run."""
    hf = build("olmoe")
    model = edgerun.load(save(hf, tmp_path / "o"))
    first = model.generate_ids(PROMPT[:10], 4, temperature=0.0, ignore_eos=True)
    extended = PROMPT[:10] + first + [7, 8]
    warm = model.generate_ids(extended, 6, temperature=0.0, ignore_eos=True)
    assert model.stats()["cached_prompt_tokens"] >= 10
    assert warm == hf_greedy(hf, extended, 6)


def test_long_prompt_prefills_in_chunks(tmp_path, monkeypatch):
    from edgerun.runtime import placement

    monkeypatch.setattr(placement, "PREFILL_CHUNK", 5)
    hf = build("qwen2_moe")
    model = edgerun.load(save(hf, tmp_path / "q"))
    ids = (PROMPT * 2)[:23]
    assert np.abs(model.logits(ids) - hf_logits(hf, ids).numpy()).max() <= 1e-4
    assert model.generate_ids(ids, 5, temperature=0.0, ignore_eos=True) == hf_greedy(hf, ids, 5)


def test_a_float_model_decodes_without_the_quantized_kernels(monkeypatch, tmp_path):
    """A float32 model's decode steps use the attention and norm kernels alone (compiled at load, in a moment),
    never the whole set a quantized store needs (tens of seconds the first time on a machine)."""
    from edgerun import native

    def refuse():
        raise AssertionError("a float model compiled every kernel")

    monkeypatch.setattr(native, "_ready", False)
    monkeypatch.setattr(native, "warmup", refuse)
    hf_model = build("mixtral")
    model = edgerun.load(save(hf_model, tmp_path / "m", "default"))
    assert np.abs(model.logits(PROMPT, decode=True) - hf_logits(hf_model, PROMPT).numpy()).max() <= 1e-4
