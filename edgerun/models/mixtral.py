"""Mixtral (`model_type: mixtral`): Llama blocks with a top-k softmax router over SwiGLU experts."""

from __future__ import annotations

from dataclasses import dataclass

from .names import HF_RULES
from .spec import ACTIVATIONS, ModelSpec, common_fields

ARCHITECTURES = ("MixtralForCausalLM",)
RULES = HF_RULES


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    return ModelSpec(
        model_type="mixtral",
        **common_fields(args, cfg, head_dim, default_theta=1e6),
        sliding_windows=[args.sliding_window or None] * args.num_hidden_layers,
        activation=ACTIVATIONS.get(args.hidden_act, args.hidden_act),
        num_experts=args.num_local_experts,
        moe_intermediate_size=args.intermediate_size,
        norm_topk_prob=True,
    )
