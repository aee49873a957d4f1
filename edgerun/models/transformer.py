"""The decoder shared by every family: embeddings, attention with a KV cache, dense and MoE FFNs, output.

Shapes: T = tokens in this call, S = tokens in the cache after it, D = hidden, E = experts, K = experts per
token, I = expert width, V = vocab, H = query heads, G = query heads per KV head, Dh = head dim.

The math does no I/O and knows nothing of where expert weights live: it hands (layer, tokens, choices) to an
experts container, which may hold them in RAM or stream them from a store.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .rope import Rope, apply_rope
from .spec import ModelSpec


class Experts(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], idx [T, K] expert ids, weights [T, K] -> sum_k weights * expert_k(x), [T, D]."""


class Matrix(Protocol):
    """A weight matrix [out, in] kept in some other form than a torch tensor (quantized, for instance)."""

    dtype: torch.dtype  # the dtype its products come out in

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> x @ W^T (+ bias), [T, out]."""

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ids of W as a [len(ids), in] tensor (embedding lookup)."""


Weight = torch.Tensor | Matrix


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias) if isinstance(w, torch.Tensor) else w.linear(x, bias)


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder reads, by canonical name, with its shape."""
    D, V, Dh = spec.hidden_size, spec.vocab_size, spec.head_dim
    q_out, kv_out = spec.num_heads * Dh, spec.num_kv_heads * Dh
    shapes: dict[str, tuple[int, ...]] = {"embed": (V, D), "norm": (D,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head"] = (V, D)
    for i, kind in enumerate(spec.ffn_kinds):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (D,), p + "ffn_norm": (D,), p + "q": (q_out, D), p + "k": (kv_out, D),
                       p + "v": (kv_out, D), p + "o": (D, q_out)})
        if spec.sandwich_norm:
            shapes.update({p + "post_attn_norm": (D,), p + "post_ffn_norm": (D,)})
        if spec.qkv_bias:
            shapes.update({p + "q_bias": (q_out,), p + "k_bias": (kv_out,), p + "v_bias": (kv_out,)})
        if spec.o_bias:
            shapes[p + "o_bias"] = (D,)
        if spec.qk_norm == "head":
            shapes.update({p + "q_norm": (Dh,), p + "k_norm": (Dh,)})
        elif spec.qk_norm == "proj":
            shapes.update({p + "q_norm": (q_out,), p + "k_norm": (kv_out,)})
        if kind == "dense":
            I = spec.intermediate_size
            shapes.update({p + "mlp.gate": (I, D), p + "mlp.up": (I, D), p + "mlp.down": (D, I)})
            continue
        E, I = spec.num_experts, spec.moe_intermediate_size
        shapes.update({p + "router": (E, D), p + "experts.gate_up": (E, 2 * I, D), p + "experts.down": (E, D, I)})
        if spec.shared_expert_intermediate_size:
            Is = spec.shared_expert_intermediate_size
            shapes.update({p + "shared.gate": (Is, D), p + "shared.up": (Is, D), p + "shared.down": (D, Is)})
            if spec.shared_expert_gate:
                shapes[p + "shared_gate"] = (1, D)
    return shapes


def activation_fn(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the compute dtype, as every reference implementation does.
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


class KVCache:
    """Preallocated keys and values for one sequence: [layers, kv_heads, context, head_dim] each."""

    def __init__(self, spec: ModelSpec, context_length: int, dtype: torch.dtype):
        shape = (spec.num_layers, spec.num_kv_heads, context_length, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.context_length = context_length
        self.length = 0  # tokens currently held

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Transformer:
    """Forward pass of a decoder-only MoE model over canonical weights (see `expected_shapes`)."""

    def __init__(self, spec: ModelSpec, weights: dict[str, Weight], experts: Experts, context_length: int):
        self.spec = spec
        self.w = weights
        self.experts = experts
        self.rope = Rope(spec.rope, context_length)
        self.act = activation_fn(spec.activation)
        self.lm_head = weights["embed"] if spec.tie_word_embeddings else weights["lm_head"]
        self.dtype = weights["embed"].dtype  # activations and KV cache

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """Run tokens [T] at positions cache.length.. and append them to the cache.

        Returns float32 logits, [T, V] if all_logits else [1, V] for the last token only.
        """
        spec, start = self.spec, cache.length
        T = tokens.shape[0]
        embed = self.w["embed"]
        h = F.embedding(tokens, embed) if isinstance(embed, torch.Tensor) else embed.rows(tokens)  # [T, D]
        if spec.embedding_multiplier != 1.0:
            h = h * spec.embedding_multiplier
        cos, sin = self.rope.cos_sin(start, T, self.dtype)
        for i in range(spec.num_layers):
            p = f"layers.{i}."
            a = self.attention(i, rms_norm(h, self.w[p + "attn_norm"], spec.rms_norm_eps), cos, sin, cache, start)
            if spec.sandwich_norm:
                a = rms_norm(a, self.w[p + "post_attn_norm"], spec.rms_norm_eps)
            h = h + a
            x = rms_norm(h, self.w[p + "ffn_norm"], spec.rms_norm_eps)
            f = self.moe(i, x) if spec.ffn_kinds[i] == "moe" else self.mlp(x, p + "mlp.")
            if spec.sandwich_norm:
                f = rms_norm(f, self.w[p + "post_ffn_norm"], spec.rms_norm_eps)
            h = h + f
        cache.length = start + T
        if not all_logits:
            h = h[-1:]
        h = rms_norm(h, self.w["norm"], spec.rms_norm_eps)
        logits = linear(h, self.lm_head).float()
        if spec.output_multiplier != 1.0:
            logits = logits * spec.output_multiplier
        return softcap(logits, spec.final_logit_softcap)

    def attention(self, i: int, x: torch.Tensor, cos, sin, cache: KVCache, start: int) -> torch.Tensor:
        spec, w, p = self.spec, self.w, f"layers.{i}."
        T, Dh, H, KV = x.shape[0], spec.head_dim, spec.num_heads, spec.num_kv_heads
        q = linear(x, w[p + "q"], w.get(p + "q_bias"))
        k = linear(x, w[p + "k"], w.get(p + "k_bias"))
        v = linear(x, w[p + "v"], w.get(p + "v_bias"))
        if spec.qk_norm == "proj":
            q = rms_norm(q, w[p + "q_norm"], spec.rms_norm_eps)
            k = rms_norm(k, w[p + "k_norm"], spec.rms_norm_eps)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(T, H, Dh), k.view(T, KV, Dh), v.view(T, KV, Dh)
        if spec.qk_norm == "head":
            q = rms_norm(q, w[p + "q_norm"], spec.rms_norm_eps)
            k = rms_norm(k, w[p + "k_norm"], spec.rms_norm_eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        end = start + T
        cache.k[i, :, start:end] = k.transpose(0, 1)
        cache.v[i, :, start:end] = v.transpose(0, 1)
        keys, values = cache.k[i, :, :end], cache.v[i, :, :end]  # [KV, S, Dh]
        mask = self._mask(start, T, spec.sliding_windows[i])  # [T, S] True = may attend, None = all
        if spec.attn_softcap is None:
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                attn_mask=mask, scale=spec.scale, enable_gqa=H != KV,
            )[0]  # [H, T, Dh]
        else:
            out = self._capped_attention(q, keys, values, mask)
        return linear(out.transpose(0, 1).reshape(T, H * Dh), w[p + "o"], w.get(p + "o_bias"))

    def _capped_attention(self, q, keys, values, mask) -> torch.Tensor:
        """Attention with soft-capped logits (Grok): cap * tanh(scale * q.k / cap), in float32."""
        spec = self.spec
        T, H, Dh = q.shape
        KV = keys.shape[0]
        qg = q.view(T, KV, H // KV, Dh).permute(1, 2, 0, 3)  # [KV, G, T, Dh]
        scores = torch.matmul(qg, keys.unsqueeze(1).transpose(-1, -2)).float() * spec.scale  # [KV, G, T, S]
        scores = softcap(scores, spec.attn_softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(values.dtype)
        out = torch.matmul(probs, values.unsqueeze(1))  # [KV, G, T, Dh]
        return out.reshape(H, T, Dh)

    @staticmethod
    def _mask(start: int, T: int, window: int | None) -> torch.Tensor | None:
        end = start + T
        if T == 1 and (window is None or end <= window):
            return None  # a single new token sees the whole cache
        q_pos = torch.arange(start, end)[:, None]
        k_pos = torch.arange(end)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return mask

    def mlp(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        w = self.w
        return linear(self.act(linear(x, w[prefix + "gate"])) * linear(x, w[prefix + "up"]), w[prefix + "down"])

    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router: returns expert ids [T, K] and their weights [T, K] (compute dtype)."""
        spec = self.spec
        logits = softcap(linear(x, self.w[f"layers.{i}.router"]), spec.router_softcap)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, idx = torch.topk(probs, spec.top_k, dim=-1)
        if spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, weights.to(x.dtype)

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        spec, p = self.spec, f"layers.{i}."
        idx, weights = self.route(i, x)
        out = self.experts(i, x, idx, weights)
        if spec.shared_expert_intermediate_size:
            shared = self.mlp(x, p + "shared.")
            if spec.shared_expert_gate:
                shared = torch.sigmoid(linear(x, self.w[p + "shared_gate"])) * shared
            out = out + shared
        return out

