"""What every part of the decoder is made of: the tensors it declares, and the few operations parts share.

A part (an attention kind, a router kind, an FFN kind, a norm) declares the tensors it reads, by canonical
name and shape. The decoder's set of tensors is the union of its parts' declarations; loading, conversion and
planning all read it from there. A part is built from the ModelSpec alone, so its tensors and its memory can be
known before any weight is read; `bind` then hands it its weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from .. import native

F32 = 4  # bytes of a float32 activation: parts report their scratch memory in these

@dataclass(frozen=True)
class TensorSpec:
    """One tensor a part reads."""

    shape: tuple[int, ...]
    exact: bool = False  # kept unquantized in a store: small, and the output is sensitive to it (norms, routers)
    expert: bool = False  # held by the experts container, not by the decoder
    output: bool = False  # the output head: every logit comes from it, so a store keeps it at 8 bits at least

    def __post_init__(self) -> None:
        if len(self.shape) < 2:
            object.__setattr__(self, "exact", True)  # vectors are never quantized


class Matrix(Protocol):
    """A weight matrix [out, in] kept in some other form than a torch tensor (quantized, for instance)."""

    dtype: torch.dtype  # the dtype its products come out in

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, in] -> x @ W^T (+ bias), [T, out]."""

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows ids of W as a [len(ids), in] tensor (embedding lookup)."""


Weight = torch.Tensor | Matrix


class Part:
    """A piece of the decoder that reads tensors named `prefix + local name`.

    Subclasses say what they read in `declare` (local names) and which parts they contain in `children`;
    after `bind`, `self.w[local name]` is the weight (an optional tensor a spec leaves out is simply absent).
    """

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.w: dict[str, Weight] = {}

    def declare(self) -> dict[str, TensorSpec]:
        return {}

    def children(self) -> list[Part]:
        return []

    def tensors(self) -> dict[str, TensorSpec]:
        """Every tensor this part and the parts inside it read, by canonical name."""
        out = {self.prefix + name: spec for name, spec in self.declare().items()}
        for child in self.children():
            out.update(child.tensors())
        return out

    def bind(self, weights: Mapping[str, Weight]) -> None:
        """Take this part's weights (and its children's) from a mapping of canonical names; expert tensors stay
        with the experts container."""
        self.w = {name: weights[self.prefix + name] for name, spec in self.declare().items() if not spec.expert}
        for child in self.children():
            child.bind(weights)

    def scratch_bytes(self, tokens: int, context: int) -> int:
        """Transient memory of one call on `tokens` tokens with `context` in the cache, beyond the residual
        stream (float32 activations at their largest)."""
        return 0


def in_host_memory(t: torch.Tensor) -> bool:
    """Whether the kernels of edgerun.native can take t as it is: a float32 tensor in host memory (not a tensor
    subclass, which may hold no data)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and type(t) is torch.Tensor


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w, bias) if isinstance(w, torch.Tensor) else w.linear(x, bias)


def stack_rows(ws: list[Weight]) -> tuple[Weight, list[Weight]] | None:
    """(one weight holding the rows of ws in order, ws as row ranges of it), where their kind can stack (a Matrix
    with a `stacked` class method: quantized matrices in host memory, for which a product is one kernel call);
    None otherwise. Torch tensors are left apart: stacking would copy them for little gain."""
    kind = type(ws[0])
    stack = getattr(kind, "stacked", None)
    if stack is None or any(type(w) is not kind for w in ws):
        return None
    whole = stack(ws)
    if whole is None:
        return None
    bounds = [0]
    for w in ws:
        bounds.append(bounds[-1] + w.out_features)
    return whole, [whole.row_range(a, b) for a, b in zip(bounds, bounds[1:])]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 whatever the compute dtype, as every reference implementation does.
    if x.shape[0] == 1 and x.dim() == 2 and in_host_memory(x) and in_host_memory(weight) and x.is_contiguous():
        return torch.from_numpy(native.rms_norm(x[0].numpy(), weight.numpy(), eps)).view(1, -1)  # a decode step
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): squashes x into (-cap, cap), nearly unchanged where |x| << cap."""
    return x if cap is None else cap * torch.tanh(x / cap)


def activation_fn(name: str):
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # gpt-oss's clamped SwiGLU, as every release configures it


def gated_fn(name: str):
    """(gate, up) -> the gated activation an MLP feeds its down matrix: act(gate) * up, or for "swiglu_oai"
    (gpt-oss) gate' * sigmoid(1.702 gate') * (up' + 1), gate' = min(gate, 7) and up' = up clamped to [-7, 7]."""
    if name == "swiglu_oai":
        def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            g = g.clamp(max=SWIGLU_LIMIT)
            return g * torch.sigmoid(g * SWIGLU_ALPHA) * (u.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT) + 1)
        return swiglu
    act = activation_fn(name)
    return lambda g, u: act(g) * u


class RMSNorm(Part):
    """weight * x / rms(x), the weight named `name` under prefix."""

    def __init__(self, prefix: str, name: str, dim: int, eps: float):
        super().__init__(prefix)
        self.name, self.dim, self.eps = name, dim, eps

    def declare(self) -> dict[str, TensorSpec]:
        return {self.name: TensorSpec((self.dim,))}

    @property
    def weight(self) -> torch.Tensor:
        return self.w[self.name]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.w[self.name], self.eps)
