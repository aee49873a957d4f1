"""Experts containers: where the expert weights live and how one expert is computed.

The decoder hands a container (layer, tokens, expert choices, weights); the container groups the tokens by
expert and computes each expert on its tokens. Subclasses say how one expert runs: on torch tensors in RAM,
or with the JIT kernels straight on quantized bytes from the store. `ExpertsContainer` is the whole contract
between a container and the decoder, the engine and the API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .. import native
from ..models.parts import gated_fn
from ..models.routers import Routing

Phase = Literal["prefill", "decode"]


class Residency(NamedTuple):
    """Where experts are now, as (layer, expert) pairs."""

    resident: set[tuple[int, int]]  # in RAM: a cache slot, or memory-mapped
    loading: set[tuple[int, int]]  # being read into one
    on_device: frozenset[tuple[int, int]] = frozenset()  # in a GPU slot


class HeldChunk(NamedTuple):
    """An expert's chunk in RAM, held for a copy out of it: `release()` lets its memory be reused."""

    data: np.ndarray
    release: Callable[[], None]


def no_release() -> None:
    pass


class Lookahead(Protocol):
    """What a container may ask of the decoder it serves: run a later layer's router on a hidden state."""

    @property
    def moe_layers(self) -> list[int]: ...

    @property
    def stored_experts(self) -> int:
        """Experts per MoE layer the container holds (routed ones, and any every token uses)."""

    @property
    def experts_per_token(self) -> int:
        """Experts per MoE layer one token uses."""

    def lookahead(self, from_layer: int, to_layer: int, x: torch.Tensor) -> Routing:
        """The routing `to_layer` would give x, the FFN input of `from_layer` (see Decoder.lookahead)."""

    def lookahead_many(self, from_layer: int, to_layers: list[int], x: torch.Tensor) -> Routing:
        """For one token x: lookahead for each of `to_layers`, as the rows of one Routing (see
        Decoder.lookahead_many)."""


class ExpertsContainer(Protocol):
    """Everything the decoder, the engine and the API call on an experts container."""

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], idx [T, K] expert ids, weights [T, K] -> sum_k weights * expert_k(x), [T, D]."""

    def attach(self, decoder: Lookahead) -> None:
        """The container now serves `decoder` (called once it is installed)."""

    def begin_step(self, phase: Phase, tokens: int) -> None:
        """A forward call over `tokens` tokens begins: a prefill chunk or one decoded token."""

    def stats(self) -> dict:
        """Figures since reset_stats; "offload" says whether experts stream from a store."""

    def reset_stats(self) -> None:
        """Start counting anew (the engine calls it when a generation begins)."""

    def residency(self) -> Residency | None:
        """Which experts are in RAM and which are being read; None when every expert is always in memory.
        Safe to call from another thread while a generation runs."""

    def close(self) -> None:
        """Release threads and buffers; the container is not used afterwards."""


class RoutedExperts:
    """Base container: groups tokens by expert and sums the experts' outputs; subclasses define `expert` and, when
    experts may be missing from memory, `schedule` (the order that lets experts already in memory compute while
    the others load). Outputs are summed in routing order whatever the schedule, so results do not depend on where
    the weights were. Implements ExpertsContainer for experts that are always in memory."""

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:  # one token: no grouping needed
            chosen = idx[0].tolist()
            return self.one_by_one(layer, x, chosen, self.schedule(layer, chosen), weights)
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

    def one_by_one(self, layer: int, x: torch.Tensor, chosen: list[int], order: list[int],
                   weights: torch.Tensor) -> torch.Tensor:
        """One token's experts `chosen` (weights [1, K]), computed in `order` and summed in routing order."""
        ys = {e: self.expert(layer, e, x) for e in order}
        out = torch.zeros_like(x)
        for e, w in zip(chosen, weights[0]):
            out += ys[e] * w.to(x.dtype)
        return out

    def in_one_call(self, x: torch.Tensor, experts: list[tuple], weights: torch.Tensor) -> torch.Tensor:
        """One token's experts of a layer, each as native.routed_experts takes it (self.activation's kernel), summed
        with weights [1, K] in one kernel call."""
        out = np.empty((1, x.shape[1]), dtype=np.float32)
        native.routed_experts(x.to(torch.float32).contiguous().numpy(), experts,
                              weights[0].to(torch.float32).numpy(), self.activation, out)
        return torch.from_numpy(out).to(x.dtype)

    def attach(self, decoder: Lookahead) -> None:
        pass

    def begin_step(self, phase: Phase, tokens: int) -> None:
        pass

    def stats(self) -> dict:
        return {"offload": False}

    def reset_stats(self) -> None:
        pass

    def residency(self) -> Residency | None:
        return None

    def close(self) -> None:
        pass

    def schedule(self, layer: int, experts: list[int]) -> list[int]:
        """The order to compute this layer's experts in."""
        return experts

    # -- what a device tier in front asks of this one (runtime/tier.py) ------------------------------------
    def prepare(self, layer: int, x: torch.Tensor, experts: list[int]) -> list[int]:
        """This layer needs `experts` (computed here or copied out): start the reads they need (reading ahead
        from x, the layer's input); the order to take them in."""
        return self.schedule(layer, experts)

    def in_slot(self, layer: int, e: int) -> bool:
        """Whether `prepare` gave expert e a place in RAM that `chunk` can hold (not a buffer it reuses at once)."""
        return True

    def chunk(self, layer: int, e: int) -> HeldChunk:
        """Expert e's chunk in RAM once it is there (an expert `prepare` gave a slot), held for a copy."""
        raise NotImplementedError

    def resident_chunk(self, layer: int, e: int) -> HeldChunk | None:
        """Expert e's chunk if it is in RAM now (held), else None."""
        return None

    def observe(self, layer: int, experts: list[int]) -> None:
        """A decoded token used `experts` at this layer, which was computed by a tier in front."""

    def light_misses(self, layer: int, x: torch.Tensor, idx: torch.Tensor,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoded token's choices idx, weights [1, K] with approximate decoding applied where this tier would
        have to read an expert that neither it nor a tier in front holds (exact here: as they are)."""
        return idx, weights

    def elsewhere(self, key: tuple[int, int]) -> bool:
        """Whether a tier in front holds `key` ((MoE position, expert)), so that reading it ahead is needless; the
        tier in front replaces this."""
        return False

    def expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e of layer on x [n, D] -> [n, D]."""
        raise NotImplementedError


class TorchExperts(RoutedExperts):
    """Experts as torch tensors: gate_up[layer][e] is [2I, D] (gate rows, then up), down[layer][e] is [D, I].

    Each per-layer entry may be one stacked [E, ...] tensor or a list of per-expert tensors.
    """

    def __init__(self, gate_up: Sequence, down: Sequence, activation: str, biases: Sequence | None = None):
        self.gate_up, self.down = gate_up, down
        self.gated = gated_fn(activation)
        self._biases = biases  # per layer: (gate_up biases [E, 2I], down biases [E, D]), or None

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_up[layer][e], self.down[layer][e]

    def biases(self, layer: int, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(gate_up bias [2I], down bias [D]) of an expert, or Nones for experts without biases."""
        if not self._biases or self._biases[layer] is None:
            return None, None
        return self._biases[layer][0][e], self._biases[layer][1][e]

    def expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights(layer, e)
        b1, b2 = (None if b is None else b.to(gate_up.dtype) for b in self.biases(layer, e))
        g, u = F.linear(x.to(gate_up.dtype), gate_up, b1).chunk(2, dim=-1)
        return F.linear(self.gated(g, u), down, b2).to(x.dtype)
