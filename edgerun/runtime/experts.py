"""Experts containers: where the expert weights live and how one expert is computed.

The decoder hands a container (layer, tokens, expert choices, weights); the container groups the tokens by
expert and computes each expert on its tokens. Subclasses say how one expert runs: on torch tensors in RAM,
or with the JIT kernels straight on quantized bytes from the store.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models.transformer import activation_fn


class RecentRouting:
    """The experts each layer chose for its last `capacity` tokens. Written by the generating thread and
    readable from any other while it runs."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._layers: dict[int, deque] = {}

    def add(self, layer: int, idx: torch.Tensor) -> None:
        """Record idx [tokens, K]: the experts layer chose for each token."""
        rows = idx[-self.capacity:].tolist()
        with self._lock:
            if layer not in self._layers:
                self._layers[layer] = deque(maxlen=self.capacity)
            self._layers[layer].extend(rows)

    def counts(self, layer: int, num_experts: int, tokens: int) -> tuple[list[int], int]:
        """(how many of the layer's last `tokens` tokens chose each expert, tokens counted)."""
        with self._lock:
            rows = list(self._layers.get(layer, ()))[-tokens:] if tokens > 0 else []
        out = [0] * num_experts
        for row in rows:
            for e in row:
                out[e] += 1
        return out, len(rows)


class RoutedExperts:
    """Base container. Subclasses define `expert`; offloading ones also `schedule` (the order that lets
    experts already in memory compute while the others load). Outputs are summed in routing order whatever
    the schedule, so results do not depend on where the weights were."""

    tracer = None  # called as tracer(layer, idx, weights) on every routed call (routing traces)
    recent: RecentRouting | None = None  # the latest routing choices, made on the first routed call

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.tracer is not None:
            self.tracer(layer, idx, weights)
        if self.recent is None:
            self.recent = RecentRouting()
        self.recent.add(layer, idx)
        if x.shape[0] == 1:  # decode: no grouping needed
            chosen = idx[0].tolist()
            ys = {e: self.expert(layer, e, x) for e in self.schedule(layer, chosen)}
            out = torch.zeros_like(x)
            for e, w in zip(chosen, weights[0]):
                out += ys[e] * w.to(x.dtype)
            return out
        K = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        groups = dict(zip(experts.tolist(), torch.split(order, counts.tolist())))
        ys = {e: self.expert(layer, e, x[groups[e] // K]) for e in self.schedule(layer, list(groups))}
        w = weights.reshape(-1)
        out = torch.zeros_like(x)
        for e, sel in groups.items():
            out.index_add_(0, sel // K, ys[e] * w[sel, None].to(x.dtype))
        return out

    def stats(self) -> dict:
        """Figures of the experts' memory since reset_stats (offloading containers report their cache)."""
        return {"offload": False}

    def reset_stats(self) -> None:
        pass

    def residency(self) -> tuple[set[tuple[int, int]], set[tuple[int, int]]] | None:
        """(layer, expert) pairs in RAM now and pairs being read into it; None when every expert is in memory."""
        return None

    def schedule(self, layer: int, experts: list[int]) -> list[int]:
        """The order to compute this layer's experts in."""
        return experts

    def expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e of layer on x [n, D] -> [n, D]."""
        raise NotImplementedError


class TorchExperts(RoutedExperts):
    """Experts as torch tensors: gate_up[layer][e] is [2I, D] (gate rows, then up), down[layer][e] is [D, I].

    Each per-layer entry may be one stacked [E, ...] tensor or a list of per-expert tensors.
    """

    def __init__(self, gate_up: Sequence, down: Sequence, activation: str):
        self.gate_up, self.down = gate_up, down
        self.act = activation_fn(activation)

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[layer][e], self.down[layer][e]

    def expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights(layer, e)
        g, u = F.linear(x.to(gate_up.dtype), gate_up).chunk(2, dim=-1)
        return F.linear(self.act(g) * u, down).to(x.dtype)
