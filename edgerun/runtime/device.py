"""Weights on an accelerator (CUDA, Apple's MPS, or the CPU standing in for one): a store's q8/q4 bytes kept as
they are in device memory and dequantized into a reused scratch right before each matmul.

Products are float32 like the CPU kernels'. Weights are dequantized to the device's compute dtype (float16 on
CUDA and MPS, float32 on the CPU) and multiplied with the activations in that dtype: float16 rounds the
dequantized weights and the activations to 11 significant bits (relative error <= 2^-11 each, about 1e-3 on a
product summed over thousands of terms); float32 computes them exactly (q x a float16 scale is exact in float32).

Shapes: n = experts in a batch, T = tokens, D = hidden, I = expert width, O = rows, Kp = padded columns.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..models.parts import gated_fn
from ..store.layout import PASSTHROUGH, ExpertLayout, TensorLayout
from ..store.quant import E2M1, padded_in_features

DENSE_BLOCK_BYTES = 64 << 20  # dequantized rows of a dense matrix at a time: bounds its scratch


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype weights are dequantized to on this device."""
    return torch.float32 if device.type == "cpu" else torch.float16


def dequantize(qs: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the values (qs, scales) stand for into out [..., O, Kp] (any float dtype) and return it. qs int8
    [..., O, Kp] (q8) or uint8 [..., O, Kp / 2] (q4 and mxfp4, two values a byte as store/quant.py packs them);
    scales float16 [..., O, Kp / G], or uint8 E8M0 exponents for mxfp4."""
    groups = scales.shape[-1]
    grouped = out.view(*out.shape[:-1], groups, -1)  # [..., O, ng, G]
    if scales.dtype == torch.uint8:  # mxfp4: byte j of a group holds values 2j and 2j + 1, E2M1-coded
        table = torch.from_numpy(E2M1).to(device=out.device, dtype=out.dtype)
        pairs = grouped.view(*grouped.shape[:-1], -1, 2)
        nib = qs.view(*qs.shape[:-1], groups, -1).long()
        pairs[..., 0].copy_(table[nib & 15])
        pairs[..., 1].copy_(table[nib >> 4])
        grouped.mul_(torch.exp2(scales.float() - 127).to(out.dtype).unsqueeze(-1))
        return out
    if qs.dtype == torch.int8:
        out.copy_(qs)
    else:
        nib = qs.view(*qs.shape[:-1], groups, 1, -1)  # [..., O, ng, 1, G/2]: byte j holds values j and j + G/2
        halves = grouped.view(*grouped.shape[:-1], 2, -1)
        halves[..., 0:1, :].copy_(nib & 15)
        halves[..., 1:2, :].copy_(nib >> 4)
        out.sub_(8)
    grouped.mul_(scales.to(out.dtype).unsqueeze(-1))
    return out


def section(rows: torch.Tensor, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A section of packed buffers rows [n, bytes] (uint8) as a [n, *shape] tensor of dtype, without a copy."""
    nbytes = math.prod(shape) * dtype.itemsize
    raw = rows[:, offset:offset + nbytes]
    tdtype = {np.int8: torch.int8, np.uint8: torch.uint8, np.float16: torch.float16, np.uint16: torch.bfloat16,
              np.float32: torch.float32}[dtype.type]
    return raw.view(tdtype).view(rows.shape[0], *shape)


class DeviceMatrix:
    """A q8/q4 matrix [out, in] in device memory (implements models.parts.Matrix). Rows are dequantized a block at
    a time (DENSE_BLOCK_BYTES), so even a large output head needs little scratch."""

    dtype = torch.float32

    def __init__(self, qs: torch.Tensor, scales: torch.Tensor, in_features: int, compute: torch.dtype):
        self.qs, self.scales, self.in_features, self.compute = qs, scales, in_features, compute
        self.out_features = qs.shape[0]
        self.padded = qs.shape[1] * (1 if qs.dtype == torch.int8 else 2)  # q4 packs two values a byte
        elem = torch.empty((), dtype=compute).element_size()
        self.block = max(1, DENSE_BLOCK_BYTES // (self.padded * elem))

    @classmethod
    def from_arrays(cls, qs: np.ndarray, scales: np.ndarray, in_features: int, device: torch.device,
                    compute: torch.dtype) -> DeviceMatrix:
        return cls(torch.from_numpy(qs).to(device), torch.from_numpy(scales).to(device), in_features, compute)

    @property
    def nbytes(self) -> int:
        return self.qs.nbytes + self.scales.nbytes

    def _weights(self, start: int, stop: int) -> torch.Tensor:
        out = torch.empty((stop - start, self.padded), dtype=self.compute, device=self.qs.device)
        return dequantize(self.qs[start:stop], self.scales[start:stop], out)[:, :self.in_features]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        xs = x.to(self.compute)
        out = torch.empty((x.shape[0], self.out_features), dtype=torch.float32, device=x.device)
        for start in range(0, self.out_features, self.block):
            stop = min(self.out_features, start + self.block)
            out[:, start:stop] = xs @ self._weights(start, stop).T
        return out if bias is None else out + bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty((ids.shape[0], self.padded), dtype=self.compute, device=self.qs.device)
        return dequantize(self.qs[ids], self.scales[ids], out)[:, :self.in_features].float()


def to_device(layout: TensorLayout, views: list[np.ndarray], device: torch.device, compute: torch.dtype,
              dtype: torch.dtype):
    """A stored tensor (its section views) in device memory: a DeviceMatrix for q8/q4, else a tensor of dtype."""
    if layout.fmt in PASSTHROUGH:
        t = torch.from_numpy(views[0])
        t = t.view(PASSTHROUGH[layout.fmt][1]) if t.dtype != PASSTHROUGH[layout.fmt][1] else t
        return t.to(device=device, dtype=dtype)
    return DeviceMatrix.from_arrays(views[0], views[1], layout.shape[1], device, compute)


class ExpertKernel:
    """Experts whose chunks sit in rows of a device slot pool [slots, chunk bytes], computed a batch of experts at
    a time: the batch's gate_up matrices are dequantized into one scratch, multiplied with the tokens routed to
    each (padded to the batch's longest group) by one batched matmul, then the same for down."""

    def __init__(self, layout: ExpertLayout, activation: str, device: torch.device, compute: torch.dtype,
                 batch: int):
        if layout.fmt not in ("q8", "q4", "mxfp4"):
            raise ValueError(f"the device expert kernel computes q8/q4/mxfp4 chunks, not {layout.fmt}")
        self.layout, self.device, self.compute, self.batch = layout, device, compute, max(1, batch)
        self.gated = gated_fn(activation)
        self.gate_up = layout.gate_up.offsets()
        self.biases = layout.bias_offsets  # [] or the float32 biases of gate_up [2I] and down [D]
        self.down = [(layout.down_offset + offset, dtype, shape) for offset, dtype, shape in layout.down.offsets()]
        self._scratch = torch.empty(0, dtype=compute, device=device)

    @staticmethod
    def scratch_elements(layout: ExpertLayout) -> int:
        """Elements of one expert's largest dequantized matrix (gate_up or down, with padded columns)."""
        D, I, G = layout.hidden, layout.inter, layout.group
        return max(2 * I * padded_in_features(D, G), D * padded_in_features(I, G))

    @classmethod
    def scratch_bytes(cls, layout: ExpertLayout, batch: int, compute: torch.dtype) -> int:
        return batch * cls.scratch_elements(layout) * torch.empty((), dtype=compute).element_size()

    def _dequantized(self, rows: torch.Tensor, sections: list) -> torch.Tensor:
        """[n, O, K] weights of one matrix of each chunk in rows [n, chunk bytes], in the scratch."""
        (q_off, q_dtype, q_shape), (s_off, s_dtype, s_shape) = sections
        n, (out_rows, groups) = rows.shape[0], s_shape
        padded = groups * self.layout.group
        size = n * out_rows * padded
        if self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=self.compute, device=self.device)
        out = self._scratch[:size].view(n, out_rows, padded)
        dequantize(section(rows, q_off, q_dtype, q_shape), section(rows, s_off, s_dtype, s_shape), out)
        return out

    def __call__(self, pool: torch.Tensor, slots: list[int], x: torch.Tensor, groups: list[torch.Tensor]
                 ) -> torch.Tensor:
        """The experts in pool rows `slots`, expert i on the tokens x[groups[i]] (x [T, D] float32 on the device,
        groups: token indices on the CPU): float32 [sum of len(groups[i]), D], the groups' rows one after the
        other. Every index is moved to the device before any work is queued, so nothing here waits for it."""
        D, I = self.layout.hidden, self.layout.inter
        batches = []
        for start in range(0, len(slots), self.batch):
            part = groups[start:start + self.batch]
            counts = [len(g) for g in part]
            longest = max(counts)
            # row of each routed token in the padded [n * longest] layout: its expert's block, then its rank
            rows_at = torch.cat([torch.arange(c) + i * longest for i, c in enumerate(counts)])
            index = (torch.tensor(slots[start:start + len(part)]), torch.cat(part), rows_at)
            batches.append((len(part), longest, *(t.to(self.device) for t in index)))
        out = []
        for n, longest, slot_rows, tokens, rows_at in batches:
            xs = torch.zeros((n * longest, D), dtype=self.compute, device=self.device)
            xs[rows_at] = x[tokens].to(self.compute)
            chunks = pool[slot_rows]  # [n, chunk bytes]
            h = torch.bmm(xs.view(n, longest, D), self._dequantized(chunks, self.gate_up)[:, :, :D].transpose(1, 2))
            b1, b2 = (section(chunks, *b)[:, None, :].to(self.compute) for b in self.biases) if self.biases else (0, 0)
            g, u = (h + b1).chunk(2, dim=-1)
            a = self.gated(g, u)  # [n, longest, I]
            y = torch.bmm(a, self._dequantized(chunks, self.down)[:, :, :I].transpose(1, 2)) + b2
            out.append(y.reshape(n * longest, D)[rows_at])
        return torch.cat(out).float()
