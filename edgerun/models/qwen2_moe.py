"""Qwen2-MoE (`model_type: qwen2_moe`): routed experts plus a sigmoid-gated shared expert, some dense layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ffn import DenseFFN, MoE, SharedExpertMoE
from .names import HF_RULES
from .spec import ACTIVATIONS, ModelSpec, common_fields

ARCHITECTURES = ("Qwen2MoeForCausalLM",)
RULES = HF_RULES


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 0
    num_local_experts: int = 0  # what transformers v5 writes for Qwen3-MoE in place of num_experts
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    qkv_bias: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    layer_types: list[str] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


def num_experts(args: ModelArgs) -> int:
    return args.num_experts or args.num_local_experts


def ffn_parts(args: ModelArgs, moe: type) -> list[type]:
    """Per layer: `moe` where the layer is sparse, else a dense MLP."""
    mlp_only = set(args.mlp_only_layers or [])
    return [
        moe if i not in mlp_only and num_experts(args) > 0 and (i + 1) % args.decoder_sparse_step == 0 else DenseFFN
        for i in range(args.num_hidden_layers)
    ]


def sliding_windows(args: ModelArgs) -> list[int | None]:
    n = args.num_hidden_layers
    if not args.use_sliding_window or not args.sliding_window:
        return [None] * n
    types = args.layer_types or [
        "sliding_attention" if (i + 1) % 2 and i < args.max_window_layers else "full_attention" for i in range(n)
    ]
    return [args.sliding_window if t == "sliding_attention" else None for t in types]


def common_spec(args: ModelArgs, cfg: dict, model_type: str, moe: type) -> ModelSpec:
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    return ModelSpec(
        model_type=model_type,
        **common_fields(args, cfg, head_dim),
        sliding_windows=sliding_windows(args),
        ffn=ffn_parts(args, moe),
        activation=ACTIVATIONS.get(args.hidden_act, args.hidden_act),
        intermediate_size=args.intermediate_size,
        num_experts=num_experts(args),
        moe_intermediate_size=args.moe_intermediate_size,
        norm_topk_prob=args.norm_topk_prob,
    )


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    spec = common_spec(args, cfg, "qwen2_moe", SharedExpertMoE if args.shared_expert_intermediate_size else MoE)
    spec.qkv_bias = args.qkv_bias
    spec.shared_expert_intermediate_size = args.shared_expert_intermediate_size
    spec.shared_expert_gate = args.shared_expert_intermediate_size > 0
    return spec
