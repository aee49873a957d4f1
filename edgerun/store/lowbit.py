"""Low-bit copies of a q4 store's experts: 2 or 3 bits a weight, read instead of the q4 chunk when an expert that
is not in memory weighs little in a token's routing (runtime/offload.py), so fewer bytes come off the disk.

A copy is quantized like q4 (symmetric, groups of G along the input, one float16 scale a group) with fewer levels:

q3  values v in [-4, 3]; code c = v + 4 in [0, 7]: its low two bits in the 2-bit plane, its third in the 1-bit
    plane. 3 + 16 / G bits per weight (3.5 at G = 32).
q2  values v in [-2, 1]; code c = v + 2 in [0, 3] in the 2-bit plane. 2 + 16 / G bits per weight (2.5).

Packing, per group: byte j (0 <= j < G/4) of the 2-bit plane holds values j, j + G/4, j + G/2, j + 3G/4 in its
bit pairs 0..3; byte j (0 <= j < G/8) of the 1-bit plane holds bit 2 of values j + b G/8 in bit b (0 <= b < 8).
The scale is the one of the candidates m / qmin x f (m the group's value of largest magnitude, with its sign, f in
SCALE_STEPS) that gives the least squared error: with so few levels, clipping the largest value pays.

Every value of a copy is a value of the q4 grid: v s = (4v) (s/4) for q2 and (2v) (s/2) for q3, with 4v and 2v
in q4's [-8, 7]. So a copy read from the disk is expanded into an ordinary q4 chunk (to_q4, byte operations
only) and computed by the q4 kernels; its values are exactly the copy's (the scale's division is exact in
float16 unless it falls below float16's normal range, 6.1e-5).

Measured error at G = 32 (relative RMSE of a round trip from float32 weights): Gaussian q3 0.165, q2 0.336;
Student-t(3) q3 0.225, q2 0.379 (q4: 0.086 and 0.127).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import EdgerunError
from .layout import CHUNK_ALIGN, SECTION_ALIGN, ExpertLayout, _align
from .quant import dequantize, padded_in_features, round_scales

FORMATS = ("q3", "q2")
LEVELS = {"q3": (-4, 3), "q2": (-2, 1)}
TO_Q4 = {"q3": 2, "q2": 4}  # a copy's value v is the q4 value v x this, with the scale divided by it
SCALE_STEPS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
BITS = {"q3": 3, "q2": 2}


def _check(fmt: str, group: int) -> None:
    if fmt not in FORMATS:
        raise EdgerunError(f"unknown low-bit format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if group <= 0 or group % 32:
        raise ValueError(f"group size must be a positive multiple of 32; got {group}")


def packed_shapes(fmt: str, out_features: int, in_features: int, group: int = 32) -> list[tuple[int, int]]:
    """Shapes of the sections of a [out, in] matrix: 2-bit plane (uint8), 1-bit plane for q3 (uint8), scales."""
    _check(fmt, group)
    kp = padded_in_features(in_features, group)
    planes = [(out_features, kp // 4)] + ([(out_features, kp // 8)] if fmt == "q3" else [])
    return planes + [(out_features, kp // group)]


def candidate_scales(g: np.ndarray, fmt: str) -> np.ndarray:
    """float16 [len(SCALE_STEPS), O, groups]: each group's candidate scales, m / qmin x step, rounded."""
    qmin = LEVELS[fmt][0]
    at = np.argmax(np.abs(g), axis=2)[..., None]  # the first of the largest magnitudes
    top = np.take_along_axis(g, at, axis=2)[..., 0] / np.float32(qmin)
    return np.stack([round_scales(top * np.float32(step)) for step in SCALE_STEPS])


