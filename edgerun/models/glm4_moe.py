"""GLM-4.5 and GLM-4.5-Air (`model_type: glm4_moe`).

DeepSeek-V3's MoE layout (deepseek.moe_fields): the first `first_k_dense_replace` layers dense, routed experts
beside shared ones, the sigmoid router with a correction bias and groups. Attention is grouped-query attention
with biases on q, k and v, optional RMSNorm per head on q and k (`use_qk_norm`), and rotary embedding on half of
each head (`partial_rotary_factor`). Like DeepSeek-V3, the release carries a multi-token-prediction layer after
the last, which is never read.
"""

from __future__ import annotations

from dataclasses import dataclass

from .deepseek import moe_fields
from .names import HF_RULES, SHARED_EXPERTS_RULES
from .routers import SigmoidGroupedTopK
from .spec import ModelSpec, common_fields

ARCHITECTURES = ("Glm4MoeForCausalLM",)
RULES = SHARED_EXPERTS_RULES + HF_RULES


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 0
    moe_intermediate_size: int = 0
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    use_qk_norm: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    head_dim = args.head_dim or args.hidden_size // args.num_attention_heads
    return ModelSpec(
        model_type="glm4_moe",
        **common_fields(args, cfg, head_dim),
        **moe_fields(args),
        router=SigmoidGroupedTopK,
        qkv_bias=args.attention_bias,
        qk_norm="head" if args.use_qk_norm else None,
    )
