"""FFN parts: a dense MLP, a mixture of experts, a mixture of experts with a shared expert (gated or not), and
a residual mixture (a dense MLP beside the experts).

The MoE parts route each token with their layer's router and hand (layer, tokens, choices, weights) to an
experts container, which knows where the expert weights live; the model math does no I/O.

Shapes: T = tokens, D = hidden, E = experts, K = experts per token, I = expert width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from .parts import F32, Part, TensorSpec, gated_fn, linear
from .routers import Routing


class ExpertsCall(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, D], idx [T, K] expert ids, weights [T, K] -> sum_k weights * expert_k(x), [T, D]."""


RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, idx [T, K], weights [T, K])


class DenseMLP(Part):
    """down(act(gate(x)) * up(x)) with matrices named prefix + gate/up/down."""

    routed = False

    def __init__(self, prefix: str, hidden: int, width: int, activation: str):
        super().__init__(prefix)
        self.hidden, self.width = hidden, width
        self.gated = gated_fn(activation)

    def declare(self) -> dict[str, TensorSpec]:
        D, I = self.hidden, self.width
        return {"gate": TensorSpec((I, D)), "up": TensorSpec((I, D)), "down": TensorSpec((D, I))}

    def scratch_bytes(self, tokens: int, context: int) -> int:
        return 3 * tokens * self.width * F32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        return linear(self.gated(linear(x, w["gate"]), linear(x, w["up"])), w["down"])


class DenseFFN(DenseMLP):
    """A layer whose FFN is a plain MLP of the spec's `intermediate_size` (`layers.N.mlp.*`)."""

    def __init__(self, spec, layer: int):
        super().__init__(f"layers.{layer}.mlp.", spec.hidden_size, spec.intermediate_size, spec.activation)


class MoE(Part):
    """Routed experts: the layer's router picks K of E experts per token; the experts container computes them.

    A kind may give the container `always` more experts per layer that every token uses besides the routed
    ones (`extend` adds them to the routing): the container then holds and streams them like any expert."""

    routed = True
    always = 0
    biased = False  # whether the experts have biases (BiasedMoE)

    def __init__(self, spec, layer: int):
        super().__init__(f"layers.{layer}.")
        self.layer = layer
        self.hidden, self.num_experts, self.width = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
        self.top_k = spec.top_k
        self.router = spec.router(spec, layer)
        self.experts: ExpertsCall | None = None  # set when the decoder is given its container
        self.observers: list[RoutingObserver] = []  # the decoder's list, shared by all its MoE parts

    def declare(self) -> dict[str, TensorSpec]:
        E, D, I = self.num_experts, self.hidden, self.width
        return {"experts.gate_up": TensorSpec((E, 2 * I, D), expert=True),
                "experts.down": TensorSpec((E, D, I), expert=True)}

    def children(self) -> list[Part]:
        return [self.router]

    @property
    def stored_experts(self) -> int:
        """Experts the container holds for this layer: the routed ones, then the `always` ones."""
        return self.num_experts + self.always

    @property
    def experts_per_token(self) -> int:
        return self.top_k + self.always

    def dense_slice(self, e: int) -> tuple[int, int]:
        """For an `always` expert e, the range of the dense MLP's intermediate dimension it holds."""
        raise IndexError(f"layer {self.layer} has no expert {e}")

    def scratch_bytes(self, tokens: int, context: int) -> int:
        return 3 * tokens * self.experts_per_token * self.width * F32  # gate/up products of the routed tokens

    def extend(self, r: Routing) -> Routing:
        """The routing the container computes: the router's, and the experts every token uses."""
        return r

    def route(self, x: torch.Tensor) -> Routing:
        """What the container is handed for x (read-ahead forecasts with this)."""
        return self.extend(self.router(x))

    def routing(self, x: torch.Tensor) -> Routing:
        """The router's choice for x, told to the observers, with the experts every token uses added: what the
        container computes."""
        r = self.router(x)
        for observe in self.observers:  # the router's own choices
            observe(self.layer, r.idx, r.weights)
        return self.extend(r)

    def routed_experts(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing(x)
        return self.experts(self.layer, x, r.idx, r.weights)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.routed_experts(x)


class BiasedMoE(MoE):
    """Routed experts with biases on their gate_up and down matrices (gpt-oss), held in each expert's chunk."""

    biased = True

    def declare(self) -> dict[str, TensorSpec]:
        E, D = self.num_experts, self.hidden
        return {**super().declare(), "experts.gate_up_bias": TensorSpec((E, 2 * self.width), expert=True, exact=True),
                "experts.down_bias": TensorSpec((E, D), expert=True, exact=True)}


class SharedExpertMoE(MoE):
    """Routed experts plus a shared expert every token uses (`layers.N.shared.*`, width
    `shared_expert_intermediate_size`), scaled by sigmoid(shared_gate . x) when the spec has the gate."""

    def __init__(self, spec, layer: int):
        super().__init__(spec, layer)
        self.shared = DenseMLP(f"{self.prefix}shared.", spec.hidden_size, spec.shared_expert_intermediate_size,
                               spec.activation)
        self.gated = spec.shared_expert_gate

    def declare(self) -> dict[str, TensorSpec]:
        out = super().declare()
        if self.gated:
            out["shared_gate"] = TensorSpec((1, self.hidden), exact=True)
        return out

    def children(self) -> list[Part]:
        return [self.router, self.shared]

    def scratch_bytes(self, tokens: int, context: int) -> int:
        return super().scratch_bytes(tokens, context) + self.shared.scratch_bytes(tokens, context)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared(x)
        if self.gated:
            shared = torch.sigmoid(linear(x, self.w["shared_gate"])) * shared
        return self.routed_experts(x) + shared


class ResidualMoE(MoE):
    """Routed experts beside a dense MLP of width `intermediate_size` (`layers.N.mlp.*`) on the same input:
    (mlp(x) + experts(x)) / sqrt(2) (Grok-2's `residual_moe`).

    The dense MLP is as large as a quarter of the experts (Grok-2: 51.5B weights), too large to stay resident on
    the machines edgerun is for, so the experts container holds it too: as `always` experts of an expert's
    width, consecutive slices of its intermediate dimension (the last one zero-padded, which adds exactly 0),
    that every token uses with weight 1. An MLP is the sum of such slices, so one container call computes
    mlp(x) + experts(x), and the MLP streams from a store and is cached like any expert."""

    def __init__(self, spec, layer: int):
        super().__init__(spec, layer)
        self.dense_width = spec.intermediate_size
        self.always = -(-self.dense_width // self.width)

    def declare(self) -> dict[str, TensorSpec]:
        D, I = self.hidden, self.dense_width
        return {**super().declare(), "mlp.gate": TensorSpec((I, D), expert=True),
                "mlp.up": TensorSpec((I, D), expert=True), "mlp.down": TensorSpec((D, I), expert=True)}

    def dense_slice(self, e: int) -> tuple[int, int]:
        k = e - self.num_experts
        if not 0 <= k < self.always:
            raise IndexError(f"layer {self.layer} has no expert {e}")
        return k * self.width, min((k + 1) * self.width, self.dense_width)

    def extend(self, r: Routing) -> Routing:
        T, device = r.idx.shape[0], r.idx.device
        always = torch.arange(self.num_experts, self.stored_experts, device=device).expand(T, self.always)
        return Routing(torch.cat([r.idx, always], dim=1),
                       torch.cat([r.weights, torch.ones(T, self.always, dtype=r.weights.dtype, device=device)], dim=1),
                       torch.cat([r.probs, torch.ones(T, self.always, device=device)], dim=1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.routed_experts(x) / math.sqrt(2)
