"""The decoder every family shares, composed of the parts its spec selects: per layer an attention part and an
FFN part between RMSNorms (Grok's four norms when the spec asks for them), then the output head.

The math does no I/O and knows nothing of where expert weights live: MoE parts hand (layer, tokens, choices) to
an experts container. Parts are built from the spec alone, so `tensors()`, `cache_bytes()` and `scratch_bytes()`
answer before any weight is loaded; `bind` gives the parts their weights.

Shapes: T = tokens in this call, D = hidden, V = vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .. import native
from .attention import Positions
from .ffn import ExpertsCall, MoE, RoutingObserver
from .parts import F32, Part, RMSNorm, TensorSpec, Weight, in_host_memory, linear, softcap
from .routers import Routing, SoftmaxTopK
from .spec import ModelSpec

RESIDUAL_COPIES = 16  # hidden-sized float32 activations alive at once in a layer (residual, norms, q/k/v/o, ...)


class Block(Part):
    """One layer: h + attention(norm(h)), then h + ffn(norm(h)); with `sandwich_norm`, each branch's output is
    normed again before it is added (Grok)."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__(f"layers.{layer}.")
        D, eps, p = spec.hidden_size, spec.rms_norm_eps, self.prefix
        self.attn_norm = RMSNorm(p, "attn_norm", D, eps)
        self.attention = spec.attention(spec, layer)
        self.ffn_norm = RMSNorm(p, "ffn_norm", D, eps)
        self.ffn = spec.ffn[layer](spec, layer)
        sandwich = spec.sandwich_norm
        self.post_attn_norm = RMSNorm(p, "post_attn_norm", D, eps) if sandwich else None
        self.post_ffn_norm = RMSNorm(p, "post_ffn_norm", D, eps) if sandwich else None

    def children(self) -> list[Part]:
        parts = [self.attn_norm, self.attention, self.ffn_norm, self.ffn, self.post_attn_norm, self.post_ffn_norm]
        return [p for p in parts if p is not None]

    def scratch_bytes(self, tokens: int, context: int) -> int:
        return self.attention.scratch_bytes(tokens, context) + self.ffn.scratch_bytes(tokens, context)

    def __call__(self, h: torch.Tensor, pos: Positions, cache) -> torch.Tensor:
        a = self.attention(self.attn_norm(h), pos, cache)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        h = h + a
        f = self.ffn(self.ffn_norm(h))
        if self.post_ffn_norm is not None:
            f = self.post_ffn_norm(f)
        return h + f


class DecoderCache:
    """The per-layer caches of one sequence (each made by its layer's attention part) and how many tokens they
    hold."""

    def __init__(self, layers: list, context_length: int):
        self.layers = layers
        self.context_length = context_length
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)


