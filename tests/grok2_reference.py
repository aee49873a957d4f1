"""A deliberately plain Grok-2 forward pass, the yardstick for edgerun's Grok-2 support.

Written from the semantics of SGLang's Grok implementation (the engine xai-org's Grok-2 release names), not from
edgerun: float32 throughout, explicit loops over heads, experts and tokens, and full recomputation (no KV cache).
It reads the release's tensor names from whole (unsharded) tensors.

Per layer, with h the residual stream:
    h = h + post_attn_norm(attention(pre_attn_norm(h)))
    x = pre_moe_norm(h)
    h = h + post_moe_norm((mlp(x) + moe(x)) / sqrt(2))          # residual_moe
attention logits: 30 tanh((q.k / sqrt(head_dim)) / 30), times log2(p) / log2(attn_temperature_len) for a query at
    0-based position p > attn_temperature_len; rotary embeddings NeoX style over the whole head, unscaled
moe: router logits in float32, 30 tanh(l / 30), softmax over all experts, top-2 probabilities as weights
    (not renormalised); experts and mlp: down(gelu(gate x) * up x) with the exact (erf) GELU
output: 50 tanh(0.5 (norm(h) . lm_head) / 50); input embeddings times embedding_multiplier_scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def cap(x: torch.Tensor, value: float) -> torch.Tensor:
    return value * torch.tanh(x / value) if value and value > 0 else x


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, d] at positions 0..T-1: the two halves of each head rotated together (NeoX)."""
    t, _, d = x.shape
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def gated_gelu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return (F.gelu(x @ gate.float().T) * (x @ up.float().T)) @ down.float().T


def attention(x: torch.Tensor, w: dict, p: str, c: dict, stats: dict | None) -> torch.Tensor:
    t = x.shape[0]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c.get("head_dim", 128)
    q = (x @ w[f"{p}.self_attn.q_proj.weight"].float().T).view(t, nh, hd)
    k = (x @ w[f"{p}.self_attn.k_proj.weight"].float().T).view(t, nkv, hd)
    v = (x @ w[f"{p}.self_attn.v_proj.weight"].float().T).view(t, nkv, hd)
    q, k = rope(q, c["rope_theta"]), rope(k, c["rope_theta"])
    n = c.get("attn_temperature_len", -1)
    heads = []
    for head in range(nh):
        kv = head // (nh // nkv)
        out = torch.zeros(t, hd)
        for i in range(t):  # one query at a time, against keys 0..i
            raw = (k[: i + 1, kv] @ q[i, head]) * hd ** -0.5
            if stats is not None:
                stats["max_attn_logit"] = max(stats.get("max_attn_logit", 0.0), raw.abs().max().item())
            logits = cap(raw, c.get("attn_logit_softcapping", 30.0))
            if n > 0 and i > n:
                logits = logits * (math.log2(i) / math.log2(n))
            out[i] = torch.softmax(logits, dim=0) @ v[: i + 1, kv]
        heads.append(out)
    return torch.cat(heads, dim=-1) @ w[f"{p}.self_attn.o_proj.weight"].float().T


def moe(x: torch.Tensor, w: dict, p: str, c: dict, stats: dict | None) -> torch.Tensor:
    raw = x.float() @ w[f"{p}.block_sparse_moe.gate.weight"].float().T
    probs = torch.softmax(cap(raw, c.get("router_logit_softcapping", 30.0)), dim=-1)
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        top = torch.sort(probs[i], descending=True)
        chosen, weight = top.indices[: c["num_experts_per_tok"]], top.values[: c["num_experts_per_tok"]]
        if stats is not None:
            stats.setdefault("experts", []).append(tuple(sorted(chosen.tolist())))
            stats.setdefault("topk_mass", []).append(weight.sum().item())
            stats["max_router_logit"] = max(stats.get("max_router_logit", 0.0), raw[i].abs().max().item())
            gap = (top.values[c["num_experts_per_tok"] - 1] - top.values[c["num_experts_per_tok"]]).item()
            stats["min_route_gap"] = min(stats.get("min_route_gap", 1.0), gap)
        for e, pe in zip(chosen.tolist(), weight):
            ex = f"{p}.block_sparse_moe.experts.{e}"
            out[i] += pe * gated_gelu(x[i:i + 1], w[f"{ex}.w1.weight"], w[f"{ex}.w3.weight"], w[f"{ex}.w2.weight"])[0]
    return out


def forward(w: dict, c: dict, tokens: list[int], stats: dict | None = None) -> torch.Tensor:
    """Logits [T, vocab], recomputed from scratch; `stats` (optional) collects what tests check is exercised."""
    eps = c["rms_norm_eps"]
    h = w["model.embed_tokens.weight"].float()[torch.tensor(tokens)] * c["embedding_multiplier_scale"]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}"
        a = attention(rms_norm(h, w[f"{p}.pre_attn_norm.weight"], eps), w, p, c, stats)
        h = h + rms_norm(a, w[f"{p}.post_attn_norm.weight"], eps)
        x = rms_norm(h, w[f"{p}.pre_moe_norm.weight"], eps)
        f = moe(x, w, p, c, stats)
        if c.get("residual_moe"):
            mlp = gated_gelu(x, w[f"{p}.mlp.gate_proj.weight"], w[f"{p}.mlp.up_proj.weight"],
                             w[f"{p}.mlp.down_proj.weight"])
            f = (mlp + f) / math.sqrt(2)
        h = h + rms_norm(f, w[f"{p}.post_moe_norm.weight"], eps)
    h = rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c.get("tie_word_embeddings") else w["lm_head.weight"]
    return cap((h @ head.float().T) * c["output_multiplier_scale"], c.get("final_logit_softcapping"))


def greedy(w: dict, c: dict, prompt: list[int], steps: int) -> tuple[list[int], float]:
    """Greedy continuation by full recomputation; also the smallest top-1/top-2 logit margin seen."""
    ids, new, margin = list(prompt), [], math.inf
    for _ in range(steps):
        last = forward(w, c, ids)[-1]
        top2 = torch.topk(last, 2).values
        margin = min(margin, (top2[0] - top2[1]).item())
        new.append(int(last.argmax()))
        ids.append(new[-1])
    return new, margin
