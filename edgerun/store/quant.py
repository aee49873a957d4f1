"""Quantization formats of the expert store, with the NumPy reference quantizer and dequantizer.

A weight matrix W[O, K] (out, in) is quantized in groups of G consecutive values along K (G = 32 by
default; any multiple of 32). K is padded with zero weights to Kp, a multiple of G. Each group has one
float16 scale; a group of zeros gets scale 0 and values 0.

q8  symmetric int8: scale = max|w| / 127, q = round(w / scale) in [-127, 127], w ~ q * scale.
    Arrays: qs int8 [O, Kp], scales float16 [O, Kp / G]. 8 + 16 / G bits per weight (8.5 at G = 32).
q4  symmetric 4 bits: m = the group's value of largest magnitude, with its sign; scale = m / -8;
    q = round(w / scale) in [-8, 7], stored as the nibble q + 8; w ~ (nibble - 8) * scale. Dividing by
    -8 rather than 7 puts m exactly on -8 and uses the whole range of 16 levels. Packing: in each group,
    byte j (0 <= j < G/2) holds value j in its low nibble and value j + G/2 in its high nibble.
    Arrays: qs uint8 [O, Kp / 2], scales float16 [O, Kp / G]. 4 + 16 / G bits per weight (4.5 at G = 32).

mxfp4  the OCP microscaling format gpt-oss ships its experts in, for experts only: per group of 32 (the
    only group size), one E8M0 scale byte e (2 ** (e - 127)) and 32 E2M1 values (1 sign, 2 exponent and 1
    mantissa bit: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives); byte j of a group holds value 2j in its low
    nibble and value 2j + 1 in its high one, in the release's order. e = ceil(log2(max|w| / 6)) (from the
    exponent and mantissa of the float32 quotient, exactly) and each value's nearest E2M1 value (ties to the
    smaller magnitude), so that a release's values come back exactly. Arrays: qs uint8 [O, Kp / 2], scales
    uint8 [O, Kp / 32]. 4.25 bits per weight.

Values are always computed with the float16-rounded scale, so dequantization matches quantization
exactly. A scale is clipped to the float16 range and rounded to nearest even; a scale that is or rounds
to 0 is stored as +0 and its group as zeros. Ties for m (+a and -a in one group) go to the first value.
Inputs must be finite.

Measured error at G = 32 (relative RMSE = ||W - deq(W)|| / ||W||; max error relative to the group's
largest magnitude):

    format  Gaussian  Student-t(3)  max |error| / group max
    q8      0.0054    0.0086        0.0039 (half a step)
    q4      0.086     0.127         0.125 (a value near |m| with the sign opposite to m is clipped to 7/8 |m|)

Larger groups cost accuracy (Gaussian, G = 64 / 128 / 256: q8 0.0059 / 0.0065 / 0.0070,
q4 0.095 / 0.103 / 0.111). At equal bytes, symmetric q4 at G = 32 beats an asymmetric 4-bit format
(float16 scale and minimum per group of 64, also 4.5 bits per weight): 0.086 vs 0.090 on Gaussian,
0.127 vs 0.133 on Student-t(3).
"""

from __future__ import annotations

import numpy as np

FORMATS = ("q8", "q4")  # groups of any multiple of 32 with a float16 scale: for any matrix
MXFP4 = "mxfp4"  # for experts, groups of 32 only
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
E2M1_MIDPOINTS = (E2M1[1:8] + E2M1[:7]) / 2  # between consecutive magnitudes: a value on one goes to the smaller
# Upper bounds of the relative RMSE of a round trip on Gaussian weights, for any group size up to 256.
MAX_REL_RMSE = {"q8": 0.0075, "q4": 0.115}

_FP16_MAX = np.float32(65504.0)
_QMAX = {"q8": 127, "q4": 7}
_QMIN = {"q8": -127, "q4": -8}


def _check(fmt: str, group: int) -> None:
    if fmt not in FORMATS + (MXFP4,):
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {', '.join(FORMATS + (MXFP4,))}")
    if group <= 0 or group % 32:
        raise ValueError(f"group size must be a positive multiple of 32; got {group}")
    if fmt == MXFP4 and group != 32:
        raise ValueError(f"mxfp4 has groups of 32; got {group}")


