"""Tiny random models built with transformers, saved in the layouts edgerun must read."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.1, rms_norm_eps=1e-5)


# multi-head latent attention: every head its own key and value from a latent of rank 32
MLA = dict({**COMMON, "num_key_value_heads": 4}, intermediate_size=80, moe_intermediate_size=32, kv_lora_rank=32,
           qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
            beta_slow=1, mscale=0.707, mscale_all_dim=0.707)


GPT_OSS_GATE_UP_GAIN = 5.0


def build(family: str, **overrides):
    """A transformers model (eval, float32, eager attention) of the family with a fixed random init."""
    import transformers as tf

    if family == "mixtral":
        config = tf.MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)
        cls = tf.MixtralForCausalLM
    elif family == "qwen2_moe":
        # layer 0 sparse with a shared expert, layer 1 dense (mlp_only_layers), biases on q/k/v
        config = tf.Qwen2MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=48,
                                   shared_expert_intermediate_size=72, num_experts=4, num_experts_per_tok=2,
                                   mlp_only_layers=[1], qkv_bias=True)
        cls = tf.Qwen2MoeForCausalLM
    elif family == "qwen2_moe_step":
        # decoder_sparse_step=2: layer 0 dense, layer 1 sparse; renormalised top-k
        config = tf.Qwen2MoeConfig(**COMMON, intermediate_size=80, moe_intermediate_size=48,
                                   shared_expert_intermediate_size=72, num_experts=4, num_experts_per_tok=2,
                                   decoder_sparse_step=2, norm_topk_prob=True)
        cls = tf.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        # head_dim 24 != hidden / heads (16): the projections are not square
        config = tf.Qwen3MoeConfig(**COMMON, head_dim=24, intermediate_size=80, moe_intermediate_size=48,
                                   num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)
        cls = tf.Qwen3MoeForCausalLM
    elif family == "olmoe":
        config = tf.OlmoeConfig(**COMMON, intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                clip_qkv=0.5)
        cls = tf.OlmoeForCausalLM
    elif family == "deepseek_v2":
        # V2-Lite's shape: q from one matrix, softmax router (greedy), two shared experts, layer 0 dense
        config = tf.DeepseekV2Config(**MLA, q_lora_rank=None, n_routed_experts=4, n_shared_experts=2,
                                     num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=1.5)
        cls = tf.DeepseekV2ForCausalLM
    elif family == "deepseek_v2_groups":
        # V2's: low-rank q, the router limited to the best 2 of 4 groups, YaRN with mscale_all_dim
        config = tf.DeepseekV2Config(**MLA, q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
                                     num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=4,
                                     topk_group=2, routed_scaling_factor=2.0, rope_parameters=YARN)
        cls = tf.DeepseekV2ForCausalLM
    elif family == "deepseek_v3":
        # V3's: sigmoid router with a correction bias, groups scored by their best two, renormalised and scaled
        config = tf.DeepseekV3Config(**MLA, q_lora_rank=24, n_routed_experts=8, n_shared_experts=1,
                                     num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
                                     norm_topk_prob=True, routed_scaling_factor=2.5, rope_parameters=YARN)
        cls = tf.DeepseekV3ForCausalLM
    elif family == "glm4_moe":
        # GLM-4.5's: rotary embedding on half of each head (of 24, not hidden / heads), q/k norms and biases, the
        # sigmoid router with groups, a shared expert, layer 0 dense
        config = tf.Glm4MoeConfig(**COMMON, head_dim=24, intermediate_size=80, moe_intermediate_size=32,
                                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, n_group=4,
                                  topk_group=2, first_k_dense_replace=1, norm_topk_prob=True,
                                  routed_scaling_factor=1.8, use_qk_norm=True, attention_bias=True,
                                  rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                       partial_rotary_factor=0.5))
        cls = tf.Glm4MoeForCausalLM
    elif family in ("gpt_oss", "gpt_oss_calm"):
        # sinks, a window of 4 on every other layer, biases everywhere; expert width 40 != hidden 64, so that the
        # transposed fused tensors cannot pass for untransposed ones. gpt_oss's gate_up weights are scaled up so
        # that the SwiGLU's clamps engage; gpt_oss_calm's are not (8-bit weights keep the other families' bound)
        config = tf.GptOssConfig(**COMMON, head_dim=16, intermediate_size=40, num_local_experts=4,
                                 num_experts_per_tok=2, sliding_window=4,
                                 rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0,
                                                      original_max_position_embeddings=64, beta_fast=32.0,
                                                      beta_slow=1.0, truncate=False))
        cls = tf.GptOssForCausalLM
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    if family.startswith("gpt_oss") and "layer_types" not in overrides:  # alternating, for any number of layers
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(config.num_hidden_layers)]
    config._attn_implementation = "eager"
    torch.manual_seed(1234)
    model = cls(config).eval()
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # zeros at init: make the bias choose
            buffer.copy_(torch.randn(buffer.shape) * 0.1)
    if family.startswith("gpt_oss"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias"):  # zeros at init: make every bias count
                    param.copy_(torch.randn(param.shape) * 0.1)
                elif name.endswith("gate_up_proj") and family == "gpt_oss":  # the SwiGLU's clamps at +-7 engage
                    param.mul_(GPT_OSS_GATE_UP_GAIN)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def save(model, path: Path, layout: str = "default", dtype: torch.dtype | None = None) -> Path:
    """layout: default (per-expert 2D tensors), fused (3D gate_up_proj/down_proj) or sharded (several files)."""
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {}
    if layout == "fused":
        kwargs["save_original_format"] = False
    elif layout == "sharded":
        kwargs["max_shard_size"] = "60KB"
    model.save_pretrained(path, **kwargs)
    if dtype is not None:
        model.to(torch.float32)
    return path


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()
