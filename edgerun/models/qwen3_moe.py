"""Qwen3-MoE (`model_type: qwen3_moe`): Qwen2-MoE without the shared expert, with per-head q/k RMSNorm."""

from __future__ import annotations

from . import qwen2_moe
from .ffn import MoE
from .spec import ModelSpec

ARCHITECTURES = ("Qwen3MoeForCausalLM",)
RULES = qwen2_moe.RULES

ModelArgs = qwen2_moe.ModelArgs


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    spec = qwen2_moe.common_spec(args, cfg, "qwen3_moe", MoE)
    spec.qkv_bias = spec.o_bias = args.attention_bias
    spec.qk_norm = "head"
    return spec