class Decoder(Part):
    """Forward pass of a decoder-only MoE model over canonical weights (see `tensors`)."""

    def __init__(self, spec: ModelSpec):
        super().__init__("")
        self.spec = spec
        self.blocks = [Block(spec, i) for i in range(spec.num_layers)]
        self.norm = RMSNorm("", "norm", spec.hidden_size, spec.rms_norm_eps)
        self.observers: list[RoutingObserver] = []  # called with every MoE layer's routing
        self.moe: dict[int, MoE] = {i: b.ffn for i, b in enumerate(self.blocks) if b.ffn.routed}
        for part in self.moe.values():
            part.observers = self.observers
        self._ropes: dict = {}  # rotary tables by schedule and device, shared by every forward call
        self._norm_ratios: dict = {}  # lookahead's factors between two layers' FFN norms, by layers, dtype, device
        self._ahead: dict = {}  # lookahead_many's routers and factors, by layers
        self.dtype = torch.float32  # of activations and the cache: the embedding's, once bound
        # a decoded token's layers in the layers kernel (runtime/fused.py), set by the engine where its parts allow it
        self.token_layers: Callable[[torch.Tensor, Positions, DecoderCache], torch.Tensor] | None = None

    @property
    def moe_layers(self) -> list[int]:
        return list(self.moe)

    @property
    def stored_experts(self) -> int:
        """Experts the container holds per MoE layer (the routed ones and any every token uses)."""
        return max((part.stored_experts for part in self.moe.values()), default=0)

    @property
    def experts_per_token(self) -> int:
        """Experts the container computes per MoE layer for one token."""
        return max((part.experts_per_token for part in self.moe.values()), default=0)

    @property
    def expert_biases(self) -> bool:
        """Whether the experts have biases on their matrices (which their chunks then hold)."""
        return any(part.biased for part in self.moe.values())

    def declare(self) -> dict[str, TensorSpec]:
        V, D = self.spec.vocab_size, self.spec.hidden_size
        out = {"embed": TensorSpec((V, D), output=self.spec.tie_word_embeddings)}
        if not self.spec.tie_word_embeddings:
            out["lm_head"] = TensorSpec((V, D), output=True)
        return out

    def children(self) -> list[Part]:
        return [*self.blocks, self.norm]

    def bind(self, weights: Mapping[str, Weight]) -> None:
        super().bind(weights)
        self._norm_ratios.clear()
        self._ahead.clear()
        self.lm_head = self.w["embed"] if self.spec.tie_word_embeddings else self.w["lm_head"]
        self.dtype = self.w["embed"].dtype

    def stack_projections(self) -> None:
        """Stack each attention's q, k and v into one matrix where their kind allows it (quantized, in host memory):
        for a model whose weights all stay in RAM, where the copy costs no reads the budget did not plan."""
        for block in self.blocks:
            stack = getattr(block.attention, "stack_qkv", None)
            if stack is not None:
                stack()

    def use_experts(self, experts: ExpertsCall) -> None:
        """Make `experts` compute the routed experts of every MoE layer."""
        for part in self.moe.values():
            part.experts = experts

    # -- memory ---------------------------------------------------------------------------------------------
    def new_cache(self, context_length: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> DecoderCache:
        """Empty caches for context_length tokens, on `device` (default: the CPU)."""
        dtype = dtype or self.dtype
        return DecoderCache([b.attention.new_cache(context_length, dtype, device) for b in self.blocks],
                            context_length)

    def cache_bytes(self, context_length: int, dtype: torch.dtype) -> int:
        """What new_cache(context_length, dtype) allocates."""
        return sum(b.attention.cache_bytes(context_length, dtype) for b in self.blocks)

    def scratch_bytes(self, tokens: int, context: int) -> int:
        """Transient memory of a forward call on `tokens` tokens at its largest (float32 activations, the
        all-position logits of Model.logits)."""
        spec = self.spec
        layer = max(b.scratch_bytes(tokens, context) for b in self.blocks)
        return RESIDUAL_COPIES * tokens * spec.hidden_size * F32 + layer + tokens * spec.vocab_size * F32

    # -- the forward pass -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: DecoderCache, all_logits: bool = False) -> torch.Tensor:
        """Run tokens [T] at positions cache.length.. and append them to the cache.

        Returns float32 logits, [T, V] if all_logits else [1, V] for the last token only."""
        spec = self.spec
        embed = self.w["embed"]
        h = F.embedding(tokens, embed) if isinstance(embed, torch.Tensor) else embed.rows(tokens)  # [T, D]
        if spec.embedding_multiplier != 1.0:
            h = h * spec.embedding_multiplier
        pos = Positions(cache.length, tokens.shape[0], self.dtype, self._ropes, tokens.device)
        if tokens.shape[0] == 1 and self.token_layers is not None:
            h = self.token_layers(h, pos, cache)
        else:
            for block, layer_cache in zip(self.blocks, cache.layers):
                h = block(h, pos, layer_cache)
        cache.length = pos.end
        if not all_logits:
            h = h[-1:]
        logits = linear(self.norm(h), self.lm_head).float()
        if spec.output_multiplier != 1.0:
            logits = logits * spec.output_multiplier
        return softcap(logits, spec.final_logit_softcap)

    # -- routing ahead of time ------------------------------------------------------------------------------
    def lookahead(self, from_layer: int, to_layer: int, x: torch.Tensor) -> Routing:
        """The routing of MoE layer `to_layer` for x, the FFN input of `from_layer`, as if the residual stream
        did not change in between: x is brought from one FFN norm to the other, then routed by that layer's own
        router (with the experts every token of that layer uses)."""
        scale = self.lookahead_scale(from_layer, to_layer, x)
        h = x * scale if x.dtype == torch.float32 else (x.float() * scale).to(x.dtype)
        return self.moe[to_layer].route(h)

    def lookahead_scale(self, from_layer: int, to_layer: int, x: torch.Tensor) -> torch.Tensor:
        """The factors [D] that bring x from one FFN norm to the other (float32, on x's device)."""
        key = (from_layer, to_layer, x.dtype, x.device)
        scale = self._norm_ratios.get(key)
        if scale is None:  # a decode step asks for the same pairs at every token
            here = self.blocks[from_layer].ffn_norm.weight.float()
            there = self.blocks[to_layer].ffn_norm.weight.float()
            scale = self._norm_ratios[key] = (there / torch.where(here == 0, 1.0, here)).to(x.device)
        return scale

    def lookahead_many(self, from_layer: int, to_layers: list[int], x: torch.Tensor) -> Routing:
        """For one token x [1, D]: lookahead(from_layer, j, x) for each j of to_layers, as the rows of one Routing
        (idx and weights [n, K], probs [n, E]). In one kernel call where those layers route with plain softmax top-k
        routers and x is float32 in host memory (a decode step's read-ahead): the same routings."""
        routers = [self.moe[j].router for j in to_layers]
        ahead = None
        if x.dtype == torch.float32 and in_host_memory(x):
            ahead = self._ahead_of(from_layer, to_layers, routers, x)
        out = None if ahead is None else native.route_ahead(x.numpy()[0], *ahead)
        if out is not None:
            return Routing(*(torch.from_numpy(a) for a in out))
        many = getattr(routers[0], "ahead", None)  # routers whose choice does not depend on x (a routing trace's)
        if many is not None and self._routed_alone(to_layers):
            rows = many(routers, x)
            if rows is not None:
                return rows
        rows = [self.lookahead(from_layer, j, x) for j in to_layers]
        return Routing(*(torch.cat([getattr(r, name) for r in rows]) for name in ("idx", "weights", "probs")))

    def _routed_alone(self, layers: list[int]) -> bool:
        """Whether these MoE layers hand the container their router's choice as it is (no experts every token
        uses added)."""
        return all(self.moe[j].always == 0 and type(self.moe[j]).extend is MoE.extend for j in layers)

    def _ahead_of(self, from_layer: int, to_layers: list[int], routers: list, x: torch.Tensor) -> tuple | None:
        """route_ahead's arguments but x for these layers and their routers, or None where the routers are not all
        plain softmax top-k ones (float32, in host memory) of one kind, or a layer adds experts every token uses."""
        key = (from_layer, tuple(to_layers))
        held = self._ahead.get(key)
        if held is not None and all(a is b for a, b in zip(held[0], routers)):
            return held[1]
        first = routers[0]
        kind = (first.cap, first.top_k, first.renormalize) if type(first) is SoftmaxTopK else None
        args = None
        if self._routed_alone(to_layers) and native.fusable() and all(
                type(r) is SoftmaxTopK and (r.cap, r.top_k, r.renormalize) == kind
                and r.w["router"].dtype == torch.float32 and in_host_memory(r.w["router"])
                and r.w["router"].is_contiguous() for r in routers):
            scales = torch.stack([self.lookahead_scale(from_layer, j, x) for j in to_layers])
            args = (native.typed_list([r.w["router"].numpy() for r in routers]), scales.numpy(), first.cap,
                    first.top_k, first.renormalize)
        self._ahead[key] = (routers, args)
        return args
