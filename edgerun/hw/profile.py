"""A hardware profile: measured CPU kernel throughput, RAM bandwidth, disk read speed and GPU transfer speed,
saved as JSON (schema_version 1) so that other machines' figures can be compared with this one's."""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
from platformdirs import user_config_dir

from ..errors import EdgerunError
from ..native import bench
from .disk import measure_disk

SCHEMA_VERSION = 1
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "neon")
CHUNK_SIZES = (256 << 10, 4 << 20, 16 << 20, 64 << 20)
QUICK_CHUNK_SIZES = (1 << 20, 4 << 20)  # 4 MiB: the engine's read calls

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"profile: {line}", file=sys.stderr, flush=True)


def config_dir() -> Path:
    """edgerun's user config dir, or $EDGERUN_CONFIG when set."""
    return Path(os.environ.get("EDGERUN_CONFIG") or user_config_dir("edgerun", appauthor=False))


def default_profile_path() -> Path:
    return config_dir() / "profiles" / f"{socket.gethostname()}.json"


def measure_profile(store_path: str | os.PathLike | None = None, quick: bool = False, *,
                    disk_bytes: int | None = None, read_budget: int | None = None,
                    chunk_sizes: tuple[int, ...] | None = None, ram_bytes: int | None = None,
                    log: Log = _stderr) -> dict:
    """Measure this machine. The keyword arguments override the sizes --quick and the default pick."""
    from .. import __version__, native

    if store_path is None:
        from ..paths import cache_dir

        store_path = cache_dir()
        store_path.mkdir(parents=True, exist_ok=True)
    elif not Path(store_path).is_dir():
        raise EdgerunError(f"--store-path {store_path} is not an existing directory")
    t = time.perf_counter()
    log("cpu: loading edgerun's kernels (compiled once after an install, 20-30 s)")
    native.warmup()  # not part of the measurement: a later run loads them from the disk cache in a second
    log(f"cpu: kernels ready in {time.perf_counter() - t:.1f} s")
    t0 = time.perf_counter()
    profile = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(), "edgerun_version": __version__,
        "source": "measured with edgerun profile", "quick": quick,
    }
    profile["cpu"] = _measure_cpu(quick, log)
    profile["ram"] = _measure_ram(profile["cpu"]["physical_cores"], ram_bytes or (256 << 20 if quick else 1 << 30), log)
    profile["disk"] = measure_disk(store_path, disk_bytes or (256 << 20 if quick else 1 << 30),
                                   list(chunk_sizes or (QUICK_CHUNK_SIZES if quick else CHUNK_SIZES)),
                                   read_budget or (64 << 20 if quick else 1 << 30), log)
    profile["gpu"] = measure_gpu(quick=quick, log=log)
    profile["duration_s"] = round(time.perf_counter() - t0, 2)
    return profile


def _thread_counts(cores: int, quick: bool) -> list[int]:
    return sorted({1, cores}) if quick else list(range(1, cores + 1))


def _measure_cpu(quick: bool, log: Log) -> dict:
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    kernels = {}
    for fmt in ("q4", "q8"):
        log(f"cpu: {fmt} kernels")
        threads = _thread_counts(cores, quick)
        kernels[fmt] = {"gemv_gbps": {str(n): bench.gemv_throughput(fmt, n) for n in threads},
                        "gemm_gflops": {str(n): bench.gemm_throughput(fmt, n, repeats=3 if quick else 10)
                                        for n in threads}}
    return {"model": _cpu_model(), "physical_cores": cores, "logical_cores": psutil.cpu_count(logical=True) or cores,
            "simd": _simd(), "kernels": kernels}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _simd() -> list[str]:
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):  # x86, ARM
            flags.update(line.split(":", 1)[1].split())
    if platform.machine().lower() in ("arm64", "aarch64"):
        flags.add("neon")  # always present on 64-bit ARM, not always listed (macOS has no /proc)
    if "asimd" in flags:
        flags.add("neon")
    return [f for f in SIMD_FLAGS if f in flags]


def _measure_ram(cores: int, nbytes: int, log: Log) -> dict:
    log("ram: read bandwidth")
    mem = psutil.virtual_memory()
    return {"total_bytes": mem.total, "available_bytes": mem.available,
            "read_gbps": {str(n): bench.ram_read_bandwidth(n, nbytes) for n in sorted({1, cores})}}


