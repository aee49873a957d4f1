"""Writes a tiny Grok-1 checkpoint in the format of xai-org's JAX release, for tests.

Written here from xai-org's `model.py`, `checkpoint.py` and `run.py`, independently of edgerun's reader:
- the haiku parameter tree {module path: {param name: array}} with the module names model.py gives
  (language_model/in_out_embed, language_model/rms_norm, transformer/decoder_layer_N/{multi_head_attention/
  {query,key,value,linear}, moe/{linear,linear_v,linear_1}, router, rms_norm, rms_norm_1..3}), flattened the
  way jax.tree_util flattens dicts (keys sorted at every level), one pickle file per leaf `tensor{i:05d}_000`;
- matrices [in, out]; the seven matrices of a layer as `__main__.QuantizedWeight8bit` (int8 weight, bfloat16
  scales [..., B, out] over B blocks of input rows); embeddings, norms and router as float32 arrays;
- pickle protocol 4, numpy arrays pickled by numpy itself.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch


@dataclass
class QuantizedWeight8bit:
    weight: np.ndarray
    scales: np.ndarray


QuantizedWeight8bit.__module__ = "__main__"
QuantizedWeight8bit.__qualname__ = "QuantizedWeight8bit"


def quantize(w_in_out: np.ndarray, blocks: int) -> tuple[QuantizedWeight8bit, np.ndarray]:
    """(record, the float32 weights it stands for) for a float matrix or stack [..., in, out]."""
    *lead, rows, cols = w_in_out.shape
    x = w_in_out.reshape(*lead, blocks, rows // blocks, cols)
    scales = (np.abs(x).max(axis=-2, keepdims=True) / 127 + 1e-8).astype(ml_dtypes.bfloat16)
    q = np.clip(np.round(x / scales.astype(np.float32)), -127, 127).astype(np.int8)
    held = (q.astype(np.float32) * scales.astype(np.float32)).astype(ml_dtypes.bfloat16).astype(np.float32)
    return (QuantizedWeight8bit(q.reshape(w_in_out.shape), scales.reshape(*lead, blocks, cols)),
            held.reshape(w_in_out.shape))


def official_config(cfg: dict) -> dict:
    """The LanguageModelConfig for a community-layout grok-1 config, as dataclasses.asdict writes it."""
    model = {"emb_size": cfg["hidden_size"], "key_size": cfg["hidden_size"] // cfg["num_attention_heads"],
             "num_q_heads": cfg["num_attention_heads"], "num_kv_heads": cfg["num_key_value_heads"],
             "num_layers": cfg["num_hidden_layers"], "vocab_size": 128 * 1024,
             "widening_factor": cfg["intermediate_size"] * 3 / 2 / cfg["hidden_size"],
             "attn_output_multiplier": cfg["attn_output_multiplier"], "name": None,
             "num_experts": cfg["num_experts"], "capacity_factor": 1.0,
             "num_selected_experts": cfg["num_experts_per_tok"], "init_scale": 1.0, "shard_activations": True,
             "data_axis": "data", "model_axis": "model"}
    return {"model": model, "vocab_size": cfg["vocab_size"], "pad_token": 0, "eos_token": 2,
            "sequence_len": cfg["max_position_embeddings"], "model_size": 0, "embedding_init_scale": 1.0,
            "embedding_multiplier_scale": cfg["embedding_multiplier_scale"],
            "output_multiplier_scale": cfg["output_multiplier_scale"], "name": None, "fprop_dtype": "bfloat16",
            "model_type": None, "init_scale_override": None, "shard_embeddings": True}


def write_release(path, weights: dict, cfg: dict, blocks: int = 8, config_file: bool = True,
                  numpy1_names: bool = False) -> dict:
    """Write ckpt-0/ (and grok1_config.json) under path for community-layout weights; returns the weights the
    release holds, in the community layout (quantized matrices as their int8 * scale values in bfloat16, the
    embeddings rounded to bfloat16 as model.py uses them). numpy1_names: refer to numpy 1.x's module names."""
    sys.modules["__main__"].QuantizedWeight8bit = QuantizedWeight8bit  # as xai-org's checkpoint.py does
    held: dict[str, torch.Tensor] = {}

    def np32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().numpy()

    def matrix(name: str, b: int) -> QuantizedWeight8bit:
        record, w = quantize(np32(weights[name]).T.copy(), b)
        held[name] = torch.from_numpy(w.T.copy())
        return record

    def experts(layer: str, part: str, b: int) -> QuantizedWeight8bit:
        names = [f"{layer}.moe_block.experts.{e}.{part}.weight" for e in range(cfg["num_experts"])]
        record, w = quantize(np.stack([np32(weights[n]).T for n in names]), b)
        for e, n in enumerate(names):
            held[n] = torch.from_numpy(w[e].T.copy())
        return record

    def plain(name: str, transpose: bool = False) -> np.ndarray:
        held[name] = weights[name].float()
        a = np32(weights[name])
        return a.T.copy() if transpose else a

    embed = np32(weights["model.embed_tokens.weight"])
    held["model.embed_tokens.weight"] = torch.from_numpy(embed.astype(ml_dtypes.bfloat16).astype(np.float32))
    tree = {"language_model/in_out_embed": {"embeddings": embed},
            "language_model/rms_norm": {"scale": plain("model.norm.scale")}}
    for i in range(cfg["num_hidden_layers"]):
        t, c = f"transformer/decoder_layer_{i}/", f"model.layers.{i}"
        for module, proj, b in (("query", "q", 1), ("key", "k", 1), ("value", "v", 1), ("linear", "o", blocks)):
            tree[f"{t}multi_head_attention/{module}"] = {"w": matrix(f"{c}.attn.{proj}_proj.weight", b)}
        for part, b in (("linear", 1), ("linear_v", 1), ("linear_1", blocks)):
            tree[f"{t}moe/{part}"] = {"w": experts(c, part, b)}
        tree[f"{t}router"] = {"w": plain(f"{c}.moe_block.gate.weight", transpose=True)}
        for suffix, norm in (("", "pre_attn"), ("_1", "post_attn"), ("_2", "pre_moe"), ("_3", "post_moe")):
            tree[f"{t}rms_norm{suffix}"] = {"scale": plain(f"{c}.{norm}_norm.scale")}

    ckpt = path / "ckpt-0"
    ckpt.mkdir(parents=True)
    leaves = [tree[module][name] for module in sorted(tree) for name in sorted(tree[module])]
    for i, leaf in enumerate(leaves):
        data = pickle.dumps(leaf, protocol=4)
        if numpy1_names:
            data = _numpy1(data)
        (ckpt / f"tensor{i:05d}_000").write_bytes(data)
    if config_file:
        (path / "grok1_config.json").write_text(json.dumps(official_config(cfg), indent=1))
    return held


def _numpy1(data: bytes) -> bytes:
    """The pickle as numpy 1.x writes it: numpy.core.multiarray instead of numpy._core.multiarray."""
    new, old = b"numpy.core.multiarray", b"numpy._core.multiarray"
    data = data.replace(bytes([0x8C, len(old)]) + old, bytes([0x8C, len(new)]) + new)
    return pickletools.optimize(data)  # re-framed, so the frame lengths are right again
