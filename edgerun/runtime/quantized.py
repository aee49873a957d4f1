"""Weights that stay quantized while the model runs: dense matrices and experts computed by the JIT kernels
straight from the store's bytes (memory-mapped), never expanded to float in RAM."""

from __future__ import annotations

import numpy as np
import torch

from .. import native
from ..store.layout import PASSTHROUGH
from ..store.quant import dequantize
from ..store.store import ExpertStore, huge_page_array
from .experts import HeldChunk, RoutedExperts, TorchExperts, no_release

ACTIVATION_CODES = {"silu": native.SILU, "gelu_tanh": native.GELU_TANH, "gelu": native.GELU,
                    "swiglu_oai": native.SWIGLU_OAI}


class QuantizedMatrix:
    """A q8/q4 matrix [out, in]: products come out in float32."""

    dtype = torch.float32

    def __init__(self, qs: np.ndarray, scales: np.ndarray, in_features: int):
        self.qs, self.scales, self.in_features = qs, scales, in_features
        self.out_features = qs.shape[0]

    @property
    def padded_in(self) -> int:
        """Columns the matrix holds: in_features padded to whole groups (q4 packs two a byte)."""
        return self.qs.shape[1] * (2 if self.qs.dtype == np.uint8 else 1)

    @classmethod
    def stacked(cls, parts: list[QuantizedMatrix]) -> QuantizedMatrix | None:
        """One matrix holding the rows of parts in order, so that one kernel call computes them all (a decoded
        token's q, k and v); None when their formats differ. The rows are copied out of the store's mappings."""
        first = parts[0]
        if any(p.in_features != first.in_features or p.qs.dtype != first.qs.dtype or p.scales.dtype !=
               first.scales.dtype or p.qs.shape[1:] != first.qs.shape[1:] or p.scales.shape[1:] !=
               first.scales.shape[1:] for p in parts):
            return None
        rows = sum(p.out_features for p in parts)
        qs = huge_page_array((rows, *first.qs.shape[1:]), first.qs.dtype)
        scales = huge_page_array((rows, *first.scales.shape[1:]), first.scales.dtype)
        np.concatenate([p.qs for p in parts], out=qs)
        np.concatenate([p.scales for p in parts], out=scales)
        return cls(qs, scales, first.in_features)

    def row_range(self, start: int, stop: int) -> QuantizedMatrix:
        """Rows start:stop, viewing this matrix's arrays."""
        return QuantizedMatrix(self.qs[start:stop], self.scales[start:stop], self.in_features)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32).contiguous()
        out = np.empty((x.shape[0], self.out_features), dtype=np.float32)
        native.matmul(x.numpy(), self.qs, self.scales, out)
        y = torch.from_numpy(out)
        return y if bias is None else y + bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        idx = ids.numpy()
        return torch.from_numpy(dequantize(self.qs[idx], self.scales[idx], self.in_features))


class QuantizedExperts(RoutedExperts):
    """Experts of a q8/q4 store, each computed by the fused expert kernel on its memory-mapped chunk."""

    def __init__(self, store: ExpertStore, activation: str):
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"no expert kernel for activation {activation}")
        self.store = store
        self.activation = ACTIVATION_CODES[activation]

    def attach(self, decoder) -> None:
        # the one-token kernel is compiled for the number of experts a token uses: compile (or load) it now
        native.warmup_routed(decoder.experts_per_token, self.store.expert_layout.fmt)

    def __call__(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            return super().__call__(layer, x, idx, weights)
        # one token: the layer's experts in one kernel call
        return self.in_one_call(x, [self._arrays(layer, e) for e in idx[0].tolist()], weights)

    def _arrays(self, layer: int, e: int) -> tuple:
        """An expert as native.routed_experts takes it."""
        (gu_qs, gu_scales), (d_qs, d_scales) = self.store.expert_views(layer, e)
        return (gu_qs, gu_scales, d_qs, d_scales, *(self.store.expert_biases(layer, e) or (None, None)))

    def expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        (gu_qs, gu_scales), (d_qs, d_scales) = self.store.expert_views(layer, e)
        xs = x.to(torch.float32).contiguous()
        out = np.empty(xs.shape, dtype=np.float32)
        native.expert_ffn(xs.numpy(), gu_qs, gu_scales, d_qs, d_scales, self.activation, out,
                          *self.store.expert_biases(layer, e))
        return torch.from_numpy(out)

    def chunk(self, layer: int, e: int) -> HeldChunk:
        return HeldChunk(self.store.map_expert(layer, e), no_release)

    def resident_chunk(self, layer: int, e: int) -> HeldChunk:
        return self.chunk(layer, e)  # memory-mapped: the page cache brings it in when it is copied


class StoreTensorExperts(TorchExperts):
    """Experts of a bf16/f16/f32 store: torch tensors viewing the memory-mapped chunks (no copy)."""

    def __init__(self, store: ExpertStore, activation: str):
        super().__init__([], [], activation)
        self.store = store
        self.torch_dtype = PASSTHROUGH[store.expert_layout.fmt][1]

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        (gate_up,), (down,) = self.store.expert_views(layer, e)
        return as_tensor(gate_up, self.torch_dtype), as_tensor(down, self.torch_dtype)

    def biases(self, layer: int, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        b = self.store.expert_biases(layer, e)
        return (torch.from_numpy(b[0]), torch.from_numpy(b[1])) if b else (None, None)


def as_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A torch view of a passthrough section (bf16 is stored as uint16)."""
    t = torch.from_numpy(a)
    return t.view(dtype) if t.dtype != dtype else t
