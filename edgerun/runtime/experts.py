"""Experts containers: where the expert weights live and how one expert is computed.

The decoder hands a container (layer, tokens, expert choices, weights); the container groups the tokens by
expert and computes each expert on its tokens. Subclasses say how one expert runs: on torch tensors in RAM,
or with the JIT kernels straight on quantized bytes from the store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models.transformer import activation_fn


class RoutedExperts:
    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        if x.shape[0] == 1:  # decode: no grouping needed
            for e, w in zip(idx[0].tolist(), weights[0]):
                out += self.expert(layer, e, x) * w.to(x.dtype)
            return out
        K = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        w = weights.reshape(-1)
        pos = 0
        for e, n in zip(experts.tolist(), counts.tolist()):
            sel = order[pos:pos + n]
            pos += n
            tokens = sel // K
            y = self.expert(layer, e, x[tokens])
            out.index_add_(0, tokens, y * w[sel, None].to(y.dtype))
        return out

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
