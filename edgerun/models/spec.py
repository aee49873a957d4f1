"""ModelSpec: what the shared decoder needs to know about a family: the parts it is built of, and plain fields.

Family modules (mixtral.py, qwen2_moe.py, ...) read a HF config.json into their own `ModelArgs` (HF field
names) and turn it into a ModelSpec. Structure is chosen by part: the attention kind, the router kind and, per
layer, the FFN kind (see attention.py, routers.py, ffn.py); numeric quirks (multipliers, soft caps, eps) and
simple options stay plain fields, which the parts read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .attention import Attention
from .ffn import MoE
from .rope import RopeSpec
from .routers import SoftmaxTopK

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    # parts: classes built as Part(spec, layer)
    attention: type = Attention
    router: type = SoftmaxTopK
    ffn: list[type] = field(default_factory=list)  # per layer: DenseFFN, MoE, SharedExpertMoE, ResidualMoE ...
    # attention options
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: str | None = None  # None, "head" (per head over head_dim) or "proj" (over the whole projection)
    clip_qkv: float | None = None
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None
    attn_temperature_len: int = 0  # > 0: logits of queries past this position are scaled up (Grok-2)
    attn_sinks: bool = False  # a learned logit per head joins each softmax and takes its share (gpt-oss)
    sliding_windows: list[int | None] = field(default_factory=list)  # per layer
    # multi-head latent attention (DeepSeek): keys and values through a low-rank latent, which is what is cached
    q_lora_rank: int | None = None  # None: q from one matrix; else q_a (to this rank), its norm, then q_b
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0  # the part of each query/key head without rotary embedding
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotary dims in pairs (x0, x1), (x2, x3) ... rather than in two halves
    # block layout
    sandwich_norm: bool = False  # extra norms on the attention and FFN outputs (Grok)
    activation: str = "silu"
    intermediate_size: int = 0  # dense MLP width (dense layers, Grok-2's residual MLP)
    # mixture of experts
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_softcap: float | None = None
    router_fp32: bool = False  # router logits from float32 weights and inputs whatever the compute dtype
    router_groups: int = 1  # experts fall in this many groups; a token chooses only among the best `topk_group`
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # on the routed experts' weights
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    gate_up_interleaved: bool = False  # a fused gate_up checkpoint tensor alternates gate and up rows (gpt-oss)
    # embeddings and output
    embedding_multiplier: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers
        if not self.ffn:
            self.ffn = [MoE] * self.num_layers

    @property
    def moe_layers(self) -> list[int]:
        """The layers whose FFN has routed experts."""
        return [i for i, part in enumerate(self.ffn) if part.routed]


def common_fields(args, cfg: dict, head_dim: int, default_theta: float = 10000.0) -> dict:
    """The ModelSpec fields every family reads from the same HF config keys."""
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.num_hidden_layers,
        num_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads or args.num_attention_heads,
        head_dim=head_dim,
        rope=RopeSpec.from_config(cfg, head_dim, default_theta),
        rms_norm_eps=args.rms_norm_eps,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        top_k=args.num_experts_per_tok,
        bos_token_id=args.bos_token_id,
        eos_token_ids=eos_list(args.eos_token_id),
    )


def eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
