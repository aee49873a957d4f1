"""gpt-oss (`model_type: gpt_oss`: gpt-oss-20b and -120b).

- attention: grouped-query with biases on q, k, v and o, a learned sink logit per head in every softmax, and
  layers alternating between a sliding window (`sliding_window`, 128) and the full context (`layer_types`);
- router (routers.TopKSoftmax): logits with a bias, the softmax over the top-k logits alone;
- experts: biases on gate_up and down, the clamped SwiGLU (parts.gated_fn("swiglu_oai"): alpha 1.702, limit 7);
  the checkpoint's fused gate_up alternates gate and up columns ([E, D, 2I], stored transposed);
- YaRN rotary embedding over the whole head.

The release stores its experts in MXFP4 (`*_blocks` and `*_scales`), which the checkpoint reader expands.
"""

from __future__ import annotations

from dataclasses import dataclass

from .ffn import BiasedMoE
from .names import HF_RULES, MOE, L
from .parts import SWIGLU_ALPHA, SWIGLU_LIMIT
from .routers import TopKSoftmax
from .spec import ModelSpec, common_fields

ARCHITECTURES = ("GptOssForCausalLM",)
RULES: list[tuple[str, str]] = HF_RULES + [
    (L + r"self_attn\.sinks", r"layers.\1.sinks"),
    (MOE + r"router\.weight", r"layers.\1.router"),
    (MOE + r"router\.bias", r"layers.\1.router_bias"),
    (MOE + r"experts\.(gate_up|down)_proj_bias", r"layers.\1.experts.\2_bias"),
]


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    swiglu_alpha: float = SWIGLU_ALPHA
    swiglu_limit: float = SWIGLU_LIMIT
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    if (args.swiglu_alpha, args.swiglu_limit) != (SWIGLU_ALPHA, SWIGLU_LIMIT):
        raise ValueError(f"swiglu_alpha {args.swiglu_alpha} and swiglu_limit {args.swiglu_limit} (the expert kernels "
                         f"compute gpt-oss's {SWIGLU_ALPHA} and {SWIGLU_LIMIT})")
    n = args.num_hidden_layers
    types = args.layer_types or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types {types} (one of sliding_attention or full_attention per layer)")
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    return ModelSpec(
        model_type="gpt_oss",
        **common_fields(args, cfg, head_dim),
        router=TopKSoftmax,
        ffn=[BiasedMoE] * n,
        qkv_bias=args.attention_bias,
        o_bias=args.attention_bias,
        attn_sinks=True,
        sliding_windows=[args.sliding_window if t == "sliding_attention" else None for t in types],
        activation="swiglu_oai",
        num_experts=args.num_local_experts,
        moe_intermediate_size=args.intermediate_size,
        gate_up_interleaved=True,
    )
