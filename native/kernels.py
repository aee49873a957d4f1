"""numba kernels on quantized weights (formats in edgerun.store.quant).

Import this module only through config.load_kernels(), which configures numba first.

Layout of the arrays the kernels take (the wrappers in edgerun.native prepare them):
x float32 [T, Kp] with Kp the padded in_features (zero columns past K); qs int8 [O, Kp] (q8) or uint8
[O, Kp / 2] (q4); scales as uint16 [O, Kp / G] holding float16 bits, turned into float32 through
F16_TO_F32 (passed in as `lut`); out float32 [T, O].

The inner loops work on SIMD vectors of 16 float32 lanes, written as LLVM vector operations through
numba intrinsics: numba leaves LLVM's SLP vectorizer off, so plain loops over a group of 32 values would
be fully unrolled into scalar code. LLVM lowers the vectors to whatever the CPU has (one AVX-512
register, two AVX2 registers, four NEON registers). A vector value lives in registers across loop
iterations, so a row keeps 16 partial sums and the horizontal sum happens once per row.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, overload, register_model
from numba.typed import List

from ..store.quant import E2M1
from .reference import GELU, GELU_TANH, SILU, SWIGLU_ALPHA, SWIGLU_LIMIT  # the activation codes and gpt-oss's clamp

LANES = 16
ROWS = 4  # output rows per block: shares each x vector and hides FMA latency
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_I32VEC = ir.VectorType(ir.IntType(32), LANES)
_FAST = ("fast",)

# float16 bits -> float32 value; exact for every finite half
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
# MXFP4 (edgerun.store.quant): E8M0 scale byte -> 2 ** (byte - 127) (255 is NaN)
E8M0_TO_F32 = np.append(np.ldexp(np.float32(1), np.arange(255) - 127), np.nan).astype(np.float32)


class _Vec(types.Type):
    """LANES float32 lanes held in one LLVM vector value."""

    def __init__(self):
        super().__init__(name=f"f32x{LANES}")


VEC = _Vec()


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


def _is_row(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.dtype == dtype


def _load(context, builder, aty, arr, idx, elem, n=LANES):
    """n (by default LANES) consecutive elements of a 1D array from index idx (unaligned, no bounds check)."""
    data = context.make_array(aty)(context, builder, arr).data
    ptr = builder.bitcast(builder.gep(data, [idx]), ir.VectorType(elem, n).as_pointer())
    return builder.load(ptr, align=1)


def _splat(builder, s):
    v = builder.insert_element(ir.Constant(_VEC, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VEC, ir.Undefined), ir.Constant(_I32VEC, [0] * LANES))


@intrinsic
def vzero(typingctx):
    """A vector of zeros."""
    return VEC(), lambda context, builder, sig, args: ir.Constant(_VEC, [0.0] * LANES)


@intrinsic
def vload(typingctx, a, i):
    """a[i:i + LANES] of a float32 row."""
    if not _is_row(a, types.float32):
        return None

    def codegen(context, builder, sig, args):
        return _load(context, builder, sig.args[0], args[0], args[1], _F32)
    return VEC(a, i), codegen


@intrinsic
def vstore(typingctx, a, i, v):
    """a[i:i + LANES] = v for a float32 row."""
    if not _is_row(a, types.float32):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), _VEC.as_pointer())
        builder.store(args[2], ptr, align=1)
        return context.get_dummy_value()
    return types.none(a, i, v), codegen


@intrinsic
def vload_i8(typingctx, a, i):
    """a[i:i + LANES] of an int8 row, as float32."""
    if not _is_row(a, types.int8):
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(_load(context, builder, sig.args[0], args[0], args[1], ir.IntType(8)), _VEC)
    return VEC(a, i), codegen


def _nibble_codes(context, builder, sig, args, high: bool):
    """The low (or high) nibbles of the LANES bytes a[i:i + LANES] (args a, i) as an int32 vector."""
    v = builder.zext(_load(context, builder, sig.args[0], args[0], args[1], ir.IntType(8)), _I32VEC)
    if high:
        return builder.lshr(v, ir.Constant(_I32VEC, [4] * LANES))
    return builder.and_(v, ir.Constant(_I32VEC, [15] * LANES))


def _nibbles(high: bool):
    def codegen(context, builder, sig, args):
        return builder.sitofp(_nibble_codes(context, builder, sig, args, high), _VEC)
    return codegen


@intrinsic
def vload_lo(typingctx, a, i):
    """Low nibbles (0..15) of a[i:i + LANES] of a uint8 row, as float32."""
    if not _is_row(a, types.uint8):
        return None
    return VEC(a, i), _nibbles(False)


@intrinsic
def vload_hi(typingctx, a, i):
    """High nibbles (0..15) of a[i:i + LANES] of a uint8 row, as float32."""
    if not _is_row(a, types.uint8):
        return None
    return VEC(a, i), _nibbles(True)


def _e2m1(high: bool):
    """The E2M1 values of the low (or high) nibbles of 16 bytes: one AVX-512 permute of the 16-value table where
    the CPU has it (config.permvar), else one lookup per lane in a constant table."""
    from . import config

    fast = config.permvar()

    def codegen(context, builder, sig, args):
        v = _nibble_codes(context, builder, sig, args, high)
        table = ir.Constant(_VEC, [float(v) for v in E2M1])
        if fast:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC, [_VEC, _I32VEC]),
                                                "llvm.x86.avx512.permvar.sf.512")
            return builder.call(fn, [table, v])
        out = ir.Constant(_VEC, ir.Undefined)
        for lane in range(LANES):
            i32 = ir.Constant(ir.IntType(32), lane)
            out = builder.insert_element(out, builder.extract_element(table, builder.extract_element(v, i32)), i32)
        return out
    return codegen


@intrinsic
def vload_e2m1_lo(typingctx, a, i):
    """E2M1 values of the low nibbles of a[i:i + LANES] of a uint8 row (elements 0, 2, 4 ... of an MXFP4 block)."""
    if not _is_row(a, types.uint8):
        return None
    return VEC(a, i), _e2m1(False)


@intrinsic
def vload_e2m1_hi(typingctx, a, i):
    """E2M1 values of the high nibbles of a[i:i + LANES] of a uint8 row (elements 1, 3, 5 ...)."""
    if not _is_row(a, types.uint8):
        return None
    return VEC(a, i), _e2m1(True)


@intrinsic
def vadd(typingctx, a, b):
    """a + b lane by lane."""
    return VEC(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1], flags=_FAST)


@intrinsic
def vmul(typingctx, a, b):
    """a * b lane by lane."""
    return VEC(a, b), lambda context, builder, sig, args: builder.fmul(args[0], args[1], flags=_FAST)


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c lane by lane (fused where the CPU has FMA)."""
    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FAST), args[2], flags=_FAST)
    return VEC(a, b, c), codegen


@intrinsic
def vfmas(typingctx, a, s, c):
    """a * s + c with s a float32 scalar."""
    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], _splat(builder, args[1]), flags=_FAST), args[2], flags=_FAST)
    return VEC(a, types.float32, c), codegen


@intrinsic
def vmuls(typingctx, a, s):
    """a * s with s a float32 scalar."""
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _splat(builder, args[1]), flags=_FAST)
    return VEC(a, types.float32), codegen


@intrinsic
def vadds(typingctx, a, s):
    """a + s with s a float32 scalar."""
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], _splat(builder, args[1]), flags=_FAST)
    return VEC(a, types.float32), codegen


@intrinsic
def vsum(typingctx, a):
    """Sum of the lanes."""
    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_F32, [_F32, _VEC])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.fadd.v{LANES}f32")
        return builder.call(fn, [ir.Constant(_F32, -0.0), args[0]], fastmath=_FAST)
    return types.float32(a), codegen


