"""Router parts: which experts each token goes to, and with what weight.

One router object per MoE layer serves both the decoder and whatever runs it ahead of time (the offloading
container's read-ahead), so the experts forecast for a hidden state are the ones the decoder would pick for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import native
from .parts import Part, TensorSpec, in_host_memory, linear, softcap


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
        if x.shape[0] == 1 and in_host_memory(x) and in_host_memory(w) and w.is_contiguous():
            one = native.route_one(x[0].numpy(), w.numpy(), self.cap, self.top_k, self.renormalize)  # a decode step
            if one is not None:
                idx, weights, probs = (torch.from_numpy(a)[None] for a in one)
                return Routing(idx, weights, probs)
        logits = linear(x.float(), w.float()) if self.fp32 else linear(x, w).float()
        logits = softcap(logits, self.cap)
        probs = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(idx, weights.to(x.dtype), probs)


class GroupedTopK(Part):
    """DeepSeek's routers. Scores are the softmax (V2) or the sigmoid (V3) of float32 logits; V3 adds a learned
    correction bias (`router_bias`) to the scores it chooses by, never to the weights. The experts fall in
    `router_groups` groups and a token chooses only among the experts of its `topk_group` best groups: a group
    scores its best expert (softmax) or the sum of its best two (sigmoid). The chosen experts' scores are the
    weights, renormalised to sum to 1 when the spec says so, then multiplied by `routed_scaling_factor`.

    DeepSeek-V2's own code scales only the weights it does not renormalise; transformers' port never
    renormalises V2 weights. Every V2 release has norm_topk_prob false, where the two agree; the publisher's code
    is followed."""

    def __init__(self, spec, layer: int, sigmoid: bool):
        super().__init__(f"layers.{layer}.")
        self.layer, self.sigmoid = layer, sigmoid
        self.hidden, self.num_experts, self.top_k = spec.hidden_size, spec.num_experts, spec.top_k
        self.groups, self.topk_group = spec.router_groups, spec.topk_group
        self.renormalize, self.scaling = spec.norm_topk_prob, spec.routed_scaling_factor
        if self.num_experts % self.groups or not 0 < self.topk_group <= self.groups:
            raise ValueError(f"{self.num_experts} experts do not fall in {self.groups} groups of which "
                             f"{self.topk_group} are chosen")

    def declare(self) -> dict[str, TensorSpec]:
        out = {"router": TensorSpec((self.num_experts, self.hidden), exact=True)}
        if self.sigmoid:
            out["router_bias"] = TensorSpec((self.num_experts,), exact=True)
        return out

    def __call__(self, x: torch.Tensor) -> Routing:
        logits = linear(x.float(), self.w["router"].float())
        if self.sigmoid:
            scores = torch.sigmoid(logits)
            choice = scores + self.w["router_bias"].float()
        else:
            scores = choice = torch.softmax(logits, dim=-1)
        if self.topk_group < self.groups:
            grouped = choice.view(x.shape[0], self.groups, -1)
            group_score = grouped.topk(2, dim=-1).values.sum(-1) if self.sigmoid else grouped.amax(-1)
            keep = torch.zeros_like(group_score, dtype=torch.bool)
            keep.scatter_(1, torch.topk(group_score, self.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        idx = torch.topk(choice, self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        renormalize = self.renormalize and (self.sigmoid or self.top_k > 1)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.sigmoid or not renormalize:  # V2 scales only the weights it leaves as they are
            weights = weights * self.scaling
        return Routing(idx, weights.to(x.dtype), scores)


class SoftmaxGroupedTopK(GroupedTopK):
    """DeepSeek-V2's router (softmax scores)."""

    def __init__(self, spec, layer: int):
        super().__init__(spec, layer, sigmoid=False)


class SigmoidGroupedTopK(GroupedTopK):
    """DeepSeek-V3's router (sigmoid scores and a correction bias for choosing)."""

    def __init__(self, spec, layer: int):
        super().__init__(spec, layer, sigmoid=True)


class TopKSoftmax(Part):
    """gpt-oss's router: logits with a bias, the top-k logits, then the softmax of those k alone as the weights.
    `probs` (what forecasts read) is the softmax over all experts."""

    def __init__(self, spec, layer: int):
        super().__init__(f"layers.{layer}.")
        self.layer = layer
        self.hidden, self.num_experts, self.top_k = spec.hidden_size, spec.num_experts, spec.top_k

    def declare(self) -> dict[str, TensorSpec]:
        return {"router": TensorSpec((self.num_experts, self.hidden), exact=True),
                "router_bias": TensorSpec((self.num_experts,), exact=True)}

    def __call__(self, x: torch.Tensor) -> Routing:
        logits = linear(x, self.w["router"], self.w["router_bias"]).float()
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        return Routing(idx, torch.softmax(top, dim=-1).to(x.dtype), torch.softmax(logits, dim=-1))
