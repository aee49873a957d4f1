"""Checkpoint-name rules shared by the families that use the Llama-style HF naming.

Each rule maps a regex over a checkpoint tensor name to a canonical name (the names the decoder's parts declare).
The MoE block is `block_sparse_moe` in Mixtral's original layout and `mlp` in the others (and in
transformers v5's fused layout for every family).
"""

L = r"model\.layers\.(\d+)\."
MOE = L + r"(?:mlp|block_sparse_moe)\."

HF_RULES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "embed"),
    (r"lm_head\.weight", "lm_head"),
    (r"model\.norm\.weight", "norm"),
    (L + r"input_layernorm\.weight", r"layers.\1.attn_norm"),
    (L + r"post_attention_layernorm\.weight", r"layers.\1.ffn_norm"),
    (L + r"self_attn\.([qkvo])_proj\.weight", r"layers.\1.\2"),
    (L + r"self_attn\.([qkvo])_proj\.bias", r"layers.\1.\2_bias"),
    (L + r"self_attn\.([qk])_norm\.weight", r"layers.\1.\2_norm"),
    (MOE + r"gate\.weight", r"layers.\1.router"),
    (MOE + r"experts\.(\d+)\.(?:w1|gate_proj)\.weight", r"layers.\1.experts.\2.gate"),
    (MOE + r"experts\.(\d+)\.(?:w3|up_proj)\.weight", r"layers.\1.experts.\2.up"),
    (MOE + r"experts\.(\d+)\.(?:w2|down_proj)\.weight", r"layers.\1.experts.\2.down"),
    (MOE + r"experts\.gate_up_proj", r"layers.\1.experts.gate_up"),
    (MOE + r"experts\.down_proj", r"layers.\1.experts.down"),
    (L + r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"layers.\1.shared.\2"),
    (L + r"mlp\.shared_expert_gate\.weight", r"layers.\1.shared_gate"),
    (L + r"mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2"),
]

# DeepSeek's MoE block, which GLM-4.5 shares: a correction bias beside the router, and `shared_experts`
SHARED_EXPERTS_RULES: list[tuple[str, str]] = [
    (MOE + r"gate\.e_score_correction_bias", r"layers.\1.router_bias"),
    (L + r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"layers.\1.shared.\2"),
]
