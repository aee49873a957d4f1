"""The q8/q4 formats: NumPy reference quantize/dequantize, layout, error bounds."""

import numpy as np
import pytest

from edgerun.store import quant


def rel_rmse(w: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(approx - w) / np.linalg.norm(w))


def gaussian(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_round_trip_within_documented_bound(fmt, group):
    w = gaussian((96, 1024))
    qs, scales = quant.quantize(w, fmt, group)
    err = rel_rmse(w, quant.dequantize(qs, scales, w.shape[1]))
    assert 0 < err < quant.MAX_REL_RMSE[fmt]


def test_documented_errors_at_default_group():
    # the module docstring quotes these (Gaussian weights, G = 32)
    w = gaussian((256, 2048))
    for fmt, expected in (("q8", 0.0054), ("q4", 0.086)):
        err = rel_rmse(w, quant.dequantize(*quant.quantize(w, fmt), w.shape[1]))
        assert err == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("out_features", [1, 3, 7])
@pytest.mark.parametrize("in_features", [48, 100])
def test_odd_shapes(fmt, out_features, in_features):
    w = gaussian((out_features, in_features), seed=out_features)
    qs, scales = quant.quantize(w, fmt)
    assert (qs.shape, scales.shape) == quant.packed_shapes(fmt, out_features, in_features)
    assert qs.dtype == (np.int8 if fmt == "q8" else np.uint8) and scales.dtype == np.float16
    back = quant.dequantize(qs, scales, in_features)
    assert back.shape == w.shape and back.dtype == np.float32 and back.flags.c_contiguous
    assert rel_rmse(w, back) < quant.MAX_REL_RMSE[fmt]
    # the padding columns hold zero weights: q = 0, stored as 0 (q8) or nibble 8 (q4)
    full = quant.dequantize(qs, scales, qs.shape[1] * (1 if fmt == "q8" else 2))
    assert np.all(full[:, in_features:] == 0)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_zero_groups(fmt):
    w = gaussian((3, 128))
    w[0, :] = 0  # a whole row
    w[1, 32:64] = 0  # one group
    w[2, 96:128] = -0.0
    qs, scales = quant.quantize(w, fmt)
    bits = scales.view(np.uint16)
    assert bits[0].tolist() == [0, 0, 0, 0] and bits[1, 1] == 0 and bits[2, 3] == 0  # +0, not -0
    assert np.count_nonzero(bits) == 12 - 6
    zero_q = 0 if fmt == "q8" else 0x88
    assert np.all(qs[0] == zero_q)
    assert np.all(np.isfinite(scales))
    back = quant.dequantize(qs, scales, 128)
    assert np.all(np.isfinite(back)) and np.all(back[w == 0] == 0)


def test_q8_hand_made_group():
    w = np.zeros((1, 32), np.float32)
    w[0, :8] = [127, -127, 0.5, 1.5, 2.5, -2.5, 3.4, -63.6]  # scale 1: values round half to even
    qs, scales = quant.quantize(w, "q8")
    assert scales.tolist() == [[1.0]]
    assert qs[0, :8].tolist() == [127, -127, 0, 2, 2, -2, 3, -64]
    assert np.all(qs[0, 8:] == 0)


def test_q4_hand_made_groups():
    # group 1: values -8..7 then 7..-8; the first largest magnitude is -8, so scale = -8 / -8 = 1
    first = np.concatenate([np.arange(-8, 8), np.arange(7, -9, -1)]).astype(np.float32)
    # group 2: m = +4, scale = 4 / -8 = -0.5, q = round(w / -0.5) = -2 w
    second = np.zeros(32, np.float32)
    second[[0, 1, 16, 17]] = [4, -3.5, 0.5, 1]
    w = np.concatenate([first, second])[None, :]
    qs, scales = quant.quantize(w, "q4")
    assert scales.tolist() == [[1.0, -0.5]]
    # byte j holds value j (low nibble) and value j + 16 (high nibble); nibble = q + 8
    assert qs[0, :16].tolist() == [j | (15 - j) << 4 for j in range(16)]
    # q: 4 -> -8 (nibble 0), -3.5 -> 7 (15), 0.5 -> -1 (7), 1 -> -2 (6), 0 -> 0 (8)
    assert qs[0, 16:18].tolist() == [0 | 7 << 4, 15 | 6 << 4]
    assert np.all(qs[0, 18:] == 8 | 8 << 4)
    np.testing.assert_array_equal(quant.dequantize(qs, scales, 64), w)


def test_q4_largest_magnitude_is_exact():
    # the scale puts each group's largest magnitude exactly on level -8 (float16 rounding aside)
    w = gaussian((64, 256), seed=3)
    qs, scales = quant.quantize(w, "q4")
    nib = np.concatenate([qs.reshape(64, 8, 16) & 15, qs.reshape(64, 8, 16) >> 4], axis=2)
    at = np.argmax(np.abs(w.reshape(64, 8, 32)), axis=2)
    assert np.all(np.take_along_axis(nib, at[..., None], axis=2) == 0)


def test_ties_pick_the_first_value():
    w = np.zeros((1, 32), np.float32)
    w[0, 3], w[0, 9] = -2.0, 2.0
    assert quant.quantize(w, "q4")[1].tolist() == [[0.25]]  # m = -2
    w[0, 3], w[0, 9] = 2.0, -2.0
    assert quant.quantize(w, "q4")[1].tolist() == [[-0.25]]  # m = +2


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_scale_is_the_rounded_float16(fmt):
    # values are computed with the stored float16 scale, so q * scale reproduces exact multiples
    s16 = np.float16(0.0123)
    levels = np.arange(-7, 8, dtype=np.float32)
    w = np.zeros((1, 32), np.float32)
    w[0, :15] = levels * np.float32(s16)
    w[0, 15] = (127 if fmt == "q8" else -8) * np.float32(s16)
    qs, scales = quant.quantize(w, fmt)
    assert scales[0, 0] == s16
    np.testing.assert_array_equal(quant.dequantize(qs, scales, 32), w)


def test_huge_and_tiny_values_stay_finite():
    w = np.zeros((2, 64), np.float32)
    w[0, 0], w[0, 1] = 1e9, -3e8  # scale clipped to the float16 maximum
    w[1, :32] = 1e-12  # scale rounds to 0 in float16: the group is stored as zeros
    w[1, 32] = 1.0
    for fmt in quant.FORMATS:
        qs, scales = quant.quantize(w, fmt)
        assert np.all(np.isfinite(scales)) and abs(float(scales[0, 0])) == 65504
        assert scales[1, 0] == 0 and scales.view(np.uint16)[1, 0] == 0
        assert np.all(np.isfinite(quant.dequantize(qs, scales, 64)))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_float16_input(fmt):
    w16 = gaussian((5, 100), seed=7).astype(np.float16)
    qs, scales = quant.quantize(w16, fmt)
    qs32, scales32 = quant.quantize(w16.astype(np.float32), fmt)
    np.testing.assert_array_equal(qs, qs32)
    np.testing.assert_array_equal(scales.view(np.uint16), scales32.view(np.uint16))
    assert rel_rmse(w16.astype(np.float32), quant.dequantize(qs, scales, 100)) < quant.MAX_REL_RMSE[fmt]


@pytest.mark.parametrize("group", [32, 64, 128])
def test_bits_per_weight(group):
    # the arrays hold 8 (q8) or 4 (q4) bits per weight plus a float16 scale per group, nothing more
    for fmt, bits in (("q8", 8), ("q4", 4)):
        qs, scales = quant.quantize(gaussian((4, 256)), fmt, group)
        assert (qs.nbytes + scales.nbytes) * 8 == (bits + 16 / group) * 4 * 256


def test_packed_shapes():
    assert quant.packed_shapes("q8", 7, 100) == ((7, 128), (7, 4))
    assert quant.packed_shapes("q4", 7, 100) == ((7, 64), (7, 4))
    assert quant.packed_shapes("q8", 3, 4096, group=64) == ((3, 4096), (3, 64))
    assert quant.packed_shapes("q4", 1, 48, group=96) == ((1, 48), (1, 1))


@pytest.mark.parametrize("bad", [dict(fmt="q5"), dict(group=48), dict(group=0)])
def test_bad_format_or_group(bad):
    args = dict(fmt="q4", group=32) | bad
    with pytest.raises(ValueError):
        quant.quantize(gaussian((2, 64)), **args)
    with pytest.raises(ValueError):
        quant.packed_shapes(args["fmt"], 2, 64, group=args["group"])


def asymmetric_4bit(w: np.ndarray, group: int) -> np.ndarray:
    """Round trip through a 4-bit format with a float16 scale and minimum per group (dequantized)."""
    g = w.reshape(w.shape[0], -1, group)
    lo = g.min(axis=2, keepdims=True).astype(np.float16).astype(np.float32)
    step = ((g.max(axis=2, keepdims=True) - lo) / 15).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((g - lo) / np.where(step == 0, 1, step)), 0, 15)
    return (q * step + lo).reshape(w.shape)


