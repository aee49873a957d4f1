"""What the offloading engine takes from the machine's profile: reader threads and how many layers ahead
prefetching starts."""

from __future__ import annotations

import math
import sys

from ..errors import EdgerunError
from ..runtime.reader import PIECE
from .profile import default_profile_path, load_profile, measure_profile, save_profile

PARALLEL_GAIN = 1.5  # a second reader pays off only when parallel reads are half again as fast as one
MAX_READERS = 4  # more readers than this only split the same bandwidth on consumer SSDs
MAX_DEPTH = 4
THREADS_WITHIN = 0.95


def local_profile(measure: bool = True) -> tuple[dict | None, str]:
    """This machine's saved profile and where it came from; without one, a quick one is measured and saved
    (once) when `measure`, else (None, reason)."""
    path = default_profile_path()
    if path.is_file():
        try:
            return load_profile(path), str(path)
        except EdgerunError as e:
            return None, f"unreadable profile ({e})"
    if not measure:
        return None, "no profile"
    print("edgerun: measuring this machine once for the offloading engine (edgerun profile --quick)...",
          file=sys.stderr)
    profile = measure_profile(quick=True, log=lambda line: None)
    save_profile(profile, path)
    return profile, str(path)


def _nearest(table: dict, size: int) -> dict:
    return table[min(table, key=lambda k: abs(math.log(int(k) / size)))]


def top_threads(by_threads: dict) -> float:
    """The figure at the largest thread count measured (the physical cores)."""
    return by_threads[max(by_threads, key=int)]


def read_plan(profile: dict, chunk_bytes: int) -> tuple[int, float]:
    """(reader threads, GB/s they read together) for experts of chunk_bytes: the profile's random reads of
    the size nearest to the engine's read calls, with as many readers as it measured in parallel where that pays off."""
    disk = _nearest(profile["disk"]["random_read"], min(chunk_bytes, PIECE))  # a chunk is read piece by piece
    one, parallel = disk["qd1_gbps"], disk["parallel_gbps"]
    if parallel >= PARALLEL_GAIN * one and disk["parallel_readers"] > 1:
        return min(disk["parallel_readers"], MAX_READERS), parallel
    return 1, one


def best_threads(profile: dict, fmt: str) -> int:
    """The fewest threads within 5% of the profile's fastest q4/q8 kernels, one-token and many-token alike
    (on SMT or hybrid CPUs, more threads can be slower)."""
    kernels = profile["cpu"]["kernels"].get(fmt) or profile["cpu"]["kernels"]["q8"]
    picks = []
    for figures in (kernels["gemv_gbps"], kernels["gemm_gflops"]):
        best = max(figures.values())
        picks.append(min(int(n) for n, v in figures.items() if v >= THREADS_WITHIN * best))
    return max(picks)


def engine_settings(profile: dict | None, *, chunk_bytes: int, top_k: int, layer_dense_bytes: int,
                    expert_format: str) -> dict:
    """Reader threads and the first prefetch depth for experts of chunk_bytes (whether O_DIRECT works is
    probed on the store itself, which may sit on another disk than the profile's).

    The depth is how many layers of compute it takes to read one layer's experts: reads must start that
    far ahead to arrive in time (the engine adapts it while it runs)."""
    if profile is None:
        return {"readers": 1, "prefetch_depth": 1}
    readers, gbps = read_plan(profile, chunk_bytes)
    read_s = top_k * chunk_bytes / (gbps * 1e9)
    kernels = profile["cpu"]["kernels"]
    expert_gbps = top_threads(kernels[expert_format]["gemv_gbps"]) if expert_format in kernels else 1.0
    dense_gbps = top_threads(kernels["q8"]["gemv_gbps"])
    compute_s = top_k * chunk_bytes / (expert_gbps * 1e9) + layer_dense_bytes / (dense_gbps * 1e9)
    depth = max(1, min(MAX_DEPTH, math.ceil(read_s / compute_s)))
    return {"readers": readers, "prefetch_depth": depth}
