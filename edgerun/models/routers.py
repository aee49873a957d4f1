"""Router parts: which experts each token goes to, and with what weight.

One router object per MoE layer serves both the decoder and whatever runs it ahead of time (the offloading
container's read-ahead), so the experts forecast for a hidden state are the ones the decoder would pick for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .parts import Part, TensorSpec, linear, softcap


@dataclass
class Routing:
    """Shapes: T tokens, K experts per token, E experts."""

    idx: torch.Tensor  # [T, K] chosen experts
    weights: torch.Tensor  # [T, K] their weights, in the input's dtype
    probs: torch.Tensor  # [T, E] float32: how strongly each expert was chosen (cache policies' forecasts)


class SoftmaxTopK(Part):
    """Softmax over all experts' logits (optionally soft-capped; computed in float32 when the spec says so) in
    float32, top-k, then the k weights renormalised to sum to 1 or not, as the spec says."""

    def __init__(self, spec, layer: int):
        super().__init__(f"layers.{layer}.")
        self.layer = layer
        self.hidden, self.num_experts, self.top_k = spec.hidden_size, spec.num_experts, spec.top_k
        self.renormalize, self.cap, self.fp32 = spec.norm_topk_prob, spec.router_softcap, spec.router_fp32

    def declare(self) -> dict[str, TensorSpec]:
        return {"router": TensorSpec((self.num_experts, self.hidden), exact=True)}

    def __call__(self, x: torch.Tensor) -> Routing:
        w = self.w["router"]
        logits = linear(x.float(), w.float()) if self.fp32 else linear(x, w).float()
        logits = softcap(logits, self.cap)
        probs = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(idx, weights.to(x.dtype), probs)
