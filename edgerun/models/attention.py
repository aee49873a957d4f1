"""Attention parts. Each owns its layer's cache: it allocates it and says what it costs.

Shapes: T = tokens in this call, S = tokens in the cache after it, D = hidden, H = query heads, KV = key/value
heads, Dh = head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import native
from .parts import F32, Part, TensorSpec, Weight, in_host_memory, linear, rms_norm, softcap, stack_rows
from .rope import Rope, RopeSpec, apply_rope


class Positions:
    """Where the tokens of one forward call sit (start .. start + length - 1) and on which device, with their
    rotary tables, made once per call and rotary schedule and shared by every layer."""

    def __init__(self, start: int, length: int, dtype: torch.dtype, ropes: dict,
                 device: torch.device | str = "cpu"):
        self.start, self.length, self.dtype, self.device = start, length, dtype, torch.device(device)
        self._ropes = ropes  # the decoder's tables, by schedule and device
        self._cos_sin: dict = {}

    @property
    def end(self) -> int:
        return self.start + self.length

    def rotary(self, spec: RopeSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, rotary dim / 2] of these positions."""
        key = (spec.key(), self.device)
        if key not in self._cos_sin:
            rope = self._ropes.get(key)
            if rope is None:
                rope = self._ropes[key] = Rope(spec, self.end, self.device)
            self._cos_sin[key] = rope.cos_sin(self.start, self.length, self.dtype)
        return self._cos_sin[key]