def padded_in_features(in_features: int, group: int = 32) -> int:
    """in_features rounded up to a multiple of group (Kp)."""
    return -(-in_features // group) * group


def packed_shapes(fmt: str, out_features: int, in_features: int, group: int = 32) -> tuple[tuple, tuple]:
    """(qs shape, scales shape) of a [out_features, in_features] matrix in fmt."""
    _check(fmt, group)
    kp = padded_in_features(in_features, group)
    return (out_features, kp if fmt == "q8" else kp // 2), (out_features, kp // group)


def is_mxfp4(scales: np.ndarray) -> bool:
    """Whether (qs, scales) are MXFP4: its scales are E8M0 bytes where q8's and q4's are float16."""
    return scales.dtype == np.uint8


def round_scales(raw: np.ndarray) -> np.ndarray:
    """The float16 scales stored for float32 ones: clipped to the float16 range, rounded to nearest even,
    and a scale of 0 (or one that rounds to 0) stored as +0."""
    scales = np.clip(raw, -_FP16_MAX, _FP16_MAX).astype(np.float16)
    scales[scales == 0] = 0
    return scales


def quantize(w: np.ndarray, fmt: str, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Quantize a float matrix w [O, K] (float32 or float16; bfloat16 converted to float32 first) to fmt.

    Returns (qs, scales) with the shapes of packed_shapes: qs int8 for q8, uint8 for q4; scales float16.
    """
    _check(fmt, group)
    if w.ndim != 2:
        raise ValueError(f"quantize needs a 2D matrix; got shape {w.shape}")
    o, k = w.shape
    kp = padded_in_features(k, group)
    wp = np.zeros((o, kp), dtype=np.float32)
    wp[:, :k] = w
    g = wp.reshape(o, kp // group, group)
    if fmt == MXFP4:
        return _quantize_mxfp4(g)

    if fmt == "q8":
        scale = np.max(np.abs(g), axis=2) / np.float32(127)
    else:
        at = np.argmax(np.abs(g), axis=2)[..., None]  # first of the largest magnitudes
        scale = np.take_along_axis(g, at, axis=2)[..., 0] / np.float32(-8)
    scales = round_scales(scale)

    s = scales.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(g / s)
    q = np.where(s != 0, np.clip(q, _QMIN[fmt], _QMAX[fmt]), 0)

    if fmt == "q8":
        return q.astype(np.int8).reshape(o, kp), scales
    nib = (q + 8).astype(np.uint8)
    half = group // 2
    packed = nib[..., :half] | (nib[..., half:] << 4)
    return packed.reshape(o, kp // 2), scales


def _quantize_mxfp4(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    o, ng, _ = g.shape
    amax = np.abs(g).max(axis=2)
    mantissa, exponent = np.frexp(amax / np.float32(6.0))  # q = mantissa * 2 ** exponent, mantissa in [0.5, 1)
    e = np.where(amax > 0, np.where(mantissa > 0.5, exponent, exponent - 1), -127)  # ceil(log2(q)), exactly
    e = np.clip(e, -127, 127).astype(np.int32)
    mags = np.abs(g) / np.ldexp(np.float32(1), e)[..., None].astype(np.float32)
    codes = np.searchsorted(E2M1_MIDPOINTS, mags, side="left").astype(np.uint8) | (np.signbit(g) << 3).astype(np.uint8)
    codes[mags == 0] = 0
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.reshape(o, ng * 16), (e + 127).astype(np.uint8)


def dequantize(qs: np.ndarray, scales: np.ndarray, in_features: int) -> np.ndarray:
    """The float32 matrix [O, in_features] that (qs, scales) stand for; the format follows from the dtypes
    (int8: q8; uint8 with float16 scales: q4; uint8 with uint8 scales: mxfp4) and the group size from the
    shapes."""
    o, ng = scales.shape
    if is_mxfp4(scales):
        blocks = qs.reshape(o, ng, 16)
        values = np.stack([E2M1[blocks & 15], E2M1[blocks >> 4]], axis=-1).reshape(o, ng, 32)
        w = values * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None].astype(np.float32)
        return np.ascontiguousarray(w.reshape(o, -1)[:, :in_features], dtype=np.float32)
    if qs.dtype == np.int8:
        q = qs.astype(np.float32)
    elif qs.dtype == np.uint8:
        half = qs.shape[1] // ng
        nib = qs.reshape(o, ng, half)
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=2).astype(np.float32) - 8
    else:
        raise ValueError(f"qs must be int8 (q8) or uint8 (q4); got {qs.dtype}")
    w = q.reshape(o, ng, -1) * scales.astype(np.float32)[..., None]
    return np.ascontiguousarray(w.reshape(o, -1)[:, :in_features])