def _quad(builder, v4):
    """The 4 lanes of v4 spread over LANES lanes, each 4 times."""
    return builder.shuffle_vector(v4, ir.Constant(v4.type, ir.Undefined),
                                  ir.Constant(_I32VEC, [c // 4 for c in range(LANES)]))


@intrinsic
def vscales4(typingctx, s, i):
    """The float16 values (as uint16 bits) s[i:i + 4] as float32, each over 4 lanes."""
    if not _is_row(s, types.uint16):
        return None

    def codegen(context, builder, sig, args):
        half = builder.bitcast(_load(context, builder, sig.args[0], args[0], args[1], ir.IntType(16), 4),
                               ir.VectorType(ir.HalfType(), 4))
        return _quad(builder, builder.fpext(half, ir.VectorType(_F32, 4)))
    return VEC(s, i), codegen


_I8X64 = ir.VectorType(ir.IntType(8), 64)


@intrinsic
def q4_dot(typingctx, q, i, xq, j, init, k):
    """Integer dot products of the 64 q4 bytes q[i:i + 64] (4 groups of 16 bytes) with int8 activations,
    as float32: xq[j:j + 64] meets the 64 low nibbles, xq[j + 64:j + 128] the 64 high ones, and the
    int32 lanes start from init[k:k + 16]. vpdpbusd (AVX-512 VNNI: u8 x s8, 4 bytes summed into each
    int32 lane) keeps group c in lanes 4c..4c+3."""
    if not (_is_row(q, types.uint8) and _is_row(xq, types.int8) and _is_row(init, types.int32)):
        return None

    def codegen(context, builder, sig, args):
        qty, _, xty, _, ity, _ = sig.args
        v = _load(context, builder, qty, args[0], args[1], ir.IntType(8), 64)
        mask = ir.Constant(_I8X64, [15] * 64)
        lo = builder.and_(v, mask)
        i16 = ir.VectorType(ir.IntType(16), 32)
        hi = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(v, i16), ir.Constant(i16, [4] * 32)),
                                          _I8X64), mask)
        x_lo = _load(context, builder, xty, args[2], args[3], ir.IntType(8), 64)
        x_hi = _load(context, builder, xty, args[2], builder.add(args[3], ir.Constant(args[3].type, 64)),
                     ir.IntType(8), 64)
        acc = _load(context, builder, ity, args[4], args[5], ir.IntType(32))
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32VEC, [_I32VEC] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        for w, x in ((lo, x_lo), (hi, x_hi)):
            acc = builder.call(fn, [acc, builder.bitcast(w, _I32VEC), builder.bitcast(x, _I32VEC)])
        return builder.sitofp(acc, _VEC)
    return VEC(q, i, xq, j, init, k), codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Hint that a[i] of a 1D array will be read soon; never faults, even out of bounds."""
    if not (isinstance(a, types.Array) and a.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        # read; locality 1: into L2/L3, not L1, which the block being read needs
        builder.call(fn, [builder.bitcast(builder.gep(data, [args[1]]), i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, 1), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(a, i), codegen


_OPTS = dict(fastmath=True, cache=True, nogil=True)


# ---------------------------------------------------------------- T = 1: one pass over the weights


@njit(**_OPTS)
def _nibble_offsets(x, group):
    """-8 * (x[k_lo] + x[k_hi]) for every q4 byte, k_lo and k_hi being the positions of its two values:
    added to the dot product of the raw nibbles (0..15), it gives that of the values (nibble - 8)."""
    half = group // 2
    xc = np.empty(x.shape[0] // 2, np.float32)
    for g in range(x.shape[0] // group):
        for j in range(half):
            xc[g * half + j] = np.float32(-8.0) * (x[g * group + j] + x[g * group + half + j])
    return xc


@njit(**_OPTS)
def _block_rows(o0, n_rows):
    """The ROWS row indices of the block starting at o0, clamped so that a last, partial block repeats
    its last row (computed again, written once)."""
    last = n_rows - 1
    return min(o0, last), min(o0 + 1, last), min(o0 + 2, last), min(o0 + 3, last)


@njit(parallel=True, **_OPTS)
def gemv_q8(x, qs, scales, lut, out):
    """out[0, o] = sum_k W[o, k] x[0, k] for a q8 matrix, streaming each weight once."""
    n_rows, kp = qs.shape
    per_group = kp // scales.shape[1] // 32  # 32-value chunks per group
    xr = x[0]
    flat_q = qs.reshape(qs.size)
    flat_s = scales.reshape(scales.size)
    n_blocks = (n_rows + ROWS - 1) // ROWS
    for b in prange(n_blocks):
        r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
        q0, q1, q2, q3 = qs[r0], qs[r1], qs[r2], qs[r3]
        s0, s1, s2, s3 = scales[r0], scales[r1], scales[r2], scales[r3]
        # the next block is prefetched at the pace this one is read, a block's time ahead of its use
        nxt = min(b * ROWS + ROWS, n_rows - 1)
        pq, ps = nxt * kp, nxt * scales.shape[1]
        a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
        g = 0
        in_group = 0
        for c in range(kp // 32):
            k = c * 32
            prefetch(flat_q, pq + 4 * k)
            prefetch(flat_q, pq + 4 * k + 64)
            if c % 8 == 0:
                prefetch(flat_s, ps + 4 * c)
            xa, xb = vload(xr, k), vload(xr, k + 16)
            a0 = vfmas(vfma(vload_i8(q0, k), xa, vmul(vload_i8(q0, k + 16), xb)), lut[s0[g]], a0)
            a1 = vfmas(vfma(vload_i8(q1, k), xa, vmul(vload_i8(q1, k + 16), xb)), lut[s1[g]], a1)
            a2 = vfmas(vfma(vload_i8(q2, k), xa, vmul(vload_i8(q2, k + 16), xb)), lut[s2[g]], a2)
            a3 = vfmas(vfma(vload_i8(q3, k), xa, vmul(vload_i8(q3, k + 16), xb)), lut[s3[g]], a3)
            in_group += 1
            if in_group == per_group:
                in_group = 0
                g += 1
        _store_block(out, 0, b * ROWS, n_rows, vsum(a0), vsum(a1), vsum(a2), vsum(a3))


@njit(parallel=True, **_OPTS)
def gemv_q4(x, qs, scales, lut, out):
    """out[0, o] = sum_k W[o, k] x[0, k] for a q4 matrix, streaming each weight once."""
    n_rows, n_bytes = qs.shape
    group = 2 * n_bytes // scales.shape[1]
    half = group // 2
    per_group = group // 32
    xr = x[0]
    xc = _nibble_offsets(xr, group)
    flat_q = qs.reshape(qs.size)
    flat_s = scales.reshape(scales.size)
    n_blocks = (n_rows + ROWS - 1) // ROWS
    for b in prange(n_blocks):
        r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
        q0, q1, q2, q3 = qs[r0], qs[r1], qs[r2], qs[r3]
        s0, s1, s2, s3 = scales[r0], scales[r1], scales[r2], scales[r3]
        nxt = min(b * ROWS + ROWS, n_rows - 1)
        pq, ps = nxt * n_bytes, nxt * scales.shape[1]
        a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
        g = 0
        in_group = 0
        for c in range(n_bytes // 16):
            i = c * 16  # 16 bytes: 16 values from the group's first half, 16 from its second half
            klo = g * group + in_group * 16
            khi = klo + half
            prefetch(flat_q, pq + 4 * i)
            if c % 8 == 0:
                prefetch(flat_s, ps + 4 * c)
            xa, xb, off = vload(xr, klo), vload(xr, khi), vload(xc, i)
            a0 = vfmas(vfma(vload_lo(q0, i), xa, vfma(vload_hi(q0, i), xb, off)), lut[s0[g]], a0)
            a1 = vfmas(vfma(vload_lo(q1, i), xa, vfma(vload_hi(q1, i), xb, off)), lut[s1[g]], a1)
            a2 = vfmas(vfma(vload_lo(q2, i), xa, vfma(vload_hi(q2, i), xb, off)), lut[s2[g]], a2)
            a3 = vfmas(vfma(vload_lo(q3, i), xa, vfma(vload_hi(q3, i), xb, off)), lut[s3[g]], a3)
            in_group += 1
            if in_group == per_group:
                in_group = 0
                g += 1
        _store_block(out, 0, b * ROWS, n_rows, vsum(a0), vsum(a1), vsum(a2), vsum(a3))


@njit(**_OPTS)
def _store_block(out, t, o0, n_rows, v0, v1, v2, v3):
    out[t, o0] = v0
    if o0 + 1 < n_rows:
        out[t, o0 + 1] = v1
    if o0 + 2 < n_rows:
        out[t, o0 + 2] = v2
    if o0 + 3 < n_rows:
        out[t, o0 + 3] = v3


# ---------------------------------------------------------------- T = 1, q4: integer dot products (AVX-512 VNNI)
#
# Only called where the CPU has AVX-512 VNNI (config.int_dot): elsewhere LLVM cannot compile q4_dot; and
# only for groups of 32, where a group is one 16-byte chunk of a row (its 4 scales load as one vector).
# x is quantized once per call to int8, one scale per group of 32; a group then contributes
# w_scale * x_scale * (sum(nibble * xq) - 8 * sum(xq)). reference.matmul_int8 computes the same.


# one rounding per operation, which fastmath (applied when compiled inside the fastmath GEMV) leaves alone:
# xq comes out bit for bit as in reference.quantize_activations
@njit(cache=True, nogil=True)
def _quantize_x_q4(xr, xq, xd, init):
    """The activations of q4_dot for xr: per 4 groups, xq holds their 64 values meeting low nibbles
    (values 0..15 of each group) then the 64 meeting high nibbles (16..31); xd holds each group's x scale
    (over its 4 lanes) and init -8 * sum(xq) of the group (in its first lane, 0 in the others), so that
    the dot products start from the nibble offset."""
    xq[:] = 0
    xd[:] = 0
    init[:] = 0
    for g in range(xr.shape[0] // 32):
        k = 32 * g
        m = np.float32(0.0)
        for i in range(32):
            m = max(m, abs(xr[k + i]))
        d = m * np.float32(1.0 / 127.0)
        base = g // 4 * 128 + g % 4 * 16
        total = 0
        if d > 0:
            inv = np.float32(1.0) / d  # one division per group, not per value
            for i in range(16):
                lo = np.int8(np.rint(xr[k + i] * inv))
                hi = np.int8(np.rint(xr[k + 16 + i] * inv))
                xq[base + i] = lo
                xq[base + 64 + i] = hi
                total += int(lo) + int(hi)
        lane = g // 4 * 16 + g % 4 * 4
        xd[lane:lane + 4] = d
        init[lane] = -8 * total


@njit(**_OPTS)
def _chunk_dot(q, c, xq, init):
    """q4_dot of group c alone: for the last groups of a row, which make no full 64 bytes."""
    base = c // 4 * 128 + c % 4 * 16
    s = init[c // 4 * 16 + c % 4 * 4]
    for i in range(16):
        byte = q[16 * c + i]
        s += (byte & 15) * xq[base + i] + (byte >> 4) * xq[base + 64 + i]
    return np.float32(s)


@njit(**_OPTS)
def _tail_dot(q, srow, lut, xq, xd, init, c0):
    """The contribution of groups c0.. of a q4 row (fewer than 4)."""
    t = np.float32(0.0)
    for c in range(c0, q.shape[0] // 16):
        t += lut[srow[c]] * xd[c // 4 * 16 + c % 4 * 4] * _chunk_dot(q, c, xq, init)
    return t


@njit(parallel=True, **_OPTS)
def gemv_q4_int8(x, qs, scales, lut, out):
    """gemv_q4 through int8 activations and integer dot products (see above); groups of 32 only."""
    n_rows, n_bytes = qs.shape
    n_full = n_bytes // 64
    tail = n_bytes % 64 > 0  # groups past the last whole 64 bytes
    n_quads = (n_bytes // 16 + 3) // 4
    xq = np.empty(n_quads * 128, np.int8)
    xd = np.empty(n_quads * 16, np.float32)
    init = np.empty(n_quads * 16, np.int32)
    _quantize_x_q4(x[0], xq, xd, init)
    flat_q = qs.reshape(qs.size)
    n_blocks = (n_rows + ROWS - 1) // ROWS
    for b in prange(n_blocks):
        r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
        q0, q1, q2, q3 = qs[r0], qs[r1], qs[r2], qs[r3]
        s0, s1, s2, s3 = scales[r0], scales[r1], scales[r2], scales[r3]
        pq = min(b * ROWS + ROWS, n_rows - 1) * n_bytes
        a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
        for c in range(n_full):
            i = c * 64
            # the next block's 4 rows are read at 4 times the pace of one row: 4 lines per 64 bytes
            prefetch(flat_q, pq + 4 * i)
            prefetch(flat_q, pq + 4 * i + 64)
            prefetch(flat_q, pq + 4 * i + 128)
            prefetch(flat_q, pq + 4 * i + 192)
            xs = vload(xd, 16 * c)
            a0 = vfma(q4_dot(q0, i, xq, 2 * i, init, 16 * c), vmul(vscales4(s0, 4 * c), xs), a0)
            a1 = vfma(q4_dot(q1, i, xq, 2 * i, init, 16 * c), vmul(vscales4(s1, 4 * c), xs), a1)
            a2 = vfma(q4_dot(q2, i, xq, 2 * i, init, 16 * c), vmul(vscales4(s2, 4 * c), xs), a2)
            a3 = vfma(q4_dot(q3, i, xq, 2 * i, init, 16 * c), vmul(vscales4(s3, 4 * c), xs), a3)
        v0, v1, v2, v3 = vsum(a0), vsum(a1), vsum(a2), vsum(a3)
        if tail:
            c0 = 4 * n_full
            v0 += _tail_dot(q0, s0, lut, xq, xd, init, c0)
            v1 += _tail_dot(q1, s1, lut, xq, xd, init, c0)
            v2 += _tail_dot(q2, s2, lut, xq, xd, init, c0)
            v3 += _tail_dot(q3, s3, lut, xq, xd, init, c0)
        _store_block(out, 0, b * ROWS, n_rows, v0, v1, v2, v3)


# ---------------------------------------------------------------- T > 1: convert each weight once for many tokens

SMALL_T = 16  # below this many tokens the GEMM streams weights like the GEMV, two tokens per pass
K_BLOCK = 1024  # columns per GEMM block: ROWS x K_BLOCK float32 weights (16 KiB) stay in L1


@njit(**_OPTS)
def _k_block(kp, group):
    """Columns per block of the GEMM: about K_BLOCK, whole groups, at most kp."""
    return min(kp, max(group, K_BLOCK // group * group))


@njit(**_OPTS)
def _dequant_row_q8(q, srow, lut, k0, kl, group, dst):
    """dst[:kl] = the float32 weights k0 .. k0 + kl of one q8 row (k0, kl whole groups)."""
    for c in range(kl // 32):
        k = k0 + c * 32
        s = lut[srow[k // group]]
        vstore(dst, c * 32, vmuls(vload_i8(q, k), s))
        vstore(dst, c * 32 + 16, vmuls(vload_i8(q, k + 16), s))


@njit(**_OPTS)
def _dequant_row_q4(q, srow, lut, k0, kl, group, dst):
    """dst[:kl] = the float32 weights k0 .. k0 + kl of one q4 row (k0, kl whole groups)."""
    half = group // 2
    minus8 = np.float32(-8.0)
    for g in range(k0 // group, (k0 + kl) // group):
        s = lut[srow[g]]
        for c in range(half // 16):
            i = g * half + c * 16
            d = g * group - k0 + c * 16
            vstore(dst, d, vmuls(vadds(vload_lo(q, i), minus8), s))
            vstore(dst, d + half, vmuls(vadds(vload_hi(q, i), minus8), s))


@njit(**_OPTS)
def _tiles(x, wf, k0, kl, out, o0, n_rows, first):
    """out[t, o0:o0 + ROWS] (+)= wf[:, :kl] . x[t, k0:k0 + kl] for every token, two tokens at a time
    (8 accumulators: 4 rows x 2 tokens). An odd last token is paired with itself and written once."""
    n_tok = out.shape[0]
    w0, w1, w2, w3 = wf[0], wf[1], wf[2], wf[3]
    for t0 in range(0, n_tok, 2):
        t1 = min(t0 + 1, n_tok - 1)
        xa, xb = x[t0], x[t1]
        a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
        b0, b1, b2, b3 = vzero(), vzero(), vzero(), vzero()
        for kk in range(0, kl, LANES):
            va, vb = vload(xa, k0 + kk), vload(xb, k0 + kk)
            u = vload(w0, kk)
            a0, b0 = vfma(u, va, a0), vfma(u, vb, b0)
            u = vload(w1, kk)
            a1, b1 = vfma(u, va, a1), vfma(u, vb, b1)
            u = vload(w2, kk)
            a2, b2 = vfma(u, va, a2), vfma(u, vb, b2)
            u = vload(w3, kk)
            a3, b3 = vfma(u, va, a3), vfma(u, vb, b3)
        _add_block(out, t0, o0, n_rows, first, vsum(a0), vsum(a1), vsum(a2), vsum(a3))
        if t1 != t0:
            _add_block(out, t1, o0, n_rows, first, vsum(b0), vsum(b1), vsum(b2), vsum(b3))


@njit(**_OPTS)
def _add_block(out, t, o0, n_rows, first, v0, v1, v2, v3):
    if first:
        _store_block(out, t, o0, n_rows, v0, v1, v2, v3)
        return
    out[t, o0] += v0
    if o0 + 1 < n_rows:
        out[t, o0 + 1] += v1
    if o0 + 2 < n_rows:
        out[t, o0 + 2] += v2
    if o0 + 3 < n_rows:
        out[t, o0 + 3] += v3


@njit(**_OPTS)
def _pair_q8(x, t0, t1, qs, scales, lut, xc, b, out):
    """out[t0] and out[t1] for row block b of a q8 matrix, weights converted in registers and shared by
    the two tokens (a GEMV on two tokens at once); xc is unused."""
    n_rows, kp = qs.shape
    per_group = kp // scales.shape[1] // 32
    r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
    q0, q1, q2, q3 = qs[r0], qs[r1], qs[r2], qs[r3]
    s0, s1, s2, s3 = scales[r0], scales[r1], scales[r2], scales[r3]
    xa, xb = x[t0], x[t1]
    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
    b0, b1, b2, b3 = vzero(), vzero(), vzero(), vzero()
    g = 0
    in_group = 0
    for c in range(kp // 32):
        k = c * 32
        xa0, xa1, xb0, xb1 = vload(xa, k), vload(xa, k + 16), vload(xb, k), vload(xb, k + 16)
        w, v, s = vload_i8(q0, k), vload_i8(q0, k + 16), lut[s0[g]]
        a0, b0 = vfmas(vfma(w, xa0, vmul(v, xa1)), s, a0), vfmas(vfma(w, xb0, vmul(v, xb1)), s, b0)
        w, v, s = vload_i8(q1, k), vload_i8(q1, k + 16), lut[s1[g]]
        a1, b1 = vfmas(vfma(w, xa0, vmul(v, xa1)), s, a1), vfmas(vfma(w, xb0, vmul(v, xb1)), s, b1)
        w, v, s = vload_i8(q2, k), vload_i8(q2, k + 16), lut[s2[g]]
        a2, b2 = vfmas(vfma(w, xa0, vmul(v, xa1)), s, a2), vfmas(vfma(w, xb0, vmul(v, xb1)), s, b2)
        w, v, s = vload_i8(q3, k), vload_i8(q3, k + 16), lut[s3[g]]
        a3, b3 = vfmas(vfma(w, xa0, vmul(v, xa1)), s, a3), vfmas(vfma(w, xb0, vmul(v, xb1)), s, b3)
        in_group += 1
        if in_group == per_group:
            in_group = 0
            g += 1
    _store_pair(out, t0, t1, b * ROWS, n_rows, a0, a1, a2, a3, b0, b1, b2, b3)


@njit(**_OPTS)
def _pair_q4(x, t0, t1, qs, scales, lut, xc, b, out):
    """out[t0] and out[t1] for row block b of a q4 matrix, weights converted in registers and shared by
    the two tokens (a GEMV on two tokens at once); xc holds each token's _nibble_offsets."""
    n_rows, n_bytes = qs.shape
    group = 2 * n_bytes // scales.shape[1]
    half = group // 2
    per_group = group // 32
    r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
    q0, q1, q2, q3 = qs[r0], qs[r1], qs[r2], qs[r3]
    s0, s1, s2, s3 = scales[r0], scales[r1], scales[r2], scales[r3]
    xa, xb, ca, cb = x[t0], x[t1], xc[t0], xc[t1]
    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
    b0, b1, b2, b3 = vzero(), vzero(), vzero(), vzero()
    g = 0
    in_group = 0
    for c in range(n_bytes // 16):
        i = c * 16
        klo = g * group + in_group * 16
        khi = klo + half
        xa0, xa1, oa = vload(xa, klo), vload(xa, khi), vload(ca, i)
        xb0, xb1, ob = vload(xb, klo), vload(xb, khi), vload(cb, i)
        w, v, s = vload_lo(q0, i), vload_hi(q0, i), lut[s0[g]]
        a0, b0 = vfmas(vfma(w, xa0, vfma(v, xa1, oa)), s, a0), vfmas(vfma(w, xb0, vfma(v, xb1, ob)), s, b0)
        w, v, s = vload_lo(q1, i), vload_hi(q1, i), lut[s1[g]]
        a1, b1 = vfmas(vfma(w, xa0, vfma(v, xa1, oa)), s, a1), vfmas(vfma(w, xb0, vfma(v, xb1, ob)), s, b1)
        w, v, s = vload_lo(q2, i), vload_hi(q2, i), lut[s2[g]]
        a2, b2 = vfmas(vfma(w, xa0, vfma(v, xa1, oa)), s, a2), vfmas(vfma(w, xb0, vfma(v, xb1, ob)), s, b2)
        w, v, s = vload_lo(q3, i), vload_hi(q3, i), lut[s3[g]]
        a3, b3 = vfmas(vfma(w, xa0, vfma(v, xa1, oa)), s, a3), vfmas(vfma(w, xb0, vfma(v, xb1, ob)), s, b3)
        in_group += 1
        if in_group == per_group:
            in_group = 0
            g += 1
    _store_pair(out, t0, t1, b * ROWS, n_rows, a0, a1, a2, a3, b0, b1, b2, b3)


@njit(**_OPTS)
def _store_pair(out, t0, t1, o0, n_rows, a0, a1, a2, a3, b0, b1, b2, b3):
    _store_block(out, t0, o0, n_rows, vsum(a0), vsum(a1), vsum(a2), vsum(a3))
    if t1 != t0:
        _store_block(out, t1, o0, n_rows, vsum(b0), vsum(b1), vsum(b2), vsum(b3))


def _pair(x, t0, t1, qs, scales, lut, xc, b, out):
    """Either _pair_q8 or _pair_q4, by the dtype of qs."""


@overload(_pair)
def _pair_impl(x, t0, t1, qs, scales, lut, xc, b, out):
    pair = _pair_q8 if qs.dtype == types.int8 else _pair_q4
    return lambda x, t0, t1, qs, scales, lut, xc, b, out: pair(x, t0, t1, qs, scales, lut, xc, b, out)


def _token_offsets(x, qs, group):
    """For q4, _nibble_offsets of every token [T, Kp / 2]; for q8 an empty placeholder."""


@overload(_token_offsets)
def _token_offsets_impl(x, qs, group):
    if qs.dtype == types.int8:
        return lambda x, qs, group: np.empty((0, 0), np.float32)

    def impl(x, qs, group):
        xc = np.empty((x.shape[0], x.shape[1] // 2), np.float32)
        for t in range(x.shape[0]):
            xc[t] = _nibble_offsets(x[t], group)
        return xc
    return impl


def _dequant_row(q, srow, lut, k0, kl, group, dst):
    """Either _dequant_row_q8 or _dequant_row_q4, by the dtype of q."""


@overload(_dequant_row)
def _dequant_row_impl(q, srow, lut, k0, kl, group, dst):
    dequant_row = _dequant_row_q8 if q.dtype == types.int8 else _dequant_row_q4
    return lambda q, srow, lut, k0, kl, group, dst: dequant_row(q, srow, lut, k0, kl, group, dst)


def _padded_k(qs):
    """Kp: the padded in_features of a q8, q4 or MXFP4 matrix."""


@overload(_padded_k)
def _padded_k_impl(qs):
    if qs.dtype == types.int8:
        return lambda qs: qs.shape[1]
    return lambda qs: 2 * qs.shape[1]


@njit(parallel=True, **_OPTS)
def gemm(x, qs, scales, lut, out, n_threads):
    """out[t, o] = sum_k W[o, k] x[t, k] for T > 1 tokens, q8 or q4 (by qs.dtype).

    Below SMALL_T tokens, row blocks are streamed as by the GEMV, each weight converted in registers once
    per pair of tokens (a block is read from RAM once, then from L2 for the next pairs). From SMALL_T on,
    each thread takes a contiguous range of row blocks; for each block of kc columns it dequantizes ROWS x
    kc weights once into a float32 scratch that stays in L1 and runs them against every token, 4 rows x 2
    tokens at a time (x's column block stays cached across the thread's row blocks)."""
    n_tok, n_rows = out.shape
    kp = _padded_k(qs)
    group = kp // scales.shape[1]
    n_blocks = (n_rows + ROWS - 1) // ROWS
    if n_tok < SMALL_T:
        xc = _token_offsets(x, qs, group)
        for b in prange(n_blocks):
            for t0 in range(0, n_tok, 2):
                _pair(x, t0, min(t0 + 1, n_tok - 1), qs, scales, lut, xc, b, out)
        return
    kc = _k_block(kp, group)
    n_workers = min(n_threads, n_blocks)
    for w in prange(n_workers):
        wf = np.empty((ROWS, kc), np.float32)
        for k0 in range(0, kp, kc):
            kl = min(kc, kp - k0)
            for b in range(w * n_blocks // n_workers, (w + 1) * n_blocks // n_workers):
                r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
                _dequant_row(qs[r0], scales[r0], lut, k0, kl, group, wf[0])
                _dequant_row(qs[r1], scales[r1], lut, k0, kl, group, wf[1])
                _dequant_row(qs[r2], scales[r2], lut, k0, kl, group, wf[2])
                _dequant_row(qs[r3], scales[r3], lut, k0, kl, group, wf[3])
                _tiles(x, wf, k0, kl, out, b * ROWS, n_rows, k0 == 0)


def _matmul(x, qs, scales, lut, out, n_threads):
    """out = x @ W.T with the kernel for qs.dtype and the number of tokens."""


@overload(_matmul)
def _matmul_impl(x, qs, scales, lut, out, n_threads):
    if scales.dtype == types.uint8:  # E8M0 scales: MXFP4
        return lambda x, qs, scales, lut, out, n_threads: _matmul_mxfp4(x, qs, scales, lut, out, n_threads)
    gemv = gemv_q8 if qs.dtype == types.int8 else gemv_q4

    def impl(x, qs, scales, lut, out, n_threads):
        if out.shape[0] == 1:
            gemv(x, qs, scales, lut, out)
        else:
            gemm(x, qs, scales, lut, out, n_threads)
    return impl


@njit(**_OPTS)
def matmul(x, qs, scales, lut, out, n_threads):
    """out[t, o] = sum_k W[o, k] x[t, k] for a q8, q4 or MXFP4 matrix: the GEMV kernel for one token, the GEMM
    kernel (on n_threads threads) for more."""
    _matmul(x, qs, scales, lut, out, n_threads)


# ---------------------------------------------------------------- one expert: down(act(gate(x)) * up(x))



@njit(**_OPTS)
def _gated(g, u, activation):
    """act(g) * u; for SWIGLU_OAI, g' sigmoid(alpha g') (u' + 1) with g' = min(g, limit), u' = u clamped to
    [-limit, limit]."""
    one, half = np.float32(1.0), np.float32(0.5)
    if activation == SILU:
        return g / (one + np.exp(-g)) * u
    if activation == GELU_TANH:
        c0, c1 = np.float32(0.7978845608028654), np.float32(0.044715)  # sqrt(2 / pi)
        return half * g * (one + np.tanh(c0 * (g + c1 * g * g * g))) * u
    if activation == GELU:
        return half * g * (one + np.float32(math.erf(g * np.float32(0.7071067811865476)))) * u  # 1 / sqrt(2)
    alpha, limit = np.float32(SWIGLU_ALPHA), np.float32(SWIGLU_LIMIT)
    g = min(g, limit)
    return g / (one + np.exp(-alpha * g)) * (min(max(u, -limit), limit) + one)


ACT_CHUNK = 512  # activations a thread computes per task


@njit(parallel=True, **_OPTS)
def _gated_activation(h, activation, bias, a):
    """a[t, i] = _gated(g, u) with g = h[t, i], u = h[t, inter + i] for i < inter = h.shape[1] // 2, each plus its
    bias first when bias (gate_up's, [2 inter]) is not empty. a's other columns stay. Tasks are runs of ACT_CHUNK
    values, so that no value pays a division to find its token."""
    n_tok = h.shape[0]
    inter = h.shape[1] // 2
    per_tok = (inter + ACT_CHUNK - 1) // ACT_CHUNK
    biased = bias.shape[0] > 0
    for j in prange(n_tok * per_tok):
        t, i0 = j // per_tok, j % per_tok * ACT_CHUNK
        i1 = min(inter, i0 + ACT_CHUNK)
        hg, hu, at = h[t, i0:i1], h[t, inter + i0:inter + i1], a[t, i0:i1]
        if biased:
            bg, bu = bias[i0:i1], bias[inter + i0:inter + i1]
            for i in range(i1 - i0):
                at[i] = _gated(hg[i] + bg[i], hu[i] + bu[i], activation)
        else:
            for i in range(i1 - i0):
                at[i] = _gated(hg[i], hu[i], activation)


@njit(**_OPTS)
def _add_bias(out, bias):
    """out[t] += bias for every token, when bias is not empty."""
    if bias.shape[0] > 0:
        for t in range(out.shape[0]):
            out[t] += bias


@njit(**_OPTS)
def expert_ffn(x, gate_up_qs, gate_up_scales, down_qs, down_scales, gate_up_bias, down_bias, activation, lut, out,
               n_threads):
    """out = down @ gated(gate @ x + b, up @ x + b) + b for the tokens of x, gate_up holding gate then up rows (q8,
    q4 or MXFP4); the biases (float32, empty for none) are gate_up's [2I] and down's [D]."""
    n_tok = x.shape[0]
    h = np.empty((n_tok, gate_up_qs.shape[0]), np.float32)
    _matmul(x, gate_up_qs, gate_up_scales, lut, h, n_threads)
    a = np.zeros((n_tok, _padded_k(down_qs)), np.float32)  # columns past inter: down's zero padding
    _gated_activation(h, activation, gate_up_bias, a)
    _matmul(a, down_qs, down_scales, lut, out, n_threads)
    _add_bias(out, down_bias)


@njit(**_OPTS)
def expert_ffn_int8(x, gate_up_qs, gate_up_scales, down_qs, down_scales, gate_up_bias, down_bias, activation, lut,
                    out):
    """expert_ffn for one token on q4 weights, both matrices through gemv_q4_int8."""
    h = np.empty((1, gate_up_qs.shape[0]), np.float32)
    gemv_q4_int8(x, gate_up_qs, gate_up_scales, lut, h)
    a = np.zeros((1, 2 * down_qs.shape[1]), np.float32)  # columns past inter: down's zero padding
    _gated_activation(h, activation, gate_up_bias, a)
    gemv_q4_int8(a, down_qs, down_scales, lut, out)
    _add_bias(out, down_bias)


# ---------------------------------------------------------------- one token's routed experts in one call
#
# The experts of a layer come as tuples of their arrays (one tuple per section, biases empty for none); each expert's
# products still split their rows among the threads: threads streaming different experts at once measured 15-20%
# slower than threads sharing one matrix. What one call saves is a Python call, its checks and a torch sum per expert.

@njit(**_OPTS)
def routed_experts_int8(x, gate_up_qs, gate_up_scales, down_qs, down_scales, gate_up_bias, down_bias, weights,
                        activation, lut, out):
    """out[0] += sum_k weights[k] expert_k(x) for one token on q4 experts in groups of 32 (expert_ffn_int8)."""
    y = np.empty_like(out)
    for k in range(len(gate_up_qs)):
        expert_ffn_int8(x, gate_up_qs[k], gate_up_scales[k], down_qs[k], down_scales[k], gate_up_bias[k],
                        down_bias[k], activation, lut, y)
        out[0] += weights[k] * y[0]


@njit(**_OPTS)
def routed_experts(x, gate_up_qs, gate_up_scales, down_qs, down_scales, gate_up_bias, down_bias, weights,
                   activation, lut, out, n_threads):
    """out[0] += sum_k weights[k] expert_k(x) for one token on q8, q4 or MXFP4 experts (expert_ffn)."""
    y = np.empty_like(out)
    for k in range(len(gate_up_qs)):
        expert_ffn(x, gate_up_qs[k], gate_up_scales[k], down_qs[k], down_scales[k], gate_up_bias[k], down_bias[k],
                   activation, lut, y, n_threads)
        out[0] += weights[k] * y[0]


# ---------------------------------------------------------------- MXFP4 (gpt-oss's expert format)
#
# A row is blocks of 16 bytes, one per group of 32 values, byte j holding value 2j in its low nibble and value
# 2j + 1 in its high one, E2M1-coded; each group has an E8M0 scale byte (lut: E8M0_TO_F32). The kernels take the
# input split per group into its even and odd values (_split_groups), so that both nibble vectors meet contiguous
# activations.

@njit(**_OPTS)
def _split_groups(x):
    """x [T, K] with each group of 32 reordered: its 16 even-indexed values, then its 16 odd-indexed ones."""
    out = np.empty_like(x)
    for t in range(x.shape[0]):
        for g in range(x.shape[1] // 32):
            for j in range(16):
                out[t, g * 32 + j] = x[t, g * 32 + 2 * j]
                out[t, g * 32 + 16 + j] = x[t, g * 32 + 2 * j + 1]
    return out


@njit(parallel=True, **_OPTS)
def gemv_mxfp4(xs, qs, scales, lut, out):
    """out[0, o] = sum_k W[o, k] x[0, k] for an MXFP4 matrix and xs = _split_groups(x), streaming each weight
    once, 4 rows a block, the next block prefetched."""
    n_rows, n_bytes = qs.shape
    xr = xs[0]
    flat_q = qs.reshape(qs.size)
    n_blocks = (n_rows + ROWS - 1) // ROWS
    for b in prange(n_blocks):
        r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
        q0, q1, q2, q3 = qs[r0], qs[r1], qs[r2], qs[r3]
        s0, s1, s2, s3 = scales[r0], scales[r1], scales[r2], scales[r3]
        pq = min(b * ROWS + ROWS, n_rows - 1) * n_bytes
        a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
        for c in range(n_bytes // 16):
            i = c * 16
            prefetch(flat_q, pq + 4 * i)
            xa, xb = vload(xr, 2 * i), vload(xr, 2 * i + 16)
            a0 = vfmas(vfma(vload_e2m1_lo(q0, i), xa, vmul(vload_e2m1_hi(q0, i), xb)), lut[s0[c]], a0)
            a1 = vfmas(vfma(vload_e2m1_lo(q1, i), xa, vmul(vload_e2m1_hi(q1, i), xb)), lut[s1[c]], a1)
            a2 = vfmas(vfma(vload_e2m1_lo(q2, i), xa, vmul(vload_e2m1_hi(q2, i), xb)), lut[s2[c]], a2)
            a3 = vfmas(vfma(vload_e2m1_lo(q3, i), xa, vmul(vload_e2m1_hi(q3, i), xb)), lut[s3[c]], a3)
        _store_block(out, 0, b * ROWS, n_rows, vsum(a0), vsum(a1), vsum(a2), vsum(a3))


@njit(**_OPTS)
def _dequant_row_mxfp4(q, srow, lut, k0, kl, dst):
    """dst[:kl] = the weights k0 .. k0 + kl of one MXFP4 row (whole groups), each group's even values, then its odd
    ones (the order of _split_groups)."""
    for g in range(k0 // 32, (k0 + kl) // 32):
        s, i, d = lut[srow[g]], g * 16, g * 32 - k0
        vstore(dst, d, vmuls(vload_e2m1_lo(q, i), s))
        vstore(dst, d + 16, vmuls(vload_e2m1_hi(q, i), s))


@njit(parallel=True, **_OPTS)
def gemm_mxfp4(xs, qs, scales, lut, out, n_threads):
    """out = x @ W.T for T > 1 tokens of xs = _split_groups(x) and an MXFP4 matrix: like gemm, each thread
    dequantizes ROWS x kc weights of its row blocks at a time into an L1 scratch and runs them against every
    token."""
    n_tok, n_rows = out.shape
    kp = 2 * qs.shape[1]
    kc = _k_block(kp, 32)
    n_blocks = (n_rows + ROWS - 1) // ROWS
    n_workers = min(n_threads, n_blocks)
    for w in prange(n_workers):
        wf = np.empty((ROWS, kc), np.float32)
        for k0 in range(0, kp, kc):
            kl = min(kc, kp - k0)
            for b in range(w * n_blocks // n_workers, (w + 1) * n_blocks // n_workers):
                r0, r1, r2, r3 = _block_rows(b * ROWS, n_rows)
                _dequant_row_mxfp4(qs[r0], scales[r0], lut, k0, kl, wf[0])
                _dequant_row_mxfp4(qs[r1], scales[r1], lut, k0, kl, wf[1])
                _dequant_row_mxfp4(qs[r2], scales[r2], lut, k0, kl, wf[2])
                _dequant_row_mxfp4(qs[r3], scales[r3], lut, k0, kl, wf[3])
                _tiles(xs, wf, k0, kl, out, b * ROWS, n_rows, k0 == 0)


@njit(**_OPTS)
def _matmul_mxfp4(x, qs, scales, lut, out, n_threads):
    xs = _split_groups(x)
    if out.shape[0] == 1:
        gemv_mxfp4(xs, qs, scales, lut, out)
    else:
        gemm_mxfp4(xs, qs, scales, lut, out, n_threads)


# ---------------------------------------------------------------- quantization (byte-identical to quant.py)

_EXACT = dict(cache=True, nogil=True)  # no fastmath: division and rounding must match NumPy bit for bit


def _value(w, o, k, lut):
    """w[o, k] as float32; w is float32, or uint16 holding float16 bits."""


@overload(_value)
def _value_impl(w, o, k, lut):
    if w.dtype == types.uint16:
        return lambda w, o, k, lut: lut[w[o, k]]
    return lambda w, o, k, lut: w[o, k]


@njit(parallel=True, **_EXACT)
def group_scales(w, lut, group, q4, out):
    """out[o, g] = the float32 scale of each group before float16 rounding: max|w| / 127 (q8), or the
    first value of largest magnitude / -8 (q4)."""
    n_rows, k = w.shape
    for o in prange(n_rows):
        for g in range(out.shape[1]):
            start = g * group
            m = _value(w, o, start, lut)
            best = abs(m)
            for j in range(start + 1, min(start + group, k)):
                v = _value(w, o, j, lut)
                if abs(v) > best:
                    best = abs(v)
                    m = v
            out[o, g] = m / np.float32(-8.0) if q4 else best / np.float32(127.0)


@njit(**_EXACT)
def _level(w, o, k, lut, s, lo, hi):
    """round(w[o, k] / s) clipped to [lo, hi]; 0 past the matrix or for a zero scale."""
    if k >= w.shape[1] or s == 0:
        return np.float32(0.0)
    return min(max(np.rint(_value(w, o, k, lut) / s), np.float32(lo)), np.float32(hi))


@njit(parallel=True, **_EXACT)
def quantize_q8(w, scales, lut, qs):
    """qs = the q8 values of w, given the float16 scales (as uint16)."""
    group = qs.shape[1] // scales.shape[1]
    for o in prange(qs.shape[0]):
        for g in range(scales.shape[1]):
            s = lut[scales[o, g]]
            for j in range(g * group, (g + 1) * group):
                qs[o, j] = np.int8(_level(w, o, j, lut, s, -127, 127))


@njit(parallel=True, **_EXACT)
def quantize_q4(w, scales, lut, qs):
    """qs = the packed q4 nibbles of w, given the float16 scales (as uint16)."""
    half = qs.shape[1] // scales.shape[1]
    group = 2 * half
    eight = np.float32(8.0)
    for o in prange(qs.shape[0]):
        for g in range(scales.shape[1]):
            s = lut[scales[o, g]]
            for j in range(half):
                lo = np.uint8(_level(w, o, g * group + j, lut, s, -8, 7) + eight)
                hi = np.uint8(_level(w, o, g * group + half + j, lut, s, -8, 7) + eight)
                qs[o, g * half + j] = lo | (hi << 4)


@njit(parallel=True, **_EXACT)
def quantize_mxfp4(w, lut, midpoints, qs, scales):
    """qs and scales (E8M0 bytes) of w in MXFP4, byte for byte quant.quantize's: per group of 32 (zeros past w's
    columns), e = ceil(log2(max|w| / 6)) from the quotient's exponent and mantissa, each value's code the number
    of midpoints below its magnitude over 2 ** e, the sign bit for negative values."""
    n_cols = w.shape[1]
    for o in prange(qs.shape[0]):
        for g in range(scales.shape[1]):
            amax = np.float32(0.0)
            for j in range(32):
                k = g * 32 + j
                if k < n_cols:
                    amax = max(amax, abs(_value(w, o, k, lut)))
            e = -127
            if amax > 0:
                mantissa, exponent = math.frexp(amax / np.float32(6.0))
                e = max(-127, min(127, exponent if mantissa > 0.5 else exponent - 1))
            scale = np.float32(math.ldexp(1.0, e))
            scales[o, g] = np.uint8(e + 127)
            for j in range(0, 32, 2):
                pair = 0
                for half in range(2):
                    k = g * 32 + j + half
                    v = _value(w, o, k, lut) if k < n_cols else np.float32(0.0)
                    mag = abs(v) / scale
                    code = 0
                    if mag != 0:
                        for m in midpoints:
                            code += mag > m
                        if v < 0:
                            code |= 8
                    pair |= code << (4 * half)
                qs[o, g * 16 + j // 2] = np.uint8(pair)


@njit(parallel=True, **_EXACT)
def low_codes(w, candidates, lut, qmin, qmax, codes, choice):
    """The codes (level - qmin, uint8 [O, Kp]) of w float32 [O, K] on the grid of each group's best candidate
    scale: candidates float16 bits [C, O, groups]; the best has the least sum of squared errors (float32
    differences summed in float64; the first of equal ones), its index goes to choice [O, groups]."""
    n_cand, group = candidates.shape[0], codes.shape[1] // candidates.shape[2]
    for o in prange(codes.shape[0]):
        for g in range(candidates.shape[2]):
            best, best_err = 0, np.inf
            for c in range(n_cand):
                s = lut[candidates[c, o, g]]
                err = 0.0
                for j in range(g * group, (g + 1) * group):
                    q = _level(w, o, j, lut, s, qmin, qmax)
                    v = _value(w, o, j, lut) if j < w.shape[1] else np.float32(0.0)
                    d = np.float64(q * s - v)
                    err += d * d
                if err < best_err:
                    best, best_err = c, err
            s = lut[candidates[best, o, g]]
            for j in range(g * group, (g + 1) * group):
                codes[o, j] = np.uint8(_level(w, o, j, lut, s, qmin, qmax) - np.float32(qmin))
            choice[o, g] = best


@njit(parallel=True, **_EXACT)
def dequantize_q4(qs, scales, lut, out):
    """out float32 [O, Kp] = the values of the packed q4 matrix (qs, scales as float16 bits)."""
    half = qs.shape[1] // scales.shape[1]
    for o in prange(qs.shape[0]):
        for g in range(scales.shape[1]):
            s = lut[scales[o, g]]
            for j in range(half):
                b = qs[o, g * half + j]
                out[o, 2 * g * half + j] = np.float32(np.int32(b & 15) - 8) * s
                out[o, 2 * g * half + half + j] = np.float32(np.int32(b >> 4) - 8) * s

# ---------------------------------------------------------------- memory bandwidth probe


@njit(parallel=True, **_OPTS)
def read_sum(a, chunks):
    """Sum of a float32 array read in `chunks` parallel pieces (a memory bandwidth probe)."""
    n = a.size // chunks
    parts = np.zeros(chunks, np.float32)
    for c in prange(chunks):
        piece = a[c * n:(c + 1) * n]
        s = np.float32(0.0)
        for i in range(piece.size):
            s += piece[i]
        parts[c] = s
    return parts.sum()


def use_threads(n: int) -> int:
    """Run the parallel kernels of the calling thread on n threads (numba's setting is per thread); n."""
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n


def max_threads() -> int:
    """The size of numba's thread pool (NUMBA_NUM_THREADS, by default the number of CPUs)."""
    return numba.config.NUMBA_NUM_THREADS


# ---------------------------------------------------------------- attention of one new token (decode steps)

@njit(**_OPTS)
def _rotated(x, cos, sin, dst):
    """dst = x with its first 2 len(cos) values rotated as two halves (NeoX order); the others copied."""
    half = cos.shape[0]
    for i in range(half):
        a, b = x[i], x[half + i]
        dst[i] = a * cos[i] - b * sin[i]
        dst[half + i] = b * cos[i] + a * sin[i]
    for i in range(2 * half, x.shape[0]):
        dst[i] = x[i]


@njit(**_OPTS)
def _dot(a, b):
    """sum a[i] b[i] over the length of a, in four chains of vector FMAs (one would wait on each FMA's latency)."""
    n = a.shape[0]
    quad = n - n % (4 * LANES)
    a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
    for i in range(0, quad, 4 * LANES):
        a0 = vfma(vload(a, i), vload(b, i), a0)
        a1 = vfma(vload(a, i + LANES), vload(b, i + LANES), a1)
        a2 = vfma(vload(a, i + 2 * LANES), vload(b, i + 2 * LANES), a2)
        a3 = vfma(vload(a, i + 3 * LANES), vload(b, i + 3 * LANES), a3)
    full = n - n % LANES
    for i in range(quad, full, LANES):
        a0 = vfma(vload(a, i), vload(b, i), a0)
    d = vsum(vadd(vadd(a0, a1), vadd(a2, a3)))
    for i in range(full, n):
        d += a[i] * b[i]
    return d


@njit(**_OPTS)
def _axpy(w, x, y):
    """y += w x over the length of y."""
    n = y.shape[0]
    full = n - n % LANES
    for i in range(0, full, LANES):
        vstore(y, i, vfmas(vload(x, i), w, vload(y, i)))
    for i in range(full, n):
        y[i] += w * x[i]


AHEAD = 4  # cached positions prefetched ahead of the one being read


@njit(**_OPTS)
def _prefetch_row(a, i, n):
    """Prefetch a[i:i + n] of a 1D float32 array, a cache line (16 values) at a time."""
    for c in range(i, i + n, 16):
        prefetch(a, c)


@njit(parallel=True, **_OPTS)
def attend_one(q, k, v, cos, sin, k_cache, v_cache, pos, lo, scale, cap, temperature, sinks, out):
    """One query token at position pos: rotates k and stores k and v at pos of the caches [KV, C, Dh], then each of
    the H heads of q [H, Dh] (rotated) attends to the cached keys lo..pos of its KV head: logits scale q.k, soft-capped
    (cap > 0), times temperature, softmax together with the head's sink logit when sinks is not empty; out [H, Dh].
    A thread takes a KV head and its query heads together, reading each key and value once."""
    n_heads, dh = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    n = pos + 1 - lo
    for j in prange(n_kv):
        _rotated(k[j], cos, sin, k_cache[j, pos])
        v_cache[j, pos, :] = v[j]
        qg = np.empty((group, dh), np.float32)
        for g in range(group):
            _rotated(q[j * group + g], cos, sin, qg[g])
        p = np.empty((group, n), np.float32)
        keys, values = k_cache[j].reshape(k_cache[j].size), v_cache[j].reshape(v_cache[j].size)
        for s in range(n):
            row = k_cache[j, lo + s]
            _prefetch_row(keys, (lo + s + AHEAD) * dh, dh)  # the cache is usually out of L2: experts streamed since
            for g in range(group):
                p[g, s] = _dot(qg[g], row) * scale
        for g in range(group):
            h = j * group + g
            pg = p[g]
            if cap > 0:
                for s in range(n):
                    pg[s] = cap * np.tanh(pg[s] / cap)
            top = sinks[h] if sinks.shape[0] > 0 else -np.inf
            for s in range(n):
                pg[s] *= temperature
                top = max(top, pg[s])
            total = np.exp(sinks[h] - top) if sinks.shape[0] > 0 else np.float32(0.0)
            for s in range(n):
                pg[s] = np.exp(pg[s] - top)
                total += pg[s]
            inv = np.float32(1.0) / total
            for s in range(n):
                pg[s] *= inv
            out[h, :] = 0
        for s in range(n):
            row = v_cache[j, lo + s]
            _prefetch_row(values, (lo + s + AHEAD) * dh, dh)
            for g in range(group):
                _axpy(p[g, s], row, out[j * group + g])


# ---------------------------------------------------------------- RMSNorm of one token

@njit(**_OPTS)
def rms_norm(x, weight, eps, out):
    """out = weight * x / sqrt(mean(x^2) + eps) for x, weight, out float32 [D]."""
    n = x.shape[0]
    s = np.float32(0.0)
    for i in range(n):
        s += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(s / np.float32(n) + eps)
    for i in range(n):
        out[i] = weight[i] * (x[i] * r)


# ---------------------------------------------------------------- every layer of one decoded token in one call
#
# For decoders made of the plain parts (RMSNorm, grouped-query attention without biases or q/k norms, a softmax
# top-k router, routed experts without biases; see runtime/fused.py), a decoded token runs through all its layers
# in one call of decode_layers, which calls the kernels above in the order the parts do: the Python, torch and
# dispatch work between them (about 0.1 ms a layer) is gone. Per-layer weights come as typed lists; the experts as
# one list over layers and experts (layer l, expert e at l * E + e), an empty array standing for one not mapped
# yet, which makes the call return early so that the caller maps it and calls again from there.

@njit(cache=True)
def list_of(item, n):
    """A typed list of n references to item (typed lists made and changed here, in compiled code that is cached,
    not by numba.typed.List's methods from Python, which compile on first use in every process)."""
    out = List()
    for _ in range(n):
        out.append(item)
    return out


@njit(cache=True)
def list_set(items, i, item):
    items[i] = item


def _gemv_one(x, qs, scales, lut, out, int8):
    """out = x @ W.T for one token x [1, K], with the kernel the one-token path of matmul takes."""


@overload(_gemv_one)
def _gemv_one_impl(x, qs, scales, lut, out, int8):
    if qs.dtype == types.int8:
        return lambda x, qs, scales, lut, out, int8: gemv_q8(x, qs, scales, lut, out)

    def impl(x, qs, scales, lut, out, int8):
        if int8:
            gemv_q4_int8(x, qs, scales, lut, out)
        else:
            gemv_q4(x, qs, scales, lut, out)
    return impl


def _expert_one(x, gu, gus, d, ds, bias, activation, lut, out, n_threads, int8):
    """One expert on one token (no biases), with the kernel routed_experts would take."""


@overload(_expert_one)
def _expert_one_impl(x, gu, gus, d, ds, bias, activation, lut, out, n_threads, int8):
    if gu.dtype == types.int8:
        return lambda x, gu, gus, d, ds, bias, activation, lut, out, n_threads, int8: expert_ffn(
            x, gu, gus, d, ds, bias, bias, activation, lut, out, n_threads)

    def impl(x, gu, gus, d, ds, bias, activation, lut, out, n_threads, int8):
        if int8:
            expert_ffn_int8(x, gu, gus, d, ds, bias, bias, activation, lut, out)
        else:
            expert_ffn(x, gu, gus, d, ds, bias, bias, activation, lut, out, n_threads)
    return impl


@njit(**_OPTS)
def _route(logits, cap, top_k, renormalize, idx, weights):
    """Softmax top-k of one token's router logits [E] (soft-capped when cap > 0), turned into the probabilities in
    place: idx and weights [K], heaviest first (ties: the lower expert), the weights renormalised to sum to 1 when
    asked."""
    n = logits.shape[0]
    if cap > 0:
        for e in range(n):
            logits[e] = cap * np.tanh(logits[e] / cap)
    top = logits.max()
    total = np.float32(0.0)
    for e in range(n):
        logits[e] = np.exp(logits[e] - top)
        total += logits[e]
    for e in range(n):
        logits[e] /= total
    picked = np.zeros(n, np.bool_)
    for k in range(top_k):
        best = -1
        for e in range(n):
            if not picked[e] and (best < 0 or logits[e] > logits[best]):
                best = e
        picked[best] = True
        idx[k] = best
        weights[k] = logits[best]
    if renormalize:
        s = np.float32(0.0)
        for k in range(top_k):
            s += weights[k]
        for k in range(top_k):
            weights[k] /= s


@njit(**_OPTS)
def route_one(x, router, cap, top_k, renormalize, probs, idx, weights):
    """The softmax top-k routing of one token x [D] by router [E, D] (float32): probs [E], idx and weights [K]."""
    for e in range(router.shape[0]):
        probs[e] = _dot(router[e], x)
    _route(probs, cap, top_k, renormalize, idx, weights)


@njit(**_OPTS)
def route_ahead(x, routers, scales, cap, top_k, renormalize, probs, idx, weights):
    """route_one of x [D] scaled by scales[j] [D] (one float32 product each) by routers[j], for each of the n
    routers: probs [n, E], idx and weights [n, K]."""
    xs = np.empty(x.shape[0], np.float32)
    for j in range(len(routers)):
        for i in range(x.shape[0]):
            xs[i] = x[i] * scales[j, i]
        route_one(xs, routers[j], cap, top_k, renormalize, probs[j], idx[j], weights[j])


@njit(**_OPTS)
def decode_layers(h, norms, eps, qkv_qs, qkv_scales, o_qs, o_scales, dense_int8, heads, kv_heads, k_caches,
                  v_caches, pos, windows, scale, cap, temperature, sinks, cos, sin, routers, router_cap, top_k,
                  renormalize, gu_qs, gu_scales, d_qs, d_scales, expert_int8, activation, lut, n_threads, first,
                  resume_moe, idx, weights, stop_moe, x):
    """Layers first.. of one decoded token, h [1, D] updated in place: h += o(attention(norm_a(h))), then
    h += sum_k w_k expert_k(norm_f(h)) with the router's choice, stored in idx and weights [L, K]. norms [2L, D] are
    each layer's attention and FFN norm weights; qkv_qs[l] holds q, k and v rows stacked, or qkv_qs[3l..3l+2] each
    of them (3L matrices); windows[l] 0 for none; sinks[l] empty for none; x [1, D] is scratch for the FFN input.
    Returns -1 when done, or the layer whose chosen
    experts are not all mapped (its routing stored): call again with first = that layer and resume_moe once they
    are, which routes it again (the same). With stop_moe, every layer returns once its FFN input is in x, before
    routing: the caller either adds the layer's FFN output to h and calls again with first = the next layer, or
    chooses the experts itself (idx[layer]: their places in the expert lists, -1 for none; weights[layer]) and calls
    again with first = that layer and resume_moe, which computes them and goes on."""
    n_layers = len(o_qs)
    per_layer = len(qkv_qs) // n_layers  # q, k and v stacked in one matrix, or one each
    dim = h.shape[1]
    dh = k_caches[0].shape[2]
    nq, nkv = heads * dh, kv_heads * dh
    n_experts = routers[0].shape[0]
    y = np.empty((1, dim), np.float32)
    ye = np.empty((1, dim), np.float32)
    att = np.empty((heads, dh), np.float32)
    logits = np.empty(n_experts, np.float32)
    no_bias = np.empty(0, np.float32)
    for layer in range(first, n_layers):
        if not (layer == first and resume_moe):
            rms_norm(h[0], norms[2 * layer], eps, x[0])
            qkv = np.empty((1, nq + 2 * nkv), np.float32)
            if per_layer == 1:
                _gemv_one(x, qkv_qs[layer], qkv_scales[layer], lut, qkv, dense_int8)
            else:
                start = 0
                for j in range(3):
                    m = 3 * layer + j
                    part = np.empty((1, qkv_qs[m].shape[0]), np.float32)
                    _gemv_one(x, qkv_qs[m], qkv_scales[m], lut, part, dense_int8)
                    qkv[0, start:start + part.shape[1]] = part[0]
                    start += part.shape[1]
            q = qkv[0, :nq].copy().reshape((heads, dh))
            k = qkv[0, nq:nq + nkv].copy().reshape((kv_heads, dh))
            v = qkv[0, nq + nkv:].copy().reshape((kv_heads, dh))
            window = windows[layer]
            lo = 0 if window == 0 else max(0, pos - window + 1)
            attend_one(q, k, v, cos, sin, k_caches[layer], v_caches[layer], pos, lo, scale, cap, temperature,
                       sinks[layer], att)
            _gemv_one(att.reshape((1, nq)), o_qs[layer], o_scales[layer], lut, y, dense_int8)
            for i in range(dim):
                h[0, i] += y[0, i]
        rms_norm(h[0], norms[2 * layer + 1], eps, x[0])
        if stop_moe:
            if not (layer == first and resume_moe):
                return layer
            base = 0  # the caller's choice: idx[layer] holds places in the lists, -1 for none
        else:
            route_one(x[0], routers[layer], router_cap, top_k, renormalize, logits, idx[layer], weights[layer])
            base = layer * n_experts
            for j in range(top_k):
                if gu_qs[base + idx[layer, j]].shape[0] == 0:
                    return layer
        y[0, :] = 0
        for j in range(top_k):
            if idx[layer, j] < 0:
                continue
            e = base + idx[layer, j]
            _expert_one(x, gu_qs[e], gu_scales[e], d_qs[e], d_scales[e], no_bias, activation, lut, ye, n_threads,
                        expert_int8)
            y[0] += weights[layer, j] * ye[0]
        for i in range(dim):
            h[0, i] += y[0, i]
    return -1


# ---------------------------------------------------------------- a low-bit copy's bits into q4 bytes
#
# The same word operations as store/lowbit.to_q4, in one pass over the copy instead of NumPy's temporaries (run by
# a reader thread, which these leave the GIL to). Arrays are flat views of the sections, in words.

@njit(**_OPTS)
def low_q2_to_q4(words, out, per_group):
    """q2: a group's per_group 64-bit words w make q4 words (w & 0x33..) << 2, then w & 0xCC.."""
    low_bits, high_bits = np.uint64(0x3333333333333333), np.uint64(0xCCCCCCCCCCCCCCCC)
    two = np.uint64(2)
    for g in range(words.shape[0] // per_group):
        src, dst = g * per_group, 2 * g * per_group
        for j in range(per_group):
            w = words[src + j]
            out[dst + j] = (w & low_bits) << two
            out[dst + per_group + j] = w & high_bits


@njit(**_OPTS)
def low_q3_to_q4(words, plane, out, per_block):
    """q3: a group's two blocks of per_block 32-bit words w0, w1 and its plane word p make the q4 blocks
    (w0 & 0x33..) << 1, (w1 & 0x33..) << 1, (w0 & 0xCC..) >> 1, (w1 & 0xCC..) >> 1, block b or-ed with
    ((p >> b) & 0x11..) << 3."""
    low_bits, high_bits, ones = np.uint32(0x33333333), np.uint32(0xCCCCCCCC), np.uint32(0x11111111)
    one, three = np.uint32(1), np.uint32(3)
    for g in range(plane.shape[0] // per_block):
        src, dst, hi = 2 * g * per_block, 4 * g * per_block, g * per_block
        for j in range(per_block):
            w0, w1, p = words[src + j], words[src + per_block + j], plane[hi + j]
            out[dst + j] = ((w0 & low_bits) << one) | ((p & ones) << three)
            out[dst + per_block + j] = ((w1 & low_bits) << one) | (((p >> one) & ones) << three)
            out[dst + 2 * per_block + j] = ((w0 & high_bits) >> one) | (((p >> np.uint32(2)) & ones) << three)
            out[dst + 3 * per_block + j] = ((w1 & high_bits) >> one) | (((p >> three) & ones) << three)


@njit(**_OPTS)
def low_q2_to_q4_g32(words, out):
    """low_q2_to_q4 for groups of 32 (one 64-bit word a group), as one flat loop the compiler vectorizes."""
    low_bits, high_bits = np.uint64(0x3333333333333333), np.uint64(0xCCCCCCCCCCCCCCCC)
    two = np.uint64(2)
    for g in range(words.shape[0]):
        w = words[g]
        out[2 * g] = (w & low_bits) << two
        out[2 * g + 1] = w & high_bits


@njit(**_OPTS)
def low_q3_to_q4_g32(words, plane, out):
    """low_q3_to_q4 for groups of 32, two q4 blocks to a 64-bit word: a group's 2-bit words w0, w1 are one word
    w = w0 | w1 << 32, its plane word p becomes p | p << 31 (p in the low half, p >> 1 in the high one, the bit p
    puts at 31 masked off), and the low-half and high-half results of low_q3_to_q4 come out of the same 64-bit
    operations (no shift moves a masked bit across the halves)."""
    low_bits, high_bits = np.uint64(0x3333333333333333), np.uint64(0xCCCCCCCCCCCCCCCC)
    ones = np.uint64(0x1111111111111111)
    one, two, three, spread = np.uint64(1), np.uint64(2), np.uint64(3), np.uint64(31)
    for g in range(plane.shape[0]):
        w = words[g]
        p = np.uint64(plane[g])
        p = p | (p << spread)
        out[2 * g] = ((w & low_bits) << one) | ((p & ones) << three)
        out[2 * g + 1] = ((w & high_bits) >> one) | (((p >> two) & ones) << three)


# ---------------------------------------------------------------- the expert cache policy's arithmetic
# runtime/policy.ForecastPolicy's observe and expected_next_use on one layer's small arrays, in one call each instead
# of some forty NumPy calls (the policy's NumPy code is the reference; no fastmath: its choices must match).

@njit(cache=True, nogil=True)
def _policy_logit(p):
    return math.log(p / (1.0 - p))


@njit(cache=True, nogil=True)
def _policy_row(recency, gap, freq, trans, trans_total, cond, n_cond, lp, freq_weight, temporal_weight, out):
    """ForecastPolicy._row into out."""
    for e in range(out.shape[0]):
        v = recency[gap[e]] + freq_weight * (_policy_logit(freq[e]) - lp)
        if n_cond:
            p = 0.0
            for i in range(n_cond):
                a = cond[i]
                p += trans[a, e] / trans_total[a]
            v += temporal_weight * (_policy_logit(p / n_cond) - lp)
        out[e] = v


@njit(cache=True, nogil=True)
def _policy_long_run(uses, tokens, prior, strength, slack, num_layers, out):
    """ForecastPolicy._long_run_wait(uses, tokens) into out."""
    for e in range(out.shape[0]):
        rate = (uses[e] + strength * prior) / (tokens + strength)
        out[e] = slack * num_layers * (1.0 - rate) / rate


@njit(cache=True, nogil=True)
def _policy_waits(logodds, max_wait, num_layers, q_floor, out):
    """ForecastPolicy._waits(logodds, max_wait) into out (which may be logodds)."""
    top = (1.0 - q_floor) / q_floor
    for e in range(out.shape[0]):
        out[e] = min(num_layers * min(math.exp(-logodds[e]), top), max_wait[e])


@njit(cache=True, nogil=True)
def policy_observe(t, last_use, uses, freq, gap_total, gap_hits, trans, trans_total, prev, n_prev, cross, cross_total,
                   prev_before, n_before, used, cap, alpha, q_floor):
    """ForecastPolicy.observe's counts for one layer whose t-th token used `used`: last_use, uses, freq are the
    layer's rows; trans, trans_total and prev[:n_prev] its transitions and last experts; cross, cross_total and
    prev_before[:n_before] those of the layer before (n_before 0: not the same token's)."""
    for e in range(last_use.shape[0]):
        gap_total[min(t - last_use[e], cap)] += 1
    for u in used:
        gap_hits[min(t - last_use[u], cap)] += 1
    for e in range(freq.shape[0]):
        freq[e] *= 1 - alpha
    for u in used:
        last_use[u] = t
        uses[u] += 1
        freq[u] += alpha
    for e in range(freq.shape[0]):
        freq[e] = min(max(freq[e], q_floor), 1 - q_floor)
    for i in range(n_prev):
        trans_total[prev[i]] += 1
        for u in used:
            trans[prev[i], u] += 1
    for i in range(n_before):
        cross_total[prev_before[i]] += 1
        for u in used:
            cross[prev_before[i], u] += 1


@njit(cache=True, nogil=True)
def policy_next_use(eta, ahead, wait, logodds, max_wait, recency, gap_hits, gap_total, stale, tokens, last_use, freq,
                    uses, trans, trans_total, cross, cross_total, prev, n_prev, cur, step, in_step, forecast,
                    prior, lp, cap, strength, slack, alpha, q_floor, freq_weight, temporal_weight, cross_weight):
    """ForecastPolicy.expected_next_use into eta [L, E]: the rows of the stale layers brought up to date (recency
    first, when any is), then every key's wait from the current layer cur, its in-step row and the next layer's."""
    L, E = eta.shape
    gap = np.empty(E, np.int64)
    if stale.shape[0]:
        for g in range(recency.shape[0]):
            recency[g] = _policy_logit((gap_hits[g] + strength * prior) / (gap_total[g] + strength))
        for layer in stale:
            for e in range(E):
                gap[e] = min(tokens[layer] - last_use[layer, e], cap)
            _policy_row(recency, gap, freq[layer], trans[layer], trans_total[layer], prev[layer], n_prev[layer], lp,
                        freq_weight, temporal_weight, logodds[layer])
            _policy_long_run(uses[layer], tokens[layer], prior, strength, slack, L, max_wait[layer])
            _policy_waits(logodds[layer], max_wait[layer], L, q_floor, wait[layer])
    for layer in range(L):
        for e in range(E):
            eta[layer, e] = ahead[layer] + wait[layer, e]
    row = np.empty(E)
    if in_step:
        f = np.empty(E)
        u = np.empty(E)
        for e in range(E):
            gap[e] = min(tokens[cur] + 1 - last_use[cur, e], cap)
            f[e] = freq[cur, e] * (1 - alpha)
            u[e] = uses[cur, e]
        for s in step:
            gap[s] = 1
            f[s] += alpha
            u[s] += 1
        _policy_row(recency, gap, f, trans[cur], trans_total[cur], step, step.shape[0], lp, freq_weight,
                    temporal_weight, row)
        _policy_long_run(u, tokens[cur] + 1, prior, strength, slack, L, u)  # u: its uses, then its cap
        _policy_waits(row, u, L, q_floor, row)
        for e in range(E):
            eta[cur, e] = L + row[e]
    nxt = cur + 1
    if nxt < L and (step.shape[0] or forecast.shape[0]):
        for e in range(E):
            if forecast.shape[0]:
                p = forecast[e]
            else:
                p = 0.0
                for s in step:
                    p += cross[cur, s, e] / cross_total[cur, s]
                p /= step.shape[0]
            row[e] = logodds[nxt, e] + cross_weight * (_policy_logit(p) - lp)
        _policy_waits(row, max_wait[nxt], L, q_floor, row)
        for e in range(E):
            eta[nxt, e] = 1 + row[e]
