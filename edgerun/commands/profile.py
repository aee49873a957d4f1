"""`edgerun profile`: measure this machine (CPU kernels, RAM bandwidth, cold disk reads, GPU transfers) and
save the figures as a JSON hardware profile, by default under the user config dir ($EDGERUN_CONFIG when set)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import EdgerunError
from ..units import format_size


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="measure this machine and save a hardware profile", description=__doc__)
    p.add_argument("--out", default=None, metavar="FILE", help="also write the profile here")
    p.add_argument("--quick", action="store_true", help="fewer thread counts and chunk sizes, smaller files")
    p.add_argument("--store-path", default=None, metavar="DIR",
                   help="directory on the disk to measure (default: the edgerun cache dir)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of a summary")
    p.set_defaults(main=main)


def main(args: argparse.Namespace) -> int:
    from ..hw.profile import default_profile_path, measure_profile, save_profile

    if args.out is not None:
        _check_writable(Path(args.out))  # fail now, not after a minute of measuring
    profile = measure_profile(args.store_path, quick=args.quick)
    saved = [save_profile(profile, default_profile_path())]
    if args.out is not None:
        saved.append(save_profile(profile, args.out))
    if args.json:
        print(json.dumps(profile, indent=2))
    else:
        print(summary(profile))
        print(f"saved      {', '.join(map(str, saved))}")
    return 0


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise EdgerunError(f"--out {path} is a directory; give a file name")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise EdgerunError(f"--out {path}: directory {path.parent} does not exist or is not writable")


def summary(p: dict) -> str:
    """A few human lines of the profile's main figures."""
    cpu, ram, disk, gpu = p["cpu"], p["ram"], p["disk"], p["gpu"]
    top = str(max(map(int, cpu["kernels"]["q4"]["gemv_gbps"])))
    readers = next(iter(disk["random_read"].values()))["parallel_readers"]
    rand = "; ".join(f"{int(size) >> 10} KiB {r['qd1_gbps']:.2f}/{r['parallel_gbps']:.2f}"
                     for size, r in disk["random_read"].items())
    lines = [
        (f"cpu        {cpu['model']}, {cpu['physical_cores']} cores / {cpu['logical_cores']} threads, "
         f"{', '.join(cpu['simd']) or 'no listed SIMD extensions'}"),
        *(f"{fmt} kernels GEMV {cpu['kernels'][fmt]['gemv_gbps'][top]:.1f} GB/s, GEMM "
          f"{cpu['kernels'][fmt]['gemm_gflops'][top]:.1f} GFLOP/s ({top} threads)" for fmt in ("q4", "q8")),
        f"ram        {format_size(ram['total_bytes'])} ({format_size(ram['available_bytes'])} available), read "
        + ", ".join(f"{v:.1f} GB/s with {n} thread{'s' if n != '1' else ''}" for n, v in ram["read_gbps"].items()),
        (f"disk       {disk['path']}: sequential {disk['seq_read_gbps']:.2f} GB/s "
         f"({'O_DIRECT' if disk['direct_io'] else 'buffered'}); random GB/s qd1/{readers} readers: {rand}"),
        "gpu        none" if gpu is None else
        f"gpu        {gpu['name']}, {format_size(gpu['memory_bytes'])}, "
        f"H2D {gpu['h2d_gbps_pinned']:.1f} GB/s pinned "
        f"/ {gpu['h2d_gbps_pageable']:.1f} pageable; expert kernel "
        + ", ".join(f"{fmt} {gpu['kernels'][fmt]['gemv_gbps']:.0f} GB/s one token, "
                    f"{gpu['kernels'][fmt]['gemm_gflops']:.0f} GFLOP/s many" for fmt in ("q4", "q8")),
        f"took       {p['duration_s']:.1f} s{' (--quick)' if p['quick'] else ''}",
    ]
    return "\n".join(lines)