class KVCache:
    """Keys and values of one layer, preallocated: [KV, context, Dh] each."""

    def __init__(self, kv_heads: int, head_dim: int, context_length: int, dtype: torch.dtype,
                 device: torch.device | str | None = None):
        self.k = torch.zeros((kv_heads, context_length, head_dim), dtype=dtype, device=device)
        self.v = torch.zeros((kv_heads, context_length, head_dim), dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def causal_mask(start: int, T: int, window: int | None, device: torch.device | str | None = None
                ) -> torch.Tensor | None:
    """[T, S] True where a query may attend to a key, on `device`; None when every query sees the whole cache."""
    end = start + T
    if T == 1 and (window is None or end <= window):
        return None
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = torch.arange(end, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


class Attention(Part):
    """Grouped-query attention with rotary embeddings and a KV cache.

    Options from the spec: biases on q/k/v and o, q/k RMSNorm per head or over the whole projection, clipping of
    q/k/v, the logit scale, a soft cap on the logits (computed in float32), a logit temperature that grows with
    the query's position (Grok-2), a sink per head (gpt-oss: a learned logit that joins every softmax and takes its
    share of the weight, attending nowhere) and a sliding window per layer."""

    def __init__(self, spec, layer: int):
        super().__init__(f"layers.{layer}.")
        self.layer = layer
        self.hidden, self.heads, self.kv_heads, self.head_dim = (spec.hidden_size, spec.num_heads, spec.num_kv_heads,
                                                                 spec.head_dim)
        self.qkv_bias, self.o_bias, self.qk_norm, self.clip = spec.qkv_bias, spec.o_bias, spec.qk_norm, spec.clip_qkv
        self.scale = spec.attn_scale if spec.attn_scale is not None else spec.head_dim ** -0.5
        self.cap = spec.attn_softcap
        self.temperature_len = spec.attn_temperature_len
        self.sinks = spec.attn_sinks
        self.window = spec.sliding_windows[layer]
        self.eps = spec.rms_norm_eps
        self.rope = spec.rope
        self.qkv: tuple[Weight, torch.Tensor | None, list[int]] | None = None  # q, k, v stacked (see bind)

    def declare(self) -> dict[str, TensorSpec]:
        D, q_out, kv_out = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        out = {"q": TensorSpec((q_out, D)), "k": TensorSpec((kv_out, D)), "v": TensorSpec((kv_out, D)),
               "o": TensorSpec((D, q_out))}
        if self.qkv_bias:
            out.update(q_bias=TensorSpec((q_out,)), k_bias=TensorSpec((kv_out,)), v_bias=TensorSpec((kv_out,)))
        if self.o_bias:
            out["o_bias"] = TensorSpec((D,))
        if self.sinks:
            out["sinks"] = TensorSpec((self.heads,))
        if self.qk_norm == "head":
            out.update(q_norm=TensorSpec((self.head_dim,)), k_norm=TensorSpec((self.head_dim,)))
        elif self.qk_norm == "proj":
            out.update(q_norm=TensorSpec((q_out,)), k_norm=TensorSpec((kv_out,)))
        return out

    def bind(self, weights) -> None:
        super().bind(weights)
        self.qkv = None

    def stack_qkv(self) -> None:
        """Stack quantized q, k and v in host memory into one matrix (q, k and v then view its rows), so that a
        token's projections take one kernel call instead of three. The rows are copied: for weights that stay in
        RAM (see Decoder.stack_projections)."""
        stacked = stack_rows([self.w["q"], self.w["k"], self.w["v"]])
        if stacked is not None:
            whole, (self.w["q"], self.w["k"], self.w["v"]) = stacked
            bias = torch.cat([self.w["q_bias"], self.w["k_bias"], self.w["v_bias"]]) if self.qkv_bias else None
            self.qkv = whole, bias, [self.w[n].out_features for n in "qkv"]

    # -- the cache ----------------------------------------------------------------------------------------------
    def new_cache(self, context_length: int, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> KVCache:
        return KVCache(self.kv_heads, self.head_dim, context_length, dtype, device)

    def cache_bytes(self, context_length: int, dtype: torch.dtype) -> int:
        return 2 * self.kv_heads * context_length * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def scratch_bytes(self, tokens: int, context: int) -> int:
        return self.heads * tokens * context * F32  # the scores of a call against the whole context

    # -- the forward pass ---------------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, pos: Positions, cache: KVCache) -> torch.Tensor:
        q, k, v = self.project(x)
        cos, sin = pos.rotary(self.rope)
        if pos.length == 1 and in_host_memory(cache.k):
            out = self.attend_one(q[0], k[0], v[0], cos[0], sin[0], cache, pos)
            return linear(out.view(1, -1), self.w["o"], self.w.get("o_bias"))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[:, pos.start:pos.end] = k.transpose(0, 1)
        cache.v[:, pos.start:pos.end] = v.transpose(0, 1)
        keys, values = cache.k[:, :pos.end], cache.v[:, :pos.end]  # [KV, S, Dh]
        mask = causal_mask(pos.start, pos.length, self.window, pos.device)
        out = self.attend(q, keys, values, mask, pos)  # [H, T, Dh]
        return linear(out.transpose(0, 1).reshape(pos.length, -1), self.w["o"], self.w.get("o_bias"))

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H, Dh], k and v [T, KV, Dh] before rotation."""
        w, T = self.w, x.shape[0]
        if self.qkv is not None:
            whole, bias, sizes = self.qkv
            q, k, v = linear(x, whole, bias).split(sizes, dim=1)
        else:
            q = linear(x, w["q"], w.get("q_bias"))
            k = linear(x, w["k"], w.get("k_bias"))
            v = linear(x, w["v"], w.get("v_bias"))
        if self.qk_norm == "proj":
            q, k = rms_norm(q, w["q_norm"], self.eps), rms_norm(k, w["k_norm"], self.eps)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.view(T, self.heads, -1), k.view(T, self.kv_heads, -1), v.view(T, self.kv_heads, -1)
        if self.qk_norm == "head":
            q, k = rms_norm(q, w["q_norm"], self.eps), rms_norm(k, w["k_norm"], self.eps)
        return q, k, v

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: KVCache, pos: Positions) -> torch.Tensor:
        """A decode step's attention in one kernel call (rotation, the cache's update, every head): q [H, Dh], k and
        v [KV, Dh], float32 on the CPU -> [H, Dh]. The same math as `attend`, without a torch call per step."""
        sinks = self.w["sinks"].float().numpy() if self.sinks else None
        temperature = float(self.temperature(pos)[0]) if self.temperature_len else 1.0
        out = native.attend_one(q.contiguous().numpy(), k.contiguous().numpy(), v.contiguous().numpy(),
                                cos.contiguous().numpy(), sin.contiguous().numpy(), cache.k.numpy(), cache.v.numpy(),
                                pos.start, self.scale, self.window, self.cap, temperature, sinks)
        return torch.from_numpy(out)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
               pos: Positions) -> torch.Tensor:
        """q [T, H, Dh] against the cache [KV, S, Dh] -> [H, T, Dh]."""
        H, KV = self.heads, self.kv_heads
        if self.cap is None and not self.temperature_len and not self.sinks:
            return F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0),
                                                  values.unsqueeze(0), attn_mask=mask, scale=self.scale,
                                                  enable_gqa=H != KV)[0]
        # logits in float32: cap * tanh(scale * q.k / cap), then the position's temperature
        T, _, Dh = q.shape
        qg = q.view(T, KV, H // KV, Dh).permute(1, 2, 0, 3)  # [KV, G, T, Dh]
        scores = torch.matmul(qg, keys.unsqueeze(1).transpose(-1, -2)).float() * self.scale  # [KV, G, T, S]
        scores = softcap(scores, self.cap)
        if self.temperature_len:
            scores = scores * self.temperature(pos)[:, None]
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        if self.sinks:
            sink = self.w["sinks"].float().view(KV, H // KV, 1, 1).expand(*scores.shape[:-1], 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1].to(values.dtype)
        else:
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
        return torch.matmul(probs, values.unsqueeze(1)).reshape(H, T, Dh)

    def temperature(self, pos: Positions) -> torch.Tensor:
        """[T] factors on the logits of each query: log2(p) / log2(n) for a query at position p > n =
        attn_temperature_len (positions count from 0), else 1. Longer contexts sharpen attention (as SGLang's
        kernels do for Grok-2)."""
        n = self.temperature_len
        p = torch.arange(pos.start, pos.end, dtype=torch.float32, device=pos.device)
        return torch.where(p > n, torch.log2(p) / math.log2(n), torch.ones_like(p))
