"""Multi-head latent attention (DeepSeek-V2 and V3, Kimi-K2).

Keys and values come from a latent of `kv_lora_rank` values per token (normed), which `kv_b` expands into every
head's key part without rotary embedding (`qk_nope_head_dim`) and its value (`v_head_dim`); one more key part of
`qk_rope_head_dim` values, shared by all heads, carries the rotary embedding. The cache holds only the latent and
that rotated key part: for DeepSeek-V3, 576 values per token and layer where full keys and values would be 40960.

Attention is computed in the absorbed form, never expanding the cache: a query's non-rotary part is taken into the
latent space through its head's slice of `kv_b` (q . k = (W_uk^T q) . latent), and the softmax-weighted latents
are expanded into values once per query (W_uv (sum p latent)). The query comes from one matrix (`q`) or, with
`q_lora_rank`, through a low-rank pair with a norm between (`q_a`, `q_a_norm`, `q_b`).

Rotary dims are in two halves (NeoX) or, with `rope_interleave` (every DeepSeek release), in pairs (x0, x1),
(x2, x3) ...; pairs are brought into halves before rotating, for queries and keys alike, which leaves every q . k
as it was.

Shapes: T = tokens in this call, S = tokens in the cache after it, D = hidden, H = heads, R = kv_lora_rank,
N = qk_nope_head_dim, P = qk_rope_head_dim, V = v_head_dim.
"""

from __future__ import annotations

import torch

from .attention import Positions, causal_mask
from .parts import F32, Part, TensorSpec, linear, rms_norm
from .rope import apply_rope

# the norms on the q and kv latents keep their class's default epsilon whatever rms_norm_eps says, in DeepSeek's
# code as in transformers' (every release has rms_norm_eps 1e-6 too)
LATENT_NORM_EPS = 1e-6


class LatentCache:
    """The latents [context, R] and rotated shared keys [context, P] of one layer."""

    def __init__(self, rank: int, rope_dim: int, context_length: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        self.latent = torch.zeros((context_length, rank), dtype=dtype, device=device)
        self.k_rot = torch.zeros((context_length, rope_dim), dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_rot.nbytes


def pairs_to_halves(x: torch.Tensor) -> torch.Tensor:
    """[..., P] with rotary dims in pairs -> the same values with the pairs' first members, then their second."""
    return x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


class LatentAttention(Part):
    def __init__(self, spec, layer: int):
        super().__init__(f"layers.{layer}.")
        self.layer = layer
        self.hidden, self.heads = spec.hidden_size, spec.num_heads
        self.q_rank, self.rank = spec.q_lora_rank, spec.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = spec.qk_nope_head_dim, spec.rope.head_dim, spec.v_head_dim
        self.bias = spec.qkv_bias
        self.scale = spec.attn_scale if spec.attn_scale is not None else (self.nope + self.rope_dim) ** -0.5
        self.window = spec.sliding_windows[layer]
        self.eps = LATENT_NORM_EPS
        self.rope = spec.rope
        self.interleaved = spec.rope_interleave

    def declare(self) -> dict[str, TensorSpec]:
        D, H, R, P = self.hidden, self.heads, self.rank, self.rope_dim
        q_out = H * (self.nope + P)
        if self.q_rank:
            out = {"q_a": TensorSpec((self.q_rank, D)), "q_a_norm": TensorSpec((self.q_rank,)),
                   "q_b": TensorSpec((q_out, self.q_rank))}
        else:
            out = {"q": TensorSpec((q_out, D))}
        out.update({
            "kv_a": TensorSpec((R + P, D)), "kv_a_norm": TensorSpec((R,)),
            # read as per-head blocks (its transpose for queries) in the absorbed form: kept unquantized
            "kv_b": TensorSpec((H * (self.nope + self.v_dim), R), exact=True),
            "o": TensorSpec((D, H * self.v_dim)),
        })
        if self.bias:
            if self.q_rank:
                out["q_a_bias"] = TensorSpec((self.q_rank,))
            out.update(kv_a_bias=TensorSpec((R + P,)), o_bias=TensorSpec((D,)))
        return out

    # -- the cache ----------------------------------------------------------------------------------------------
    def new_cache(self, context_length: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> LatentCache:
        return LatentCache(self.rank, self.rope_dim, context_length, dtype, device)

    def cache_bytes(self, context_length: int, dtype: torch.dtype) -> int:
        return context_length * (self.rank + self.rope_dim) * torch.empty((), dtype=dtype).element_size()

    def scratch_bytes(self, tokens: int, context: int) -> int:
        # the scores against the whole context, and each query in latent space twice (scores, weighted latents)
        return self.heads * tokens * (context + 2 * self.rank) * F32

    # -- the forward pass ---------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, pos: Positions, cache: LatentCache) -> torch.Tensor:
        w, T, H = self.w, x.shape[0], self.heads
        if self.q_rank:
            q = linear(rms_norm(linear(x, w["q_a"], w.get("q_a_bias")), w["q_a_norm"], self.eps), w["q_b"])
        else:
            q = linear(x, w["q"])
        q_pass, q_rot = q.view(T, H, -1).split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = linear(x, w["kv_a"], w.get("kv_a_bias")).split([self.rank, self.rope_dim], dim=-1)
        if self.interleaved:
            q_rot, k_rot = pairs_to_halves(q_rot), pairs_to_halves(k_rot)
        cos, sin = pos.rotary(self.rope)
        q_rot, k_rot = apply_rope(q_rot, cos, sin), apply_rope(k_rot[:, None], cos, sin)[:, 0]
        cache.latent[pos.start:pos.end] = rms_norm(latent, w["kv_a_norm"], self.eps)
        cache.k_rot[pos.start:pos.end] = k_rot
        latents, keys = cache.latent[:pos.end], cache.k_rot[:pos.end]  # [S, R], [S, P]

        kv_b = w["kv_b"].view(H, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = kv_b[:, :self.nope], kv_b[:, self.nope:]  # [H, N, R], [H, V, R]
        dtype = w_uk.dtype
        q_latent = torch.matmul(q_pass.transpose(0, 1).to(dtype), w_uk).to(x.dtype)  # [H, T, R]
        scores = (torch.matmul(q_latent, latents.T) + torch.matmul(q_rot.transpose(0, 1), keys.T)).float()
        scores = scores * self.scale  # [H, T, S]
        mask = causal_mask(pos.start, pos.length, self.window, pos.device)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(x.dtype)
        out = torch.matmul(torch.matmul(probs, latents).to(dtype), w_uv.transpose(1, 2)).to(x.dtype)  # [H, T, V]
        return linear(out.transpose(0, 1).reshape(T, H * self.v_dim), w["o"], w.get("o_bias"))
