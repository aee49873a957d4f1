"""NumPy reference kernels: the same signatures as edgerun.native, written for clarity.

They are the fallback when the JIT kernels are unavailable and the ground truth of the kernel tests.
Weights are dequantized a block of rows at a time, so a matrix is never expanded whole in RAM.
"""

from __future__ import annotations

import numpy as np

from ..store import quant

SILU, GELU_TANH, GELU, SWIGLU_OAI = 0, 1, 2, 3
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
_BLOCK_FLOATS = 1 << 22  # dequantized rows per step: 16 MiB of float32


def matmul(x: np.ndarray, qs: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """out[t, o] = sum_k W[o, k] x[t, k] for the q8/q4 matrix W = (qs, scales) and x float32 [T, K]."""
    k = x.shape[1]
    rows = max(1, _BLOCK_FLOATS // k)
    for o0 in range(0, qs.shape[0], rows):
        w = quant.dequantize(qs[o0:o0 + rows], scales[o0:o0 + rows], k)
        out[:, o0:o0 + rows] = x @ w.T


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [Kp] as the int8 GEMV of q4 matrices sees it: groups of 32, each rounded to round(x * (1 / d))
    with d = max|group| * (1 / 127) (0 where d = 0), in float32. Returns xq, int8 [Kp / 32, 32], and d,
    float32 [Kp / 32]."""
    groups = x.reshape(-1, 32)
    d = np.abs(groups).max(axis=1) * np.float32(1 / 127)
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d > 0)
    return np.rint(groups * inv[:, None]).astype(np.int8), d


def matmul_int8(x: np.ndarray, qs: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:
    """What the JIT kernels compute for one token on a q4 matrix with groups of 32 where native.INT_DOT
    is true, token by token: sum over groups of w_scale * x_scale * (sum(nibble * xq) - 8 * sum(xq)), the
    sums in integers (xq from quantize_activations)."""
    kp = 2 * qs.shape[1]
    if kp != 32 * scales.shape[1]:
        raise ValueError("the int8 product takes groups of 32")
    rows = max(1, _BLOCK_FLOATS // kp)
    for t in range(x.shape[0]):
        xp = np.zeros(kp, np.float32)
        xp[:x.shape[1]] = x[t]
        xq, d = quantize_activations(xp)
        xq = xq.astype(np.int64)
        offsets = 8 * xq.sum(axis=1)
        for o0 in range(0, qs.shape[0], rows):
            groups = qs[o0:o0 + rows].reshape(-1, kp // 32, 16).astype(np.int64)
            nibbles = np.concatenate([groups & 15, groups >> 4], axis=2)
            dots = np.einsum("ogk,gk->og", nibbles, xq) - offsets
            w_scales = scales[o0:o0 + rows].astype(np.float32)
            out[t, o0:o0 + rows] = ((w_scales * d).astype(np.float64) * dots).sum(axis=1)


def gated_activation(h: np.ndarray, activation: int) -> np.ndarray:
    """act(h[:, :I]) * h[:, I:] for h [T, 2I]: activation 0 is SiLU, 1 GELU with the tanh approximation, 2 exact
    GELU (with the error function); 3 is gpt-oss's clamped SwiGLU, g sigmoid(1.702 g) (u + 1) with g = min(gate, 7)
    and u = up clamped to [-7, 7]."""
    inter = h.shape[1] // 2
    gate, up = h[:, :inter], h[:, inter:]
    if activation == SWIGLU_OAI:
        g = np.minimum(gate, np.float32(SWIGLU_LIMIT))
        with np.errstate(over="ignore"):
            glu = g / (np.float32(1) + np.exp(-np.float32(SWIGLU_ALPHA) * g))
        return (glu * (np.clip(up, -np.float32(SWIGLU_LIMIT), np.float32(SWIGLU_LIMIT)) + 1)).astype(np.float32)
    if activation == SILU:
        with np.errstate(over="ignore"):  # exp(-gate) = inf for very negative gate gives the right 0
            act = gate / (np.float32(1) + np.exp(-gate))
    elif activation == GELU_TANH:
        c = np.float32(np.sqrt(2 / np.pi))
        act = np.float32(0.5) * gate * (np.float32(1) + np.tanh(c * (gate + np.float32(0.044715) * gate ** 3)))
    elif activation == GELU:
        import torch  # NumPy has no error function

        erf = torch.special.erf(torch.from_numpy(np.ascontiguousarray(gate) * np.float32(0.5 ** 0.5))).numpy()
        act = np.float32(0.5) * gate * (np.float32(1) + erf)
    else:
        raise ValueError(f"unknown activation {activation}; expected 0 (SiLU), 1 (GELU tanh), 2 (GELU) or 3 "
                         f"(gpt-oss SwiGLU)")
    return (act * up).astype(np.float32)


def expert_ffn(x: np.ndarray, gate_up_qs: np.ndarray, gate_up_scales: np.ndarray, down_qs: np.ndarray,
               down_scales: np.ndarray, activation: int, out: np.ndarray, product=None,
               gate_up_bias: np.ndarray | None = None, down_bias: np.ndarray | None = None) -> None:
    """out = down @ gated(gate @ x + b, up @ x + b) + b for x [T, H]; gate_up [2I, H] holds the gate rows, then
    up; the biases are optional. product is the matrix product used, by default matmul (matmul_int8 for the int8
    kernels)."""
    product = product or matmul
    h = np.empty((x.shape[0], gate_up_qs.shape[0]), dtype=np.float32)
    product(x, gate_up_qs, gate_up_scales, h)
    if gate_up_bias is not None:
        h += gate_up_bias
    product(gated_activation(h, activation), down_qs, down_scales, out)
    if down_bias is not None:
        out += down_bias


def quantize(w: np.ndarray, fmt: str, group: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(qs, scales) of w [O, K] in fmt: the NumPy quantizer of edgerun.store.quant."""
    return quant.quantize(w, fmt, group)


def rotated(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [..., Dh] with the first 2 len(cos) values of its last axis rotated as two halves (NeoX order)."""
    half = cos.shape[0]
    a, b = x[..., :half], x[..., half:2 * half]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin, x[..., 2 * half:]], axis=-1)


def attend_one(q: np.ndarray, k: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray,
               v_cache: np.ndarray, pos: int, lo: int, scale: float, cap: float, temperature: float,
               sinks: np.ndarray, out: np.ndarray) -> None:
    """What the kernel of the same name computes (edgerun.native.attend_one), head by head."""
    k_cache[:, pos] = rotated(k, cos, sin)
    v_cache[:, pos] = v
    group = q.shape[0] // k.shape[0]
    for h, qh in enumerate(rotated(q, cos, sin)):
        keys, values = k_cache[h // group, lo:pos + 1], v_cache[h // group, lo:pos + 1]
        logits = (keys @ qh) * np.float32(scale)
        if cap > 0:
            logits = np.float32(cap) * np.tanh(logits / np.float32(cap))
        logits = logits * np.float32(temperature)
        if sinks.shape[0]:
            logits = np.append(logits, sinks[h])
        p = np.exp(logits - logits.max())
        p = p[:values.shape[0]] / p.sum()
        out[h] = p @ values
