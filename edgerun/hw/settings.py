"""What the runtime takes from the machine's profile: the saved profile itself, reader threads for a given
chunk size, and kernel threads. (Prefetch depth and the memory split are in runtime/placement.py.)"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

from ..errors import EdgerunError
from ..runtime.reader import PIECE
from ..runtime.tier import MissCosts
from .profile import default_profile_path, load_profile, measure_gpu

PARALLEL_GAIN = 1.5  # a second reader pays off only when parallel reads are half again as fast as one
MAX_READERS = 4  # more readers than this only split the same bandwidth on consumer SSDs
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
    print("edgerun: measuring this machine once for the expert reader (edgerun profile --quick)...",
          file=sys.stderr)
    measure_apart(path)
    return load_profile(path), str(path)


_MEASURE = ("import sys; from edgerun.hw.profile import measure_profile, save_profile; "
            "save_profile(measure_profile(quick=True, log=lambda line: None), sys.argv[1])")


def measure_apart(path: Path) -> None:
    """Measure this machine quickly in a child process and save the profile at path. The measurement's buffers
    (a few hundred MiB to time RAM and the kernels) then never count in the memory of the process that loads a
    model, whose budget would otherwise be exceeded by them on the first run."""
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise EdgerunError(f"measuring this machine failed: {lines[-1]} (run `edgerun profile` to see why)")


def _nearest(table: dict, size: int) -> dict:
    return table[min(table, key=lambda k: abs(math.log(int(k) / size)))]


def top_threads(by_threads: dict) -> float:
    """The figure at the largest thread count measured (the physical cores)."""
    return by_threads[max(by_threads, key=int)]


def reader_choice(profile: dict, chunk_bytes: int) -> tuple[int, float]:
    """(reader threads, GB/s they read together) for experts of chunk_bytes: the profile's random reads of the size
    nearest to the reader's read calls, with as many readers as it measured in parallel where that pays off."""
    disk = _nearest(profile["disk"]["random_read"], min(chunk_bytes, PIECE))  # a chunk is read piece by piece
    one, parallel = disk["qd1_gbps"], disk["parallel_gbps"]
    if parallel >= PARALLEL_GAIN * one and disk["parallel_readers"] > 1:
        return min(disk["parallel_readers"], MAX_READERS), parallel
    return 1, one


def kernel_key(fmt: str) -> str:
    """The profile's kernel figures a weight format runs at: profiles measure q4 and q8, and mxfp4 (4.25 bits a
    weight, decoded by a table lookup per 16 values) is taken at q4's (4.5 bits)."""
    return "q4" if fmt == "mxfp4" else fmt


def best_threads(profile: dict, fmt: str) -> int:
    """The fewest threads within 5% of the profile's fastest q4/q8 kernels, one-token and many-token alike
    (on SMT or hybrid CPUs, more threads can be slower)."""
    kernels = profile["cpu"]["kernels"].get(kernel_key(fmt)) or profile["cpu"]["kernels"]["q8"]
    picks = []
    for figures in (kernels["gemv_gbps"], kernels["gemm_gflops"]):
        best = max(figures.values())
        picks.append(min(int(n) for n, v in figures.items() if v >= THREADS_WITHIN * best))
    return max(picks)


@functools.cache
def _measured_gpu(device: str) -> dict:
    return measure_gpu(device, quick=True, log=lambda line: None)


def miss_costs(profile: dict | None, layout, device) -> MissCosts:
    """What running an expert missing from the GPU costs either way: the profile's figures for its GPU when they
    are of this device, else a quick measurement of the device (once per process); the CPU's from the profile."""
    import torch

    from .plan import miss_costs as costs_from

    gpu = (profile or {}).get("gpu")
    mine, theirs = torch.device(device), torch.device(gpu["device"]) if gpu else None
    if theirs is None or (mine.type, mine.index or 0) != (theirs.type, theirs.index or 0):
        gpu = _measured_gpu(str(device))
    if profile is None:
        profile, _ = local_profile(measure=True)
    return costs_from(profile | {"gpu": gpu}, layout)