def gpu_device() -> str | None:
    """The device the GPU tier uses by default: the first CUDA GPU, or None (Apple's MPS shares the RAM, so it is
    used only when asked for)."""
    import torch

    return "cuda" if torch.cuda.is_available() else None


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_memory(device) -> tuple[int, int]:
    """(free, total) bytes of a device's memory (the CPU standing in for one: the RAM's)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    if device.type == "mps":
        total = torch.mps.recommended_max_memory()
        return total - torch.mps.driver_allocated_memory(), total
    mem = psutil.virtual_memory()
    return mem.available, mem.total


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU (MPS) of {platform.machine()}"
    return f"CPU standing in for a GPU ({_cpu_model()})"


def measure_gpu(device: str | None = None, quick: bool = False, log: Log = _stderr) -> dict | None:
    """A device's figures for the GPU tier: host-to-device copies (pinned where the device has it, and pageable),
    and the tier's own expert kernel on q4/q8 chunks, one token (GB/s of chunk bytes) and many (GFLOP/s). None
    without a device (default: gpu_device())."""
    import torch

    from ..runtime.device import ExpertKernel, default_dtype
    from ..store.layout import ExpertLayout

    device = device or gpu_device()
    if device is None:
        return None
    dev = torch.device(device)
    log(f"gpu: {dev} transfers and the expert kernel")

    def seconds(fn: Callable[[], object], repeats: int = 3 if quick else 5) -> float:
        fn()
        _synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        _synchronize(dev)
        return (time.perf_counter() - t0) / repeats

    nbytes = (64 if quick else 256) << 20
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pinned = pageable.pin_memory() if dev.type == "cuda" else pageable
    target = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    copies = {"h2d_gbps_pinned": nbytes / seconds(lambda: target.copy_(pinned, non_blocking=True)) / 1e9,
              "h2d_gbps_pageable": nbytes / seconds(lambda: target.copy_(pageable)) / 1e9}
    # experts of a real model's size even when quick: on a small one a GPU's figures are launch overhead (an
    # H200 read 5 GB/s at 1024 against 42 at 4096); the CPU stands in for small tests only
    size = 1024 if dev.type == "cpu" else 4096
    kernels = {}
    compute = default_dtype(dev)
    for fmt in ("q4", "q8"):
        layout = ExpertLayout(fmt, size, size)
        experts = 4
        pool = torch.randint(0, 256, (experts, layout.nbytes), dtype=torch.uint8)
        scales = layout.gate_up.offsets()[1], layout.down.offsets()[1]
        for (offset, _, shape), base in zip(scales, (0, layout.down_offset)):  # small finite float16 scales
            n = 2 * int(np.prod(shape))
            pool[:, base + offset:base + offset + n] = torch.full((n // 2,), 1e-3, dtype=torch.float16).view(
                torch.uint8)
        pool = pool.to(dev)
        kernel = ExpertKernel(layout, "silu", dev, compute, batch=2)
        slots = [0, 1]
        one = torch.randn(1, size, device=dev)
        gemv = seconds(lambda: kernel(pool, slots, one, [torch.tensor([0]), torch.tensor([0])]))
        tokens = 128 if quick else 512
        many = torch.randn(tokens, size, device=dev)
        group = torch.arange(tokens)
        gemm = seconds(lambda: kernel(pool, slots, many, [group, group]))
        kernels[fmt] = {"gemv_gbps": 2 * layout.nbytes / gemv / 1e9,
                        "gemm_gflops": 2 * 2 * 3 * size * size * tokens / gemm / 1e9}
    free, total = device_memory(dev)
    return {"name": _device_name(dev), "device": str(dev), "memory_bytes": total, **copies, "kernels": kernels}


# -- schema ----------------------------------------------------------------------------------------------------
_NUM = (int, float)
_BY_THREADS = ("by_count", _NUM)  # {"1": number, "2": number, ...}
_KERNEL = {"gemv_gbps": _BY_THREADS, "gemm_gflops": _BY_THREADS}
_SCHEMA: dict = {
    "schema_version": int, "created": str, "hostname": str, "edgerun_version": str, "source": str, "quick": bool,
    "cpu": {"model": str, "physical_cores": int, "logical_cores": int, "simd": ("list", str),
            "kernels": {"q4": _KERNEL, "q8": _KERNEL}},
    "ram": {"total_bytes": int, "available_bytes": int, "read_gbps": _BY_THREADS},
    "disk": {"path": str, "direct_io": bool, "file_bytes": int, "seq_read_gbps": _NUM,
             "random_read": ("by_count", {"qd1_gbps": _NUM, "parallel_gbps": _NUM, "parallel_readers": int})},
    "gpu": ("optional", {"name": str, "device": str, "memory_bytes": int, "h2d_gbps_pinned": _NUM,
                         "h2d_gbps_pageable": _NUM,
                         "kernels": {fmt: {"gemv_gbps": _NUM, "gemm_gflops": _NUM} for fmt in ("q4", "q8")}}),
    "duration_s": _NUM,
}


def _check(value: object, spec: object, where: str) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise EdgerunError(f"bad hardware profile: '{where}' must be an object")
        for key, sub in spec.items():
            name = f"{where}.{key}" if where else key
            if key not in value:
                raise EdgerunError(f"bad hardware profile: missing key '{name}'")
            _check(value[key], sub, name)
    elif isinstance(spec, tuple) and spec and spec[0] == "optional":
        if value is not None:
            _check(value, spec[1], where)
    elif isinstance(spec, tuple) and spec and spec[0] in ("list", "by_count"):
        if spec[0] == "list" and not isinstance(value, list):
            raise EdgerunError(f"bad hardware profile: '{where}' must be a list")
        if spec[0] == "by_count" and not (isinstance(value, dict) and value and all(k.isdigit() for k in value)):
            raise EdgerunError(f"bad hardware profile: '{where}' must map counts like \"1\" to values")
        for i, item in (enumerate(value) if isinstance(value, list) else value.items()):
            _check(item, spec[1], f"{where}.{i}")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):  # True is an int too
            raise EdgerunError(f"bad hardware profile: '{where}' must be {' or '.join(t.__name__ for t in types)}")


def validate_profile(profile: dict) -> None:
    """Raise EdgerunError naming the first missing or mistyped key."""
    _check(profile, _SCHEMA, "")
    if profile["schema_version"] != SCHEMA_VERSION:
        raise EdgerunError(f"bad hardware profile: schema_version {profile['schema_version']} is not {SCHEMA_VERSION}")


def save_profile(profile: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile, indent=2) + "\n")
    except OSError as e:
        raise EdgerunError(f"cannot write the profile to {path}: {e.strerror}") from None
    return path


def load_profile(path: str | os.PathLike) -> dict:
    """Read and validate a profile file."""
    try:
        profile = json.loads(Path(path).read_text())
    except OSError as e:
        raise EdgerunError(f"cannot read the profile {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise EdgerunError(f"{path} is not JSON: {e}") from None
    validate_profile(profile)
    return profile
