"""DeepSeek-V2 (`model_type: deepseek_v2`, V2-Lite too) and DeepSeek-V3 (`deepseek_v3`: V3, R1, Kimi-K2).

Multi-head latent attention (mla.py); routed experts beside `n_shared_experts` shared ones, computed as one
ungated MLP of their total width; the first `first_k_dense_replace` layers dense. Routers (routers.py): V2 softmax,
greedy or limited to the best groups by their best expert; V3 sigmoid with a correction bias for choosing, the
groups scored by their best two. YaRN's `mscale_all_dim` scales every attention logit, not only the rotary part.

The V3 release carries one multi-token-prediction layer after the last (`model.layers.61` in V3): it serves
speculative training and decoding, not the model's own output, and is never read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .ffn import DenseFFN, MoE, SharedExpertMoE
from .mla import LatentAttention
from .names import HF_RULES, SHARED_EXPERTS_RULES, L
from .routers import SigmoidGroupedTopK, SoftmaxGroupedTopK
from .spec import ACTIVATIONS, ModelSpec, common_fields

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
ATTN = L + r"self_attn\."
RULES: list[tuple[str, str]] = SHARED_EXPERTS_RULES + HF_RULES + [  # q and o by HF_RULES, the latent parts here
    (ATTN + r"(q_a|q_b|kv_b)_proj\.weight", r"layers.\1.\2"),
    (ATTN + r"kv_a_proj_with_mqa\.weight", r"layers.\1.kv_a"),
    (ATTN + r"kv_a_proj_with_mqa\.bias", r"layers.\1.kv_a_bias"),
    (ATTN + r"q_a_proj\.bias", r"layers.\1.q_a_bias"),
    (ATTN + r"(q_a|kv_a)_layernorm\.weight", r"layers.\1.\2_norm"),
]


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    q_lora_rank: int | None = None
    num_key_value_heads: int | None = None
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str | None = None  # V2: greedy or group_limited_greedy; V3: noaux_tc
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


def yarn_mscale(factor: float, m: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def moe_fields(args) -> dict:
    """The ModelSpec fields of DeepSeek's MoE layout, which GLM-4.5 shares: the first `first_k_dense_replace`
    layers dense, then routed experts beside `n_shared_experts` shared ones (one MLP of their total width); groups
    for the router."""
    if args.moe_layer_freq != 1:
        raise ValueError(f"moe_layer_freq {args.moe_layer_freq} (only 1 is supported: every layer after the "
                         f"first_k_dense_replace is sparse)")
    moe = SharedExpertMoE if args.n_shared_experts else MoE
    return dict(
        ffn=[DenseFFN if i < args.first_k_dense_replace or not args.n_routed_experts else moe
             for i in range(args.num_hidden_layers)],
        activation=ACTIVATIONS.get(args.hidden_act, args.hidden_act),
        intermediate_size=args.intermediate_size,
        num_experts=args.n_routed_experts or 0,
        moe_intermediate_size=args.moe_intermediate_size,
        norm_topk_prob=args.norm_topk_prob,
        shared_expert_intermediate_size=args.moe_intermediate_size * (args.n_shared_experts or 0),
        routed_scaling_factor=args.routed_scaling_factor,
        router_groups=args.n_group or 1,
        topk_group=args.topk_group or 1,
    )


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    v3 = cfg.get("model_type") == "deepseek_v3" or "DeepseekV3ForCausalLM" in (cfg.get("architectures") or [])
    if args.scoring_func not in (None, "sigmoid" if v3 else "softmax"):
        raise ValueError(f"scoring_func {args.scoring_func!r}")
    spec = ModelSpec(
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        **common_fields(args, cfg, args.qk_rope_head_dim),
        **moe_fields(args),
        attention=LatentAttention,
        router=SigmoidGroupedTopK if v3 else SoftmaxGroupedTopK,
        qkv_bias=args.attention_bias,
        q_lora_rank=args.q_lora_rank or None,
        kv_lora_rank=args.kv_lora_rank,
        qk_nope_head_dim=args.qk_nope_head_dim,
        v_head_dim=args.v_head_dim,
        rope_interleave=args.rope_interleave,
    )
    spec.num_kv_heads = spec.num_heads  # every head has its own key and value, all read from the one latent
    if not v3 and args.topk_method != "group_limited_greedy":
        spec.router_groups = spec.topk_group = 1  # greedy: no groups
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    rope = spec.rope
    if rope.rope_type != "default" and rope.params.get("mscale_all_dim"):
        orig = rope.params.get("original_max_position_embeddings") or rope.max_position_embeddings
        factor = rope.params.get("factor") or rope.max_position_embeddings / orig
        scale *= yarn_mscale(factor, rope.params["mscale_all_dim"]) ** 2
    spec.attn_scale = scale
    return spec
