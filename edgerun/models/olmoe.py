"""OLMoE (`model_type: olmoe`): q/k RMSNorm over the whole projection, optional clipping of q, k, v."""

from __future__ import annotations

from dataclasses import dataclass

from .names import HF_RULES
from .spec import ACTIVATIONS, ModelSpec, common_fields

ARCHITECTURES = ("OlmoeForCausalLM",)
RULES = HF_RULES


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    clip_qkv: float | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    head_dim = args.hidden_size // args.num_attention_heads
    return ModelSpec(
        model_type="olmoe",
        **common_fields(args, cfg, head_dim),
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        qk_norm="proj",
        clip_qkv=args.clip_qkv,
        activation=ACTIVATIONS.get(args.hidden_act, args.hidden_act),
        num_experts=args.num_experts,
        moe_intermediate_size=args.intermediate_size,
        norm_topk_prob=args.norm_topk_prob,
    )
