"""A decoded token through every layer in one kernel call, where the decoder is made of the plain parts.

The parts (models/) compute a token layer by layer, a few kernel calls each, with Python and torch around them: on a
resident model of 16 layers that costs about 2 ms of a 20 ms token. `TokenLayers` hands a decode step's layers to
`native.decode_layers` instead, which calls the same kernels in the same order. It applies when every layer is
RMSNorm, grouped-query attention (no biases, q/k norms or clipping; soft caps, sinks, windows and Grok-2's
temperature are taken) and RMSNorm before its FFN, the matrices q8/q4 in host memory. Prompts and other decoders keep
the parts' path.

Two ways through the layers:
- whole: the kernel routes and computes the experts too, where every FFN is routed experts of a softmax top-k router
  (no biases, no shared experts) resident in a store (QuantizedExperts). An expert not mapped yet makes the call
  return at its layer: it is mapped (and checked, as the parts' path does on first use) and the call goes on.
- stepped, otherwise (experts streamed through a cache, routers replaced by a routing trace, other FFN parts): the
  kernel returns at every layer with the FFN's input, the layer's own FFN part computes its output as on the parts'
  path (routing, cache, read-ahead), and it is added before the next call goes on from the next layer. For experts
  streamed through a cache (OffloadedExperts) the container does all but the computing where the layer's experts are
  all whole in slots once their reads are scheduled: it gives their slots, and the next call computes them from
  there, as the container's own kernel call would, before it goes on.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import native
from ..errors import ContextLengthError
from ..models.attention import Attention
from ..models.ffn import MoE
from ..models.routers import SoftmaxTopK
from ..store.quant import padded_in_features
from .offload import OffloadedExperts
from .quantized import QuantizedExperts, QuantizedMatrix


class TokenLayers:
    """Every layer of a decoded token in `native.decode_layers` calls (see the module's note)."""

    @classmethod
    def build(cls, decoder, experts) -> TokenLayers | None:
        """The fused step for decoder computing its experts with `experts`, or None where it does not apply."""
        if decoder.dtype != torch.float32 or not native.fusable():
            return None
        blocks = decoder.blocks
        attn = blocks[0].attention
        stacked = getattr(attn, "qkv", None) is not None  # q, k and v in one matrix (all resident), else one each
        dense_dtype = None
        for b in blocks:
            a = b.attention
            if (b.post_attn_norm is not None or b.post_ffn_norm is not None or type(a) is not Attention
                    or (a.qkv is not None) != stacked or a.qkv_bias or a.o_bias or a.qk_norm or a.clip is not None
                    or (a.heads, a.kv_heads, a.head_dim, a.scale, a.cap, a.temperature_len, a.sinks, a.rope,
                        a.eps) != (attn.heads, attn.kv_heads, attn.head_dim, attn.scale, attn.cap,
                                   attn.temperature_len, attn.sinks, attn.rope, attn.eps)
                    or b.ffn_norm.eps != attn.eps or b.attn_norm.eps != attn.eps):
                return None
            for m in cls._matrices(a):
                if (not isinstance(m, QuantizedMatrix) or dense_dtype not in (None, m.qs.dtype)
                        or m.scales.dtype != np.float16 or m.padded_in != m.in_features):
                    return None
                dense_dtype = m.qs.dtype
            if any(n.weight.dtype != torch.float32 or n.weight.device.type != "cpu" for n in (b.attn_norm, b.ffn_norm)):
                return None
        return cls(decoder, experts, dense_dtype, cls._routes(decoder, experts))

    @staticmethod
    def _matrices(a: Attention) -> list:
        """The attention's matrices as the kernel takes them: q, k and v (stacked, or each), then o."""
        return [a.qkv[0], a.w["o"]] if a.qkv is not None else [a.w["q"], a.w["k"], a.w["v"], a.w["o"]]

    @staticmethod
    def _kernel_layout(decoder, experts) -> bool:
        """Whether the kernel's expert computation is the container's own for these experts: q8/q4 without biases,
        taking x unpadded."""
        layout = experts.store.expert_layout
        return not decoder.expert_biases and layout.fmt in ("q4", "q8") and not layout.biases and \
            padded_in_features(layout.hidden, layout.group) == layout.hidden

    @classmethod
    def _routes(cls, decoder, experts) -> bool:
        """Whether the kernel can route and compute the experts too (the whole way; see the module's note)."""
        if type(experts) is not QuantizedExperts or not cls._kernel_layout(decoder, experts):
            return False
        blocks = decoder.blocks
        if list(decoder.moe_layers) != list(range(len(blocks))) or list(experts.store.moe_layers) != \
                decoder.moe_layers:
            return False
        f0 = blocks[0].ffn
        for b in blocks:
            f = b.ffn
            if (type(f) is not MoE or type(f.router) is not SoftmaxTopK or f.experts is not experts
                    or (f.router.cap, f.router.renormalize, f.top_k) != (f0.router.cap, f0.router.renormalize,
                                                                         f0.top_k)):
                return False
            w = f.router.w["router"]
            if w.dtype != torch.float32 or w.device.type != "cpu":
                return False
        return True

    def __init__(self, decoder, experts, dense_dtype, routes: bool):
        # with streamed experts, the kernel computes the experts of the cache's slots (OffloadedExperts.in_slots)
        in_slots = not routes and isinstance(experts, OffloadedExperts) and experts.pool is not None and \
            self._kernel_layout(decoder, experts)
        computes = routes or in_slots  # the kernel computes experts
        layout = experts.store.expert_layout if computes else None
        qs_dtype = np.int8 if computes and layout.fmt == "q8" else np.uint8
        native.warmup_layers(dense_dtype, qs_dtype)  # first: it compiles (or loads) the typed lists' code too
        typed = native.typed_list
        self.decoder, self.experts, self.routes, self.in_slots = decoder, experts, routes, in_slots
        blocks = decoder.blocks
        first = blocks[0]
        a = first.attention
        self.attention = a
        self.norms = np.stack([n.weight.numpy() for b in blocks for n in (b.attn_norm, b.ffn_norm)])
        self.eps = np.float32(a.eps)
        qkv = [m for b in blocks for m in self._matrices(b.attention)[:-1]]
        self.qkv_qs, self.qkv_scales = typed([m.qs for m in qkv]), typed([m.scales.view(np.uint16) for m in qkv])
        self.o_qs = typed([b.attention.w["o"].qs for b in blocks])
        self.o_scales = typed([b.attention.w["o"].scales.view(np.uint16) for b in blocks])
        self.dense_int8 = all(native.int_dot(m.qs, m.scales) for b in blocks for m in self._matrices(b.attention))
        self.windows = np.array([b.attention.window or 0 for b in blocks], np.int64)
        no_sinks = np.empty(0, np.float32)
        self.sinks = typed([b.attention.w["sinks"].float().numpy() if a.sinks else no_sinks for b in blocks])
        self.x = np.empty((1, decoder.spec.hidden_size), np.float32)  # the FFN input of the layer a call stopped at
        self._caches: dict[int, tuple] = {}  # id(DecoderCache) -> (the cache, its typed lists)
        # what the kernel does not use is given as the types it is compiled for, and never read
        self.routers = typed([np.zeros((1, decoder.spec.hidden_size), np.float32)])
        self.router_cap, self.renormalize, self.top_k, self.expert_int8, self.activation = np.float32(0), False, 1, \
            False, 0
        empty_qs, empty_scales = np.empty((0, 0), qs_dtype), np.empty((0, 0), np.uint16)
        self.gu_qs = self.d_qs = typed([empty_qs])
        self.gu_scales = self.d_scales = typed([empty_scales])
        if computes:
            self.top_k = decoder.experts_per_token
            # native.int_dot's rule, from the layout (q4 scales are float16): as routed_experts chooses for a token
            self.expert_int8 = native.INT_DOT and layout.fmt == "q4" and layout.group == 32
            self.activation = experts.activation
        if in_slots:  # one entry per slot of the pool, whose views never change
            views = [experts.pool.views(slot) for slot in range(experts.pool.count)]
            self.gu_qs, self.gu_scales = typed([g[0] for g, _ in views]), typed([g[1].view(np.uint16)
                                                                                  for g, _ in views])
            self.d_qs, self.d_scales = typed([d[0] for _, d in views]), typed([d[1].view(np.uint16) for _, d in views])
        elif routes:  # one entry per expert of each layer, mapped on first use
            self.store = experts.store
            f = first.ffn
            self.routers = typed([b.ffn.router.w["router"].numpy() for b in blocks])
            self._routers = [b.ffn.router for b in blocks]
            self.router_cap, self.renormalize = np.float32(f.router.cap or 0.0), bool(f.router.renormalize)
            self.num_experts = decoder.spec.num_experts
            n = len(blocks) * self.num_experts
            self.gu_qs, self.gu_scales = typed([empty_qs] * n), typed([empty_scales] * n)
            self.d_qs, self.d_scales = typed([empty_qs] * n), typed([empty_scales] * n)
            self._mapped = np.zeros(n, bool)
        self.idx = np.zeros((len(blocks), self.top_k), np.int64)
        self.weights = np.zeros((len(blocks), self.top_k), np.float32)

    def _map(self, layer: int) -> None:
        """Map the experts the routing of `layer` chose that are not mapped yet."""
        for e in self.idx[layer].tolist():
            i = layer * self.num_experts + e
            if not self._mapped[i]:
                (gq, gs), (dq, ds) = self.store.expert_views(self.store.moe_layers[layer], e)
                for items, item in ((self.gu_qs, gq), (self.gu_scales, gs.view(np.uint16)), (self.d_qs, dq),
                                    (self.d_scales, ds.view(np.uint16))):
                    native.typed_set(items, i, item)
                self._mapped[i] = True

    def _cache_lists(self, cache) -> tuple:
        typed = native.typed_list
        held = self._caches.get(id(cache))
        if held is None or held[0] is not cache:
            self._caches.clear()  # one sequence at a time: the engine's cache
            held = self._caches[id(cache)] = (cache, typed([c.k.numpy() for c in cache.layers]),
                                              typed([c.v.numpy() for c in cache.layers]))
        return held[1], held[2]

    def current(self) -> bool:
        """Whether the kernel can still route and compute the experts (the whole way): the decoder still has the
        routers and experts this step was built for (a routing trace, for one, replaces the routers)."""
        return self.routes and all(b.ffn.router is r and b.ffn.experts is self.experts
                                   for b, r in zip(self.decoder.blocks, self._routers))

    def __call__(self, h: torch.Tensor, pos, cache) -> torch.Tensor:
        """h [1, D] float32 after the embedding -> after the last layer, the token stored in the caches."""
        if not 0 <= pos.start < cache.context_length:  # the kernel writes the caches at pos.start unchecked
            raise ContextLengthError(f"position {pos.start} is outside the context of {cache.context_length}")
        a = self.attention
        cos, sin = pos.rotary(a.rope)
        temperature = float(a.temperature(pos)[0]) if a.temperature_len else 1.0
        k_caches, v_caches = self._cache_lists(cache)
        x = h.to(torch.float32).contiguous().numpy().copy()
        cos, sin = cos[0].contiguous().numpy(), sin[0].contiguous().numpy()
        whole = self.current()
        blocks = self.decoder.blocks
        first, resume = 0, False
        while first < len(blocks):
            first = native.decode_layers(
                x, self.norms, self.eps, self.qkv_qs, self.qkv_scales, self.o_qs, self.o_scales, self.dense_int8,
                a.heads, a.kv_heads, k_caches, v_caches, pos.start, self.windows, np.float32(a.scale),
                np.float32(a.cap or 0.0), np.float32(temperature), self.sinks, cos, sin, self.routers,
                self.router_cap, self.top_k, self.renormalize, self.gu_qs, self.gu_scales, self.d_qs, self.d_scales,
                self.expert_int8, self.activation, first, resume, self.idx, self.weights, not whole, self.x)
            if first < 0:
                break
            if whole:
                self._map(first)
                resume = True
                continue
            resume = False  # a resumed call computed its layer's experts and stopped at the next layer
            ffn = blocks[first].ffn
            xt = torch.from_numpy(self.x.copy())
            if self.in_slots and type(ffn) is MoE and ffn.experts is self.experts:
                r = ffn.routing(xt)
                got = self.experts.in_slots(ffn.layer, xt, r.idx, r.weights, r.probs)
                if isinstance(got, tuple):  # the kernel computes them, as the container's own call would
                    slots, w = got
                    self.idx[first] = -1
                    self.idx[first, :len(slots)] = slots
                    self.weights[first, :len(slots)] = w
                    resume = True
                    continue
                x += got.numpy()
            else:
                x += ffn(xt).numpy()  # as Block adds it
            first += 1
        observers = self.decoder.observers
        if whole and observers:  # the stepped calls' FFN parts told them
            idx, weights = torch.from_numpy(self.idx), torch.from_numpy(self.weights)
            for pos_, layer in enumerate(self.decoder.moe_layers):
                for observe in observers:
                    observe(layer, idx[pos_:pos_ + 1].clone(), weights[pos_:pos_ + 1].clone())
        return torch.from_numpy(x)