@pytest.mark.parametrize("dist", ["gaussian", "student_t3"])
def test_symmetric_q4_beats_asymmetric_at_equal_bytes(dist):
    rng = np.random.default_rng(11)
    shape = (256, 2048)
    w = (rng.standard_normal(shape) if dist == "gaussian" else rng.standard_t(3, shape)).astype(np.float32)
    # asymmetric 4-bit with two float16 per 64 values: 4 + 32 / 64 = 4.5 bits per weight, as q4 at G = 32
    symmetric = rel_rmse(w, quant.dequantize(*quant.quantize(w, "q4", 32), shape[1]))
    asymmetric = rel_rmse(w, asymmetric_4bit(w, 64))
    assert symmetric <= asymmetric


# -- mxfp4 ------------------------------------------------------------------------------------------------------
def test_mxfp4_round_trip_and_layout():
    w = gaussian((40, 200))  # 200 inputs: the last group is padded
    qs, scales = quant.quantize(w, quant.MXFP4)
    assert (qs.shape, scales.shape) == quant.packed_shapes(quant.MXFP4, 40, 200) == ((40, 112), (40, 7))
    assert qs.dtype == np.uint8 and scales.dtype == np.uint8 and quant.is_mxfp4(scales)
    back = quant.dequantize(qs, scales, 200)
    assert 0.05 < rel_rmse(w, back) < 0.12  # 4-bit floats with a power-of-two scale per 32
    # every group's largest magnitude is within 6 steps of its power of two, and every value is an E2M1 value
    steps = back / np.ldexp(1.0, scales.astype(np.int32) - 127).repeat(32, axis=1)[:, :200]
    assert np.abs(steps).max() <= 6 and np.isin(np.abs(steps), quant.E2M1[:8]).all()
    # value 2j of a group in the low nibble of its byte j, value 2j + 1 in the high one
    code = int(qs[3, 16 * 2 + 5])
    s = 2.0 ** (int(scales[3, 2]) - 127)
    assert back[3, 64 + 10] == quant.E2M1[code & 15] * s and back[3, 64 + 11] == quant.E2M1[code >> 4] * s


def test_mxfp4_keeps_values_it_can_hold():
    """Weights that are E2M1 values times a power of two per group (an MXFP4 release, read as bfloat16) come back
    exactly, whatever exponent the release chose for a group."""
    rng = np.random.default_rng(3)
    w = quant.E2M1[rng.integers(0, 16, (8, 128))] * np.ldexp(1.0, rng.integers(-8, 4, (8, 4))).repeat(32, axis=1)
    w[0, :32] /= 4  # a group whose largest value is 1.5 steps: quantized with a smaller exponent
    qs, scales = quant.quantize(w.astype(np.float32), quant.MXFP4)
    assert np.array_equal(quant.dequantize(qs, scales, 128), w.astype(np.float32))


def test_mxfp4_takes_groups_of_32_only():
    with pytest.raises(ValueError, match="32"):
        quant.quantize(gaussian((2, 64)), quant.MXFP4, 64)