def pack_codes(codes: np.ndarray, fmt: str, group: int) -> list[np.ndarray]:
    """The bit planes (see packed_shapes) of codes uint8 [O, Kp] in [0, 2^bits)."""
    o, kp = codes.shape
    c = codes.reshape(o, kp // group, 4, group // 4)
    lo = (c[:, :, 0] & 3) | (c[:, :, 1] & 3) << 2 | (c[:, :, 2] & 3) << 4 | (c[:, :, 3] & 3) << 6
    planes = [np.ascontiguousarray(lo.reshape(o, kp // 4))]
    if fmt == "q3":
        bits = (codes.reshape(o, kp // group, 8, group // 8) >> 2) & 1
        hi = np.zeros((o, kp // group, group // 8), dtype=np.uint8)
        for b in range(8):
            hi |= bits[:, :, b] << b
        planes.append(hi.reshape(o, kp // 8))
    return planes


def quantize(w: np.ndarray, fmt: str, group: int = 32) -> list[np.ndarray]:
    """The sections (see packed_shapes) of the float matrix w [O, K] in fmt (the NumPy reference of
    edgerun.native.quantize_low)."""
    _check(fmt, group)
    o, k = w.shape
    kp = padded_in_features(k, group)
    wp = np.zeros((o, kp), dtype=np.float32)
    wp[:, :k] = w
    g = wp.reshape(o, kp // group, group)
    qmin, qmax = LEVELS[fmt]
    candidates = candidate_scales(g, fmt)
    best_err = best_q = scales = None
    for s16 in candidates:
        s = s16.astype(np.float32)[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s != 0, np.clip(np.rint(g / s), qmin, qmax), 0).astype(np.float32)
        err = ((q * s - g).astype(np.float64) ** 2).sum(axis=2)
        if best_err is None:
            best_err, best_q, scales = err, q, s16
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_q = np.where(better[..., None], q, best_q)
            scales = np.where(better, s16, scales)
    codes = (best_q - qmin).astype(np.uint8).reshape(o, kp)
    return pack_codes(codes, fmt, group) + [scales.astype(np.float16)]


def to_q4(sections: list[np.ndarray], fmt: str, qs: np.ndarray, scales: np.ndarray) -> None:
    """Write the q4 (qs uint8 [O, Kp / 2], scales float16 [O, Kp / G]) equal to a copy's sections. The bytes are
    worked on as 64-bit (q2) or 32-bit (q3) words: every operation keeps to the bits of its own byte."""
    from .. import native

    s = sections[-1]
    quarter = sections[0].shape[1] // s.shape[1]  # G/4 bytes a group, a multiple of 8
    if not native.low_to_q4(sections, fmt, quarter, qs):  # the kernels do the same operations in one pass
        _q4_words(sections, fmt, quarter, qs)
    divided_scales(s, fmt, scales)


def _q4_words(sections: list[np.ndarray], fmt: str, quarter: int, qs: np.ndarray) -> None:
    """to_q4's bits in NumPy."""
    lo = sections[0]
    o, ng = sections[-1].shape
    if fmt == "q2":  # nibble = 4 c: pairs 0 and 2 of byte j make q4 byte j, pairs 1 and 3 make byte j + G/4
        words = lo.reshape(o, ng, quarter).view(np.uint64)
        out = qs.reshape(o, ng, 2, quarter).view(np.uint64)
        np.left_shift(words & np.uint64(0x3333333333333333), np.uint64(2), out=out[:, :, 0])
        np.bitwise_and(words, np.uint64(0xCCCCCCCCCCCCCCCC), out=out[:, :, 1])
    else:  # nibble = 2 c: the low bits as for q2 shifted one less, bit 2 from the 1-bit plane
        eighth = quarter // 2
        words = lo.reshape(o, ng, 2, eighth).view(np.uint32)
        out = qs.reshape(o, ng, 4, eighth).view(np.uint32)  # block b: q4 bytes b G/8 .. (b + 1) G/8
        np.left_shift(words & np.uint32(0x33333333), np.uint32(1), out=out[:, :, 0:2])
        np.right_shift(words & np.uint32(0xCCCCCCCC), np.uint32(1), out=out[:, :, 2:4])
        hi = sections[1].reshape(o, ng, 1, eighth).view(np.uint32)
        out |= ((hi >> np.arange(4, dtype=np.uint32).reshape(1, 1, 4, 1)) & np.uint32(0x11111111)) << np.uint32(3)


def divided_scales(s: np.ndarray, fmt: str, out: np.ndarray) -> None:
    """out = s / TO_Q4[fmt] in float16, exactly as float16 division rounds it: a normal scale whose exponent stays
    normal loses 1 (q3) or 2 (q2) from its exponent bits; the others (tiny or zero) are divided in float32."""
    shift = TO_Q4[fmt].bit_length() - 1
    bits, o = s.view(np.uint16), out.view(np.uint16)
    np.subtract(bits, np.uint16(shift << 10), out=o)
    small = (bits & 0x7C00) <= (shift << 10)
    if small.any():
        out[small] = s[small].astype(np.float32) / np.float32(TO_Q4[fmt])


def dequantize_low(sections: list[np.ndarray], fmt: str, in_features: int) -> np.ndarray:
    """The float32 matrix [O, in_features] a copy stands for (through its q4 form)."""
    s = sections[-1]
    qs = np.empty((s.shape[0], sections[0].shape[1] * 2), dtype=np.uint8)
    scales = np.empty_like(s)
    to_q4(sections, fmt, qs, scales)
    return dequantize(qs, scales, in_features)


class LowLayout:
    """One expert's copy as bytes: gate_up [2I, D] then down [D, I], each its sections one after the other on
    64-byte boundaries, the chunk padded to 4096 bytes (read with O_DIRECT like a q4 chunk)."""

    def __init__(self, fmt: str, expert: ExpertLayout):
        if expert.fmt != "q4":
            raise EdgerunError(f"low-bit copies are made for q4 experts; this store's are {expert.fmt}")
        if expert.biases:
            raise EdgerunError("low-bit copies are not made for experts with biases (gpt-oss)")
        _check(fmt, expert.group)
        self.fmt, self.expert = fmt, expert
        offset, self.sections = 0, []
        for rows, cols in ((2 * expert.inter, expert.hidden), (expert.hidden, expert.inter)):
            matrix = []
            for shape, dtype in zip(packed_shapes(fmt, rows, cols, expert.group),
                                    [np.uint8] * (2 if fmt == "q3" else 1) + [np.float16]):
                matrix.append((offset, np.dtype(dtype), shape))
                offset = _align(offset + int(np.prod(shape)) * np.dtype(dtype).itemsize, SECTION_ALIGN)
            self.sections.append(matrix)
        self.nbytes = _align(offset, CHUNK_ALIGN)

    def views(self, buf: np.ndarray) -> list[list[np.ndarray]]:
        return [[buf[o:o + int(np.prod(s)) * d.itemsize].view(d).reshape(s) for o, d, s in matrix]
                for matrix in self.sections]

    def pack(self, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
        from .. import native

        buf = np.zeros(self.nbytes, dtype=np.uint8)
        for views, w in zip(self.views(buf), (gate_up, down)):
            for view, a in zip(views, native.quantize_low(w, self.fmt, self.expert.group)):
                view[...] = a
        return buf

    def expand(self, buf: np.ndarray, chunk: np.ndarray) -> None:
        """Write the q4 chunk (the store's expert layout) equal to the copy in buf."""
        for sections, (qs, scales) in zip(self.views(buf), self.expert.views(chunk)):
            to_q4(sections, self.fmt, qs, scales)


def low_chunk_path(root: Path, layer: int, expert: int) -> Path:
    return root / "experts_low" / "c" / str(layer) / str(expert) / "0"


def add_low_copies(path, fmt: str = "q2", progress: bool | None = None) -> dict:
    """Write a low-bit copy of every expert of the q4 store at path, quantized from its q4 values (replacing
    copies made before); returns the store's new `low` metadata."""
    import zarr

    from .. import native
    from ..progress import ByteProgress
    from .store import META_KEY, ExpertStore, crc32

    store = ExpertStore(path)
    low = LowLayout(fmt, store.expert_layout)
    ex = store.expert_layout
    layers, n = store.moe_layers, store.num_experts
    root = zarr.open_group(str(store.path), mode="r+")
    if "experts_low" in root:
        del root["experts_low"]
    root.create_array(name="experts_low", shape=(max(layers) + 1, n, low.nbytes), chunks=(1, 1, low.nbytes),
                      dtype="uint8", compressors=None, fill_value=0)
    checksums: dict[str, list[int]] = {str(layer): [] for layer in layers}

    def make(key: tuple[int, int]) -> np.ndarray:
        (gq, gs), (dq, ds) = store.expert_views(*key)
        return low.pack(native.dequantize_q4(gq, gs)[:, :ex.hidden], native.dequantize_q4(dq, ds)[:, :ex.inter])

    keys = [(layer, e) for layer in layers for e in range(n)]
    # two experts at a time: the kernels use every core, NumPy's steps between them one each
    with ByteProgress(len(keys) * store.chunk_bytes, f"low-bit copies ({fmt})", enabled=progress) as bar, \
            ThreadPoolExecutor(2) as pool:
        for (layer, e), buf in zip(keys, pool.map(make, keys)):
            target = low_chunk_path(store.path, layer, e)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(buf.tobytes())
            checksums[str(layer)].append(crc32(buf))
            bar.update(store.chunk_bytes)
    meta = store.meta  # as opened: the store's whole metadata, which this adds to
    meta["experts"]["low"] = {"format": fmt, "crc32": checksums}
    root.attrs[META_KEY] = meta
    return meta["experts"]["low"]
