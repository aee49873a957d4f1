"""DeepSeek-V2/V3 beyond the per-family parity tests: float8 releases, the latent cache, stores and offloading.

A float8 release is written the way DeepSeek and Moonshot publish theirs: the projections, the dense MLPs and
every expert as float8 e4m3 with a float32 `weight_scale_inv` per 128 x 128 block, embeddings, norms and routers
unquantized, a `quantization_config` in config.json, and one multi-token-prediction layer after the last.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import edgerun
from edgerun.checkpoint.safetensors_reader import SafetensorsReader
from edgerun.errors import CheckpointError
from edgerun.store.convert import convert
from edgerun.store.store import ExpertStore
from hf_models import MLA, build, hf_greedy, hf_logits, save
from test_store import Q8_LOGIT_TOLERANCE, clear_greedy_prompt

PROMPT = [3, 17, 99, 5, 64, 12, 7, 120, 33, 2, 45, 88, 9, 101, 56, 23]
BLOCK = 128
FP8_MAX = 448.0  # the largest finite float8 e4m3 value
QUANTIZED = re.compile(r".*(_proj|experts\.\d+\.\w+_proj|kv_a_proj_with_mqa)\.weight$")


def to_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weights, float32 factors per 128 x 128 block) with weights = float8 * factor, blockwise."""
    rows, cols = w.shape
    nr, nc = -(-rows // BLOCK), -(-cols // BLOCK)
    scale = torch.empty(nr, nc)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(nr):
        for j in range(nc):
            block = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].float()
            s = float(block.abs().max()) / FP8_MAX or 1.0
            scale[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def from_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference expansion, element by element from each block's factor, as the publisher casts: bfloat16."""
    out = torch.empty(q.shape)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            r, c = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            out[r, c] = q[r, c].float() * scale[i, j]
    return out.to(torch.bfloat16)


def write_fp8_release(model, path):
    """The model as a float8 release (plus an MTP layer) in path, and the model transformers loads from a float32
    copy of what the release holds."""
    save(model, path)
    tensors = load_file(path / "model.safetensors")
    out, dequantized = {}, {}
    for name, w in tensors.items():
        if QUANTIZED.match(name) and w.ndim == 2:
            q, scale = to_fp8(w)
            out[name], out[name + "_scale_inv"] = q, scale
            dequantized[name] = from_fp8(q, scale).float()
        else:
            out[name] = dequantized[name] = w
    reference = path.parent / "reference"
    save(model, reference)
    save_file(dequantized, reference / "model.safetensors")
    hf = type(model).from_pretrained(reference, dtype=torch.float32, attn_implementation="eager").eval()
    n = model.config.num_hidden_layers
    for name in [k for k in tensors if k.startswith(f"model.layers.{n - 1}.")]:  # the MTP layer: a layer more
        out[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = tensors[name].clone()
    for extra in ("enorm.weight", "hnorm.weight"):
        out[f"model.layers.{n}.{extra}"] = torch.ones(model.config.hidden_size)
    out[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(model.config.hidden_size, 2 * model.config.hidden_size)
    (path / "model.safetensors").unlink()
    save_file(out, path / "model.safetensors")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
                                  "activation_scheme": "dynamic"}
    cfg["num_nextn_predict_layers"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    return hf


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "v3"
    return write_fp8_release(build("deepseek_v3"), path), path


def test_fp8_release_runs_as_its_bfloat16_cast(fp8_release):
    hf, path = fp8_release
    files = load_file(path / "model.safetensors")
    assert files["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.2.eh_proj.weight" in files  # the MTP layer is there, and left alone
    model = edgerun.load(path)
    got, want = model.logits(PROMPT), hf_logits(hf, PROMPT).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert model.generate_ids(PROMPT, 8, temperature=0, ignore_eos=True) == hf_greedy(hf, PROMPT, 8)


def test_fp8_release_converts_to_a_q8_store(fp8_release, tmp_path):
    hf, path = fp8_release
    store = ExpertStore(convert(path, tmp_path / "q8", quant="q8", progress=False))
    assert store.expert_layout.fmt == "q8" and store.moe_layers == [1]
    model = edgerun.load(store.path)
    want = hf_logits(hf, PROMPT).numpy()
    # one position of this prompt has a near tie in a sigmoid router, where rounding to bfloat16 already picks the
    # other expert: every other position is held to the other families' bound
    errors = np.abs(model.logits(PROMPT) - want).max(axis=1)
    assert np.sum(errors > Q8_LOGIT_TOLERANCE * want.std()) <= 1, errors
    prompt, continuation = clear_greedy_prompt(hf, min_margin=2 * Q8_LOGIT_TOLERANCE * want.std())
    assert model.generate_ids(prompt, 8, temperature=0, ignore_eos=True) == continuation


def test_fp8_matrices_expand_block_by_block(tmp_path):
    w = torch.randn(300, 200) * torch.linspace(0.1, 3, 200)  # three row bands, two column blocks, partial ones
    q, scale = to_fp8(w)
    save_file({"m.weight": q, "m.weight_scale_inv": scale, "norm.weight": torch.ones(4)}, tmp_path / "a.safetensors")
    reader = SafetensorsReader(tmp_path)
    assert sorted(reader.names()) == ["m.weight", "norm.weight"] and reader.dtype("m.weight") == torch.bfloat16
    got = reader.get("m.weight")
    assert got.dtype == torch.bfloat16 and torch.equal(got, from_fp8(q, scale))
    assert torch.equal(reader.get_range("m.weight", 0, 130, 260), got[130:260])
    assert (got.float() - w).abs().max() <= 0.07 * w.abs().max()  # float8: 3 mantissa bits


@pytest.mark.parametrize("scale,match", [(None, "without"), (torch.ones(2, 1), "expected one per 128 x 128")])
def test_a_float8_matrix_without_its_factors_is_refused(tmp_path, scale, match):
    tensors = {"m.weight": torch.zeros(300, 100, dtype=torch.float8_e4m3fn)}
    if scale is not None:
        tensors["m.weight_scale_inv"] = scale
    save_file(tensors, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=match):
        SafetensorsReader(tmp_path)


# -- the latent cache ------------------------------------------------------------------------------------------
def test_the_cache_holds_latents_not_keys_and_values(tmp_path):
    src = save(build("deepseek_v3"), tmp_path / "hf")
    ctx = 200
    stats = edgerun.load(convert(src, tmp_path / "q8", quant="q8", progress=False), context_length=ctx).stats()
    layers = 2
    latent = layers * ctx * (MLA["kv_lora_rank"] + MLA["qk_rope_head_dim"]) * 4
    assert stats["kv_cache_bytes"] == stats["memory_plan"]["kv_cache_bytes"] == latent
    heads = MLA["num_attention_heads"]
    full = layers * ctx * heads * (MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"] + MLA["v_head_dim"]) * 4
    assert latent * 2 < full  # 40 values a token and layer where full keys and values take 144


def test_offloaded_v2_gives_the_resident_tokens(tmp_path):
    from edgerun.runtime.offload import OffloadedExperts

    src = save(build("deepseek_v2_groups", num_hidden_layers=3), tmp_path / "hf")
    store = convert(src, tmp_path / "q4", quant="q4", progress=False)
    want = edgerun.load(store).generate_ids(PROMPT, 12, temperature=0, ignore_eos=True)
    model = edgerun.load(store)
    experts = OffloadedExperts(ExpertStore(store), model.spec.activation, slots=5)
    model.use_experts(experts).close()
    assert model.generate_ids(PROMPT, 12, temperature=0, ignore_eos=True) == want
    stats = model.stats()
    assert stats["offload"] and stats["bytes_read"] > 0 and stats["hit_rate"] < 1
    experts.close()


def test_kimi_k2_is_read_as_deepseek_v3(tmp_path):
    """Kimi-K2 ships DeepSeek-V3's architecture under its own model_type."""
    from edgerun.models import deepseek, spec_from_config
    from edgerun.models.routers import SigmoidGroupedTopK

    src = save(build("deepseek_v3"), tmp_path / "hf")
    cfg = json.loads((src / "config.json").read_text()) | {"model_type": "kimi_k2"}
    family, spec = spec_from_config(cfg)
    assert family is deepseek and spec.model_type == "deepseek_v3" and spec.router is SigmoidGroupedTopK
