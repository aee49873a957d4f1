"""How tensors are laid out as bytes in the expert store.

Every tensor is stored as one packed byte buffer: its sections (for q8/q4 the quantized values `qs`, then
the float16 `scales`; for passthrough formats the values `w`) one after the other, each starting on a
64-byte boundary. An expert chunk is the packed gate_up matrix [2I, D] (gate rows first, then up)
followed by the packed down matrix [D, I] and, for experts with biases (gpt-oss), their float32 biases
[2I] and [D], padded to a multiple of 4096 bytes so that it can be read with O_DIRECT. A chunk holds exactly the
bytes the kernels read: no decoding step in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import quant

SECTION_ALIGN = 64
CHUNK_ALIGN = 4096
PACK_ROWS = 4096  # rows of a matrix quantized at a time
QUANTIZED = quant.FORMATS + (quant.MXFP4,)  # formats the kernels compute on: q8, q4 (any matrix), mxfp4 (experts)
# passthrough formats: numpy storage dtype and the torch dtype it is viewed as
PASSTHROUGH = {"bf16": (np.uint16, torch.bfloat16), "f16": (np.float16, torch.float16),
               "f32": (np.float32, torch.float32)}
FORMATS = QUANTIZED + tuple(PASSTHROUGH)
TORCH_FORMAT = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class TensorLayout:
    """One tensor of the given shape in a format of FORMATS (quantized formats need 2D)."""

    fmt: str
    shape: tuple[int, ...]
    group: int = 32

    def sections(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        if self.fmt in QUANTIZED:
            qs_shape, scales_shape = quant.packed_shapes(self.fmt, *self.shape, group=self.group)
            qs_dtype = np.int8 if self.fmt == "q8" else np.uint8
            scales_dtype = np.uint8 if self.fmt == "mxfp4" else np.float16  # E8M0 exponents for mxfp4
            return [("qs", np.dtype(qs_dtype), qs_shape), ("scales", np.dtype(scales_dtype), scales_shape)]
        return [("w", np.dtype(PASSTHROUGH[self.fmt][0]), self.shape)]

    def offsets(self) -> list[tuple[int, np.dtype, tuple[int, ...]]]:
        out, offset = [], 0
        for _, dtype, shape in self.sections():
            out.append((offset, dtype, shape))
            offset = _align(offset + int(np.prod(shape)) * dtype.itemsize, SECTION_ALIGN)
        return out

    @property
    def nbytes(self) -> int:
        offset, dtype, shape = self.offsets()[-1]
        return offset + int(np.prod(shape)) * dtype.itemsize

    def pack(self, t: torch.Tensor, out: np.ndarray, quantize=None) -> None:
        """Write tensor t (any float dtype) into out (uint8, at least nbytes long). quantize: fast quantizer
        with the signature of quant.quantize (defaults to the NumPy reference). Quantized formats are packed
        PACK_ROWS rows at a time, so the float32 copy they quantize from stays small."""
        if tuple(t.shape) != self.shape:
            raise ValueError(f"tensor of shape {tuple(t.shape)} does not fit layout {self.shape}")
        if self.fmt in QUANTIZED:
            sections = self.views(out[:self.nbytes])
            for start in range(0, self.shape[0], PACK_ROWS):
                stop = min(self.shape[0], start + PACK_ROWS)
                w = t[start:stop].detach().to(torch.float32).numpy()
                for section, a in zip(sections, (quantize or quant.quantize)(w, self.fmt, self.group)):
                    section[start:stop] = a
            return
        np_dtype, torch_dtype = PASSTHROUGH[self.fmt]
        arrays = (t.detach().to(torch_dtype).contiguous().view(_same_size_int(torch_dtype)).numpy().view(np_dtype),)
        for (offset, dtype, shape), a in zip(self.offsets(), arrays):
            raw = np.ascontiguousarray(a, dtype=dtype).reshape(-1).view(np.uint8)
            out[offset:offset + raw.size] = raw

    def views(self, buf: np.ndarray) -> list[np.ndarray]:
        """The sections of a packed buffer as arrays (no copy)."""
        return [buf[o:o + int(np.prod(s)) * d.itemsize].view(d).reshape(s) for o, d, s in self.offsets()]


def _same_size_int(dtype: torch.dtype) -> torch.dtype:
    return {2: torch.int16, 4: torch.int32}[dtype.itemsize]


@dataclass(frozen=True)
class ExpertLayout:
    """One expert chunk: gate_up [2I, D] then down [D, I], both in fmt; with `biases`, then the float32 biases of
    gate_up [2I] and of down [D]."""

    fmt: str
    hidden: int
    inter: int
    group: int = 32
    biases: bool = False

    @property
    def gate_up(self) -> TensorLayout:
        return TensorLayout(self.fmt, (2 * self.inter, self.hidden), self.group)

    @property
    def down(self) -> TensorLayout:
        return TensorLayout(self.fmt, (self.hidden, self.inter), self.group)

    @property
    def down_offset(self) -> int:
        return _align(self.gate_up.nbytes, SECTION_ALIGN)

    @property
    def bias_offsets(self) -> list[tuple[int, np.dtype, tuple[int, ...]]]:
        """(offset, dtype, shape) of the gate_up and down biases in a chunk; empty without biases."""
        if not self.biases:
            return []
        first = _align(self.down_offset + self.down.nbytes, SECTION_ALIGN)
        second = _align(first + 2 * self.inter * 4, SECTION_ALIGN)
        return [(first, np.dtype(np.float32), (2 * self.inter,)), (second, np.dtype(np.float32), (self.hidden,))]

    @property
    def nbytes(self) -> int:
        end = self.down_offset + self.down.nbytes
        if self.biases:
            end = self.bias_offsets[1][0] + self.hidden * 4
        return _align(end, CHUNK_ALIGN)

    def pack(self, gate_up: torch.Tensor, down: torch.Tensor, gate_up_bias: torch.Tensor | None = None,
             down_bias: torch.Tensor | None = None, quantize=None) -> np.ndarray:
        if (gate_up_bias is not None) != self.biases:
            raise ValueError("an expert's biases must be given exactly when its layout holds them")
        buf = np.zeros(self.nbytes, dtype=np.uint8)
        self.gate_up.pack(gate_up, buf, quantize)
        self.down.pack(down, buf[self.down_offset:], quantize)
        for view, bias in zip(self.bias_views(buf), (gate_up_bias, down_bias)):
            view[:] = bias.detach().to(torch.float32).numpy()
        return buf

    def views(self, buf: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return self.gate_up.views(buf), self.down.views(buf[self.down_offset:])

    def bias_views(self, buf: np.ndarray) -> list[np.ndarray]:
        """[gate_up bias, down bias] of a chunk as float32 arrays (no copy); empty without biases."""
        return [buf[o:o + s[0] * 4].view(np.float32) for o, _, s in self.bias_offsets]
