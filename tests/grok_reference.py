"""A deliberately plain Grok-1 forward pass, used as the yardstick for edgerun's Grok-1 support.

Written from the architecture description of the original Grok-1 release, not from edgerun:
float32 throughout, explicit loops over heads, experts and tokens, and full recomputation
(no KV cache) so there is no incremental state that could hide a bug.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def norm_weight(weights: dict, prefix: str) -> torch.Tensor:
    # conversions disagree on the suffix: the JAX original says "scale", some ports say "weight"
    for suffix in ("scale", "weight"):
        if f"{prefix}.{suffix}" in weights:
            return weights[f"{prefix}.{suffix}"].float()
    raise KeyError(f"{prefix}.scale")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight  # plain weight, not (1 + weight)


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """NeoX-style rotary embedding of x [T, heads, d] at positions 0..T-1, over the full head dim."""
    t, _, d = x.shape
    inv_freq = theta ** (-(torch.arange(d // 2, dtype=torch.float64) * 2 / d))
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, d/2]
    angles = torch.cat([angles, angles], dim=-1)  # both halves share the frequencies
    cos = angles.cos().float()[:, None, :]
    sin = angles.sin().float()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def attention(x: torch.Tensor, weights: dict, prefix: str, config: dict, stats: dict | None) -> torch.Tensor:
    t = x.shape[0]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], head_dim(config)
    q = (x @ weights[f"{prefix}.q_proj.weight"].float().T).view(t, nh, hd)
    k = (x @ weights[f"{prefix}.k_proj.weight"].float().T).view(t, nkv, hd)
    v = (x @ weights[f"{prefix}.v_proj.weight"].float().T).view(t, nkv, hd)
    q, k = rope(q, config["rope_theta"]), rope(k, config["rope_theta"])
    cap = config["max_attn_value"]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    heads = []
    for h in range(nh):
        kv = h // (nh // nkv)  # grouped-query: consecutive query heads share one kv head
        raw = (q[:, h] @ k[:, kv].T) * config["attn_output_multiplier"]  # replaces 1/sqrt(d)
        if stats is not None:
            stats["max_attn_logit"] = max(stats.get("max_attn_logit", 0.0), raw[causal].abs().max().item())
        scores = cap * torch.tanh(raw / cap)  # soft cap before the mask
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
    return torch.cat(heads, dim=-1) @ weights[f"{prefix}.o_proj.weight"].float().T


def moe(x: torch.Tensor, weights: dict, prefix: str, config: dict, stats: dict | None) -> torch.Tensor:
    n_exp, top_k = config["num_experts"], config["num_experts_per_tok"]
    probs = torch.softmax(x @ weights[f"{prefix}.gate.weight"].float().T, dim=-1)  # over all experts
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        ranked = torch.sort(probs[i], descending=True)
        chosen, chosen_p = ranked.indices[:top_k], ranked.values[:top_k]  # not renormalized
        if stats is not None:
            stats.setdefault("experts", []).append(tuple(sorted(chosen.tolist())))
            stats.setdefault("topk_mass", []).append(chosen_p.sum().item())
            if top_k < n_exp:  # how close the selection came to a tie
                gap = (ranked.values[top_k - 1] - ranked.values[top_k]).item()
                stats["min_route_gap"] = min(stats.get("min_route_gap", 1.0), gap)
        for e, p in zip(chosen.tolist(), chosen_p):
            ex = f"{prefix}.experts.{e}"
            gate = F.gelu(x[i] @ weights[f"{ex}.linear.weight"].float().T, approximate="tanh")
            up = x[i] @ weights[f"{ex}.linear_v.weight"].float().T
            out[i] += p * ((gate * up) @ weights[f"{ex}.linear_1.weight"].float().T)
    return out


def forward(weights: dict, config: dict, tokens: list[int], stats: dict | None = None) -> torch.Tensor:
    """Logits [T, vocab] for `tokens`, recomputed from scratch. `stats`, if given, collects
    diagnostics (largest pre-cap attention logit, expert choices) so tests can check that the
    soft cap and the routing are actually exercised."""
    eps = config["rms_norm_eps"]
    embed = weights["model.embed_tokens.weight"].float()
    h = embed[torch.tensor(tokens, dtype=torch.long)] * config["embedding_multiplier_scale"]
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}"
        a = attention(rms_norm(h, norm_weight(weights, f"{p}.pre_attn_norm"), eps), weights, f"{p}.attn", config, stats)
        h = h + rms_norm(a, norm_weight(weights, f"{p}.post_attn_norm"), eps)
        m = moe(rms_norm(h, norm_weight(weights, f"{p}.pre_moe_norm"), eps), weights, f"{p}.moe_block", config, stats)
        h = h + rms_norm(m, norm_weight(weights, f"{p}.post_moe_norm"), eps)
    h = rms_norm(h, norm_weight(weights, "model.norm"), eps)
    tied = config.get("tie_word_embeddings", True) or "lm_head.weight" not in weights
    head = embed if tied else weights["lm_head.weight"].float()
    return (h @ head.T) * config["output_multiplier_scale"]


def greedy(weights: dict, config: dict, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy continuation by full recomputation at every step; also returns the smallest
    top-1/top-2 logit margin seen, so a test can tell a clear argmax from a near tie."""
    ids, new, margin = list(prompt), [], math.inf
    for _ in range(steps):
        last = forward(weights, config, ids)[-1]
        top2 = torch.topk(last, 2).values
        margin = min(margin, (top2[0] - top2[1]).item())
        nxt = int(last.argmax())
        ids.append(nxt)
        new.append(nxt)
    return new, margin
