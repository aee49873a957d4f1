"""Throughput of the kernels on this machine, next to its RAM read bandwidth.

    ram_read_bandwidth(threads)      GB/s (1e9 bytes per second) read by a parallel sum over 1 GiB
    gemv_throughput(fmt, threads)    GB/s of weights (qs + scales) read by the one-token kernel
    gemm_throughput(fmt, threads)    GFLOP/s (2 T O K per second) of the many-token kernel

Each figure is the median of several runs; the weights are random bytes (speed does not depend on them).
These need the numba backend.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable

import numpy as np

from .. import native
from . import config

_SUM_CHUNKS = 64  # pieces of the bandwidth probe, spread over the threads
_ROTATE_BYTES = 1 << 28  # GEMV weights cycled through: several times any L3, so reads come from RAM
_MAX_COPIES = 64


def _kernels():
    native.warmup()
    if native._kernels is None:
        raise RuntimeError("the kernel benchmarks need the numba backend (numba importable, EDGERUN_NO_JIT unset)")
    return native._kernels


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # first call: caches warm, lazily compiled code loaded
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _with_threads(threads: int, measure: Callable[[], float]) -> float:
    kernels = _kernels()
    before = config.threads(kernels.max_threads())
    native.set_threads(threads)
    kernels.use_threads(config.threads(kernels.max_threads()))
    try:
        return measure()
    finally:
        native.set_threads(before)


def _random_matrix(fmt: str, out_features: int, in_features: int, group: int = 32):
    rng = np.random.default_rng(0)
    if fmt == "q8":
        qs = rng.integers(-127, 128, size=(out_features, in_features), dtype=np.int8)
    else:
        qs = rng.integers(0, 256, size=(out_features, in_features // 2), dtype=np.uint8)
    if fmt == "mxfp4":  # E8M0 exponents around 2 ** -7
        return qs, rng.integers(115, 125, size=(out_features, in_features // 32), dtype=np.uint8)
    scales = (rng.random((out_features, in_features // group), dtype=np.float32) * 0.01).astype(np.float16)
    return qs, scales


def ram_read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """RAM read bandwidth in GB/s with `threads` threads: a parallel sum over an nbytes array, median of 5."""
    kernels = _kernels()
    a = np.ones(max(nbytes // 4, _SUM_CHUNKS * 16), dtype=np.float32)

    def measure() -> float:
        return a.nbytes / _median_seconds(lambda: kernels.read_sum(a, _SUM_CHUNKS), 5) / 1e9
    return _with_threads(threads, measure)


def gemv_throughput(fmt: str, threads: int, out_features: int = 4096, in_features: int = 14336,
                    repeats: int = 20) -> float:
    """GB/s of weights (qs + scales bytes) read by the one-token kernel on random fmt matrices, median.

    Calls cycle through copies of the matrix that together exceed the caches many times over, so that
    the weights come from RAM (a 4096 x 14336 q4 matrix alone would almost fit a 32 MiB L3)."""
    qs, scales = _random_matrix(fmt, out_features, in_features)
    nbytes = qs.nbytes + scales.nbytes
    n_copies = min(_MAX_COPIES, -(-_ROTATE_BYTES // nbytes))
    copies = [(qs, scales)] + [(qs.copy(), scales.copy()) for _ in range(n_copies - 1)]
    x = np.random.default_rng(1).standard_normal((1, in_features)).astype(np.float32)
    out = np.empty((1, out_features), dtype=np.float32)
    turn = itertools.cycle(copies)

    def step() -> None:
        native.matmul(x, *next(turn), out)

    def measure() -> float:
        return nbytes / _median_seconds(step, max(repeats, len(copies))) / 1e9
    return _with_threads(threads, measure)


def gemm_throughput(fmt: str, threads: int, tokens: int = 128, out_features: int = 4096,
                    in_features: int = 4096, repeats: int = 10) -> float:
    """GFLOP/s (2 * tokens * out * in per second) of the many-token kernel on a random fmt matrix, median."""
    qs, scales = _random_matrix(fmt, out_features, in_features)
    x = np.random.default_rng(1).standard_normal((tokens, in_features)).astype(np.float32)
    out = np.empty((tokens, out_features), dtype=np.float32)

    def measure() -> float:
        return 2 * tokens * out_features * in_features / _median_seconds(lambda: native.matmul(x, qs, scales, out),
                                                                         repeats) / 1e9
    return _with_threads(threads, measure)
