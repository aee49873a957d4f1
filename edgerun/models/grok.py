"""Grok-1 (`model_type: grok-1`), in the community PyTorch layouts of xai-org's JAX release.

Differences from the Llama-style families: four RMSNorms per layer (pre and post around attention and the
MoE), gated GELU-tanh experts, attention logits scaled by `attn_output_multiplier` and soft-capped with
`max_attn_value`, embeddings multiplied on the way in and tied to the output (itself scaled), and a router
whose top-2 weights are not renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

from .grok2 import GROK2_KEYS
from .spec import ModelSpec, common_fields

ARCHITECTURES = ("Grok1ModelForCausalLM", "Grok1ForCausalLM")


def claims(cfg: dict) -> bool:
    """Grok-2's release uses the same architecture name; its config has keys a Grok-1 one never has."""
    return not any(key in cfg for key in GROK2_KEYS)

L = r"model\.layers\.(\d+)\."
RULES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed"),
    (r"lm_head\.weight", "lm_head"),
    (r"model\.norm\.(?:scale|weight)", "norm"),
    (L + r"(?:attn|self_attn)\.([qkvo])_proj\.weight", r"layers.\1.\2"),
    (L + r"pre_attn_norm\.(?:scale|weight)", r"layers.\1.attn_norm"),
    (L + r"post_attn_norm\.(?:scale|weight)", r"layers.\1.post_attn_norm"),
    (L + r"pre_moe_norm\.(?:scale|weight)", r"layers.\1.ffn_norm"),
    (L + r"post_moe_norm\.(?:scale|weight)", r"layers.\1.post_ffn_norm"),
    (L + r"moe_block\.gate\.weight", r"layers.\1.router"),
    (L + r"moe_block\.experts\.(\d+)\.linear\.weight", r"layers.\1.experts.\2.gate"),
    (L + r"moe_block\.experts\.(\d+)\.linear_v\.weight", r"layers.\1.experts.\2.up"),
    (L + r"moe_block\.experts\.(\d+)\.linear_1\.weight", r"layers.\1.experts.\2.down"),
]


@dataclass
class ModelArgs:
    vocab_size: int = 131072
    hidden_size: int = 6144
    intermediate_size: int = 32768
    num_hidden_layers: int = 64
    num_attention_heads: int = 48
    num_key_value_heads: int = 8
    head_dim: int | None = None
    attn_output_multiplier: float = 0.08838834764831845
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    max_attn_value: float = 30.0
    num_experts: int = 8
    num_experts_per_tok: int = 2
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    return ModelSpec(
        model_type="grok-1",
        **common_fields(args, cfg, head_dim),
        attn_scale=args.attn_output_multiplier,
        attn_softcap=args.max_attn_value,
        sandwich_norm=True,
        activation="gelu_tanh",
        num_experts=args.num_experts,
        moe_intermediate_size=args.intermediate_size,
        norm_topk_prob=False,
        embedding_multiplier=args.embedding_multiplier_scale,
        output_multiplier=args.output_multiplier_scale,
    )
