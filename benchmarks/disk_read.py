"""Measure cold read bandwidth of the disk that holds a set of existing files.

The files named on the command line (directories are walked recursively) are read from start to end,
each one whole, after their pages have been dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)``. The fraction of their pages still resident after the drop is
measured with ``mincore`` and printed, so a drop that did not work (a file mapped by another process,
say) is visible instead of silently inflating the numbers.

Configurations measured: one reader and 2, 4, 8 parallel reader threads (the files are handed out
from a shared queue), each with ``O_DIRECT`` reads into a page-aligned buffer and with ordinary
buffered reads. Python threads release the GIL inside ``os.preadv``, so the threads really overlap.

Example::

    python benchmarks/disk_read.py /path/to/store/experts --repeat 3
    python benchmarks/disk_read.py big-file-1 big-file-2 --threads 1 4 --json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import mmap
import os
import queue
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PAGE = mmap.PAGESIZE
ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffer addresses


def collect_files(paths: list[str], min_size: int) -> list[Path]:
    """Regular files of at least ``min_size`` bytes named by ``paths`` (directories walked), sorted."""
    found: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found.extend(f for f in p.rglob("*") if f.is_file() and f.stat().st_size >= min_size)
        elif p.is_file():
            found.append(p)
        else:
            raise SystemExit(f"not a file or directory: {raw}")
    return sorted(set(found))


def drop_cache(files: list[Path]) -> None:
    """Ask the kernel to evict the (clean) cached pages of every file."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class _Resident:
    """Counts the page-cache-resident pages of a file with mmap(2) + mincore(2) through libc."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_long]
        self._munmap = libc.munmap
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._mincore = libc.mincore
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

    def pages(self, path: Path) -> tuple[int, int]:
        """(resident pages, total pages) of ``path``."""
        size = path.stat().st_size
        if size == 0:
            return 0, 0
        n = (size + PAGE - 1) // PAGE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = self._mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap failed")
            try:
                vec = (ctypes.c_ubyte * n)()
                if self._mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                return sum(b & 1 for b in vec), n
            finally:
                self._munmap(addr, size)
        finally:
            os.close(fd)


def resident_fraction(files: list[Path]) -> float:
    """Fraction of the files' pages that are in the page cache right now."""
    r = _Resident()
    res = tot = 0
    for f in files:
        a, b = r.pages(f)
        res += a
        tot += b
    return res / tot if tot else 0.0


def _read_whole(path: Path, buf: mmap.mmap, direct: bool, block: int) -> int:
    """Read ``path`` start to end into ``buf`` with ``block``-sized preadv calls; bytes read."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        view = memoryview(buf)
        total = 0
        while True:
            n = os.preadv(fd, [view[:block]], total)
            total += n
            if n < block:
                break
        return total
    finally:
        os.close(fd)


@dataclass
class Result:
    """One measured configuration."""

    mode: str  # "direct" or "buffered"
    threads: int
    gb_per_s: float  # median over repeats, 1 GB = 1e9 bytes
    runs_gb_per_s: list[float]
    bytes: int
    resident_before: float  # page-cache fraction of the files just before the timed pass


def run_pass(files: list[Path], threads: int, direct: bool, block: int) -> tuple[int, float]:
    """Read all files once with ``threads`` readers; (bytes, seconds)."""
    work: queue.SimpleQueue[Path] = queue.SimpleQueue()
    for f in files:
        work.put(f)
    counts = [0] * threads
    errors: list[OSError] = []

    def reader(i: int) -> None:
        buf = mmap.mmap(-1, block)  # anonymous mappings are page aligned
        try:
            while True:
                try:
                    f = work.get_nowait()
                except queue.Empty:
                    return
                counts[i] += _read_whole(f, buf, direct, block)
        except OSError as e:  # surfaced in the main thread
            errors.append(e)
        finally:
            buf.close()

    pool = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    dt = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return sum(counts), dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", help="files or directories of existing data to read")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8],
                    help="reader thread counts to measure (default: 1 2 4 8)")
    ap.add_argument("--modes", nargs="+", choices=["direct", "buffered"],
                    default=["direct", "buffered"])
    ap.add_argument("--block-size", type=int, default=0,
                    help="bytes per read call (multiple of 4096); 0 = the largest file, i.e. one "
                         "read per file (default)")
    ap.add_argument("--min-size", type=int, default=1 << 20,
                    help="skip files smaller than this when walking directories (default 1 MiB)")
    ap.add_argument("--repeat", type=int, default=3, help="passes per configuration (median)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    files = collect_files(args.paths, args.min_size)
    if not files:
        raise SystemExit("no files to read")
    total = sum(f.stat().st_size for f in files)
    block = args.block_size or max(f.stat().st_size for f in files)
    block = (block + ALIGN - 1) // ALIGN * ALIGN  # O_DIRECT needs aligned lengths
    if not args.json:
        print(f"{len(files)} files, {total / 1e9:.2f} GB, read size {block / 2**20:.1f} MiB")

    # Check once that the drop works at all before trusting any number.
    drop_cache(files)
    left = resident_fraction(files)
    if left > 0.01:
        print(f"warning: {left:.1%} of the pages are still cached after the drop", file=sys.stderr)

    results: list[Result] = []
    for mode in args.modes:
        for threads in args.threads:
            runs: list[float] = []
            resident: list[float] = []
            nbytes = 0
            for _ in range(args.repeat):
                drop_cache(files)
                resident.append(resident_fraction(files))
                nbytes, dt = run_pass(files, threads, mode == "direct", block)
                runs.append(nbytes / dt / 1e9)
            r = Result(mode, threads, round(statistics.median(runs), 3),
                       [round(x, 3) for x in runs], nbytes, round(max(resident), 4))
            results.append(r)
            if not args.json:
                print(f"{mode:8s} threads={threads:2d}  {r.gb_per_s:6.2f} GB/s   runs "
                      + " ".join(f"{x:.2f}" for x in runs)
                      + f"   cached before: {r.resident_before:.1%}", flush=True)
    drop_cache(files)
    if args.json:
        print(json.dumps({"files": len(files), "bytes": total, "read_size": block,
                          "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
