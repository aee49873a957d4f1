"""Grok-2 as xai-org released it (config `"model_type": "git"`, `"architectures": ["Grok1ForCausalLM"]`).

Semantics follow SGLang's `models/grok.py`, the engine the release names; where other engines differ, SGLang wins:
- each layer's FFN is the routed experts beside a dense MLP of `intermediate_size` on the same input, combined as
  (mlp + moe) / sqrt(2), then `post_moe_norm` (`residual_moe`); Grok-1's four norms per layer;
- experts and the dense MLP are gated exact GELU (SGLang's CUDA kernels use the error function; llama.cpp and
  SGLang's NPU path use the tanh approximation);
- the router runs in float32: logits capped as 30 tanh(l / 30), softmax over all experts, top-2, weights not
  renormalised (llama.cpp renormalises and skips the cap);
- attention scale head_dim^-0.5, logits capped at `attn_logit_softcapping`, then multiplied by log2(p) /
  log2(`attn_temperature_len`) for queries at positions p past it (vLLM and llama.cpp leave this out);
- `rope_type` "original" is plain RoPE at `rope_theta` over the full head dim, NeoX style: SGLang computes the
  unscaled frequencies and no attention factor (llama.cpp's converter reads it as YaRN);
- output: logits = final_cap * tanh(output_multiplier * (h . lm_head) / final_cap) (vLLM caps before scaling).

Every key of the release's config.json is either implemented or, where it cannot change the result, accepted;
any other key, or a value edgerun does not implement, is refused with the key named.

The release is pre-sharded for 8-way tensor parallelism: `pytorch_model-000NN-TP-common.safetensors` hold whole
tensors; `pytorch_model-000NN-TP-00R.safetensors` hold rank R's slice of every expert, w1 (gate) and w3 (up)
along dim 0, w2 (down) along dim 1 (TP_SPLIT), which the checkpoint reader joins.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedModelError
from .ffn import MoE, ResidualMoE
from .rope import RopeSpec
from .spec import ModelSpec, eos_list

ARCHITECTURES = ("Grok1ForCausalLM",)
# what only a Grok-2 config holds: a Grok-1 config with the same architecture name has none of these
GROK2_KEYS = ("residual_moe", "moe_intermediate_size", "num_local_experts", "router_logit_softcapping",
              "attn_logit_softcapping", "final_logit_softcapping", "attn_temperature_len")

L = r"model\.layers\.(\d+)\."
MOE = L + r"block_sparse_moe\."
RULES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed"),
    (r"lm_head\.weight", "lm_head"),
    (r"model\.norm\.weight", "norm"),
    (L + r"self_attn\.([qkvo])_proj\.weight", r"layers.\1.\2"),
    (L + r"pre_attn_norm\.weight", r"layers.\1.attn_norm"),
    (L + r"post_attn_norm\.weight", r"layers.\1.post_attn_norm"),
    (L + r"pre_moe_norm\.weight", r"layers.\1.ffn_norm"),
    (L + r"post_moe_norm\.weight", r"layers.\1.post_ffn_norm"),
    (MOE + r"gate\.weight", r"layers.\1.router"),
    (MOE + r"experts\.(\d+)\.w1\.weight", r"layers.\1.experts.\2.gate"),
    (MOE + r"experts\.(\d+)\.w3\.weight", r"layers.\1.experts.\2.up"),
    (MOE + r"experts\.(\d+)\.w2\.weight", r"layers.\1.experts.\2.down"),
    (L + r"mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2"),
]
# checkpoint tensors split across tensor-parallel rank files, and the dimension their slices join along
TP_SPLIT: list[tuple[str, int]] = [(MOE + r"experts\.\d+\.w[13]\.weight", 0), (MOE + r"experts\.\d+\.w2\.weight", 1)]

# keys that cannot change the result: names, dtypes, loading hints, and the YaRN parameters that rope_type
# "original" does not use
NO_EFFECT = {"architectures", "model_type", "torch_dtype", "transformers_version", "initializer_range", "use_cache",
             "pad_token_id", "merge_gate_up", "load_presharded_moe", "load_presharded_attn", "load_presharded_mlp",
             "load_presharded_embedding", "replicate_lm_head", "replicate_embedding", "extrapolation_factor",
             "attn_factor", "beta_fast", "beta_slow", "scaling_factor", "original_max_position_embeddings"}
# keys accepted only at the value under which they do nothing
ONLY = {"sliding_window_size": (-1, None, 0), "global_attn_every_n": (1, None), "rope_rotate_half_dims": (False,),
        "attn_logit_softcapping_method": ("tanh",), "hidden_act": ("gelu",), "rope_type": ("original", None)}


def claims(cfg: dict) -> bool:
    return any(key in cfg for key in GROK2_KEYS)


@dataclass
class ModelArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int | None = None
    head_dim: int = 128
    residual_moe: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 131072
    attn_logit_softcapping: float = 30.0
    router_logit_softcapping: float = 30.0
    final_logit_softcapping: float | None = None
    attn_temperature_len: int = -1
    embedding_multiplier_scale: float = 1.0
    output_multiplier_scale: float = 1.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None


IMPLEMENTED = {f for f in ModelArgs.__dataclass_fields__}


def check_keys(cfg: dict) -> None:
    """Refuse any key this module does not implement, and any value of a key it only accepts unchanged."""
    unknown = sorted(set(cfg) - IMPLEMENTED - NO_EFFECT - set(ONLY))
    if unknown:
        raise UnsupportedModelError(f"Grok-2 config key(s) {', '.join(unknown)} are not implemented by edgerun; "
                                    f"remove them only if they do not change the model")
    for key, allowed in ONLY.items():
        if key in cfg and cfg[key] not in allowed:
            raise UnsupportedModelError(f"Grok-2 config: {key} = {cfg[key]!r} is not implemented (edgerun runs "
                                        f"{' or '.join(repr(a) for a in allowed if a is not None)})")


def to_spec(args: ModelArgs, cfg: dict) -> ModelSpec:
    check_keys(cfg)
    L = args.num_hidden_layers
    moe = ResidualMoE if args.residual_moe else MoE
    temperature = args.attn_temperature_len if args.attn_temperature_len and args.attn_temperature_len > 1 else 0
    return ModelSpec(
        model_type="grok-2",
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=L,
        num_heads=args.num_attention_heads,
        num_kv_heads=args.num_key_value_heads,
        head_dim=args.head_dim,
        # "original": the unscaled frequencies (see the module docstring)
        rope=RopeSpec(float(args.rope_theta), args.head_dim, args.max_position_embeddings),
        rms_norm_eps=args.rms_norm_eps,
        max_position_embeddings=args.max_position_embeddings,
        tie_word_embeddings=args.tie_word_embeddings,
        ffn=[moe] * L,
        attn_softcap=args.attn_logit_softcapping if args.attn_logit_softcapping > 0 else None,
        attn_temperature_len=temperature,
        sandwich_norm=True,
        activation="gelu",
        intermediate_size=args.intermediate_size if args.residual_moe else 0,
        num_experts=args.num_local_experts,
        top_k=args.num_experts_per_tok,
        moe_intermediate_size=args.moe_intermediate_size or args.intermediate_size,
        norm_topk_prob=False,
        router_softcap=args.router_logit_softcapping if args.router_logit_softcapping > 0 else None,
        router_fp32=True,
        embedding_multiplier=args.embedding_multiplier_scale,
        output_multiplier=args.output_multiplier_scale,
        final_logit_softcap=args.final_logit_softcapping or None,
        bos_token_id=args.bos_token_id,
        eos_token_ids=eos_list(args.eos_token_id),
    )
