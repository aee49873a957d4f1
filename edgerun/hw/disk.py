"""Cold read speed of the disk under a directory: sequential, and random chunks at queue depth 1 and in parallel.

A temporary file is written, flushed and dropped from the page cache before every measurement; reads use
O_DIRECT where the filesystem supports it, so they never come from the page cache. The file is deleted at
the end, also on error or Ctrl-C."""

from __future__ import annotations

import mmap
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import EdgerunError
from ..runtime.reader import supports_direct_io
from ..units import format_size

_WRITE_BLOCK = 16 << 20
_SEQ_BLOCK = 16 << 20
_PARALLEL_READERS = 2  # the expert reader runs this many where they beat one (hw/settings.py reader_choice)
_MIN_FILE = 64 << 20
PASSES = 3
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def measure_disk(path: str | os.PathLike, file_bytes: int, chunk_sizes: list[int], read_budget: int,
                 log: Callable[[str], None] = lambda _: None) -> dict:
    """Disk figures for `path`: a file of file_bytes (less where the disk lacks room) read back cold.

    read_budget caps the bytes read per random-read measurement."""
    path = Path(path)
    wanted = file_bytes
    free = shutil.disk_usage(path).free
    file_bytes = min(file_bytes, free // 4) // _WRITE_BLOCK * _WRITE_BLOCK  # leave the disk most of its room
    if file_bytes < _MIN_FILE:
        raise EdgerunError(f"{path} has {format_size(free)} free; the disk test needs at least "
                           f"{format_size(4 * _MIN_FILE)}")
    if file_bytes < wanted:
        log(f"disk: only {format_size(free)} free, testing with a {format_size(file_bytes)} file "
            f"instead of {format_size(wanted)}")
    fd, name = tempfile.mkstemp(prefix=".edgerun-profile-", dir=path)
    try:
        _fill(fd, file_bytes)
        os.close(fd)
        fd = -1
        direct = supports_direct_io(name)
        log(f"disk: sequential read of {format_size(file_bytes)} ({'O_DIRECT' if direct else 'buffered'})")
        seq = _timed_reads(name, direct, [(o, _SEQ_BLOCK) for o in range(0, file_bytes, _SEQ_BLOCK)], 1)
        random_read = {}
        rng = random.Random(0)
        for chunk in chunk_sizes:
            chunk = min(chunk, file_bytes)
            log(f"disk: random {chunk >> 10} KiB reads")
            slots = list(range(file_bytes // chunk))
            n = max(min(len(slots), read_budget // chunk), 1)
            reads = [(s * chunk, chunk) for s in rng.sample(slots, n)]  # distinct: no read hits a cached slot
            # one reader and several, alternately, on PASSES slices of the reads: the median of each is steadier
            # than one long pass on disks whose speed drifts from second to second (shared or throttled ones)
            parts = [reads[i::PASSES] for i in range(PASSES)] if len(reads) >= 2 * PASSES else [reads]
            one, several = [], []
            for part in parts:
                one.append(_timed_reads(name, direct, part, 1))
                several.append(_timed_reads(name, direct, part, _PARALLEL_READERS))
            random_read[str(chunk)] = {
                "qd1_gbps": statistics.median(one),
                "parallel_gbps": statistics.median(several),
                "parallel_readers": _PARALLEL_READERS,
            }
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(name)
    return {"path": str(path), "direct_io": direct, "file_bytes": file_bytes, "seq_read_gbps": seq,
            "random_read": random_read}


def _fill(fd: int, nbytes: int) -> None:
    """Write nbytes of incompressible data, flushed to the device."""
    block = bytearray(os.urandom(_WRITE_BLOCK))
    for i in range(nbytes // _WRITE_BLOCK):
        block[:8] = i.to_bytes(8, "little")  # no two blocks alike, against deduplicating filesystems
        os.write(fd, block)
    os.fsync(fd)


def _drop_cache(name: str) -> None:
    fd = os.open(name, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _timed_reads(name: str, direct: bool, reads: list[tuple[int, int]], workers: int) -> float:
    """GB/s of the (offset, size) reads split over `workers` threads, from a cold page cache."""
    _drop_cache(name)
    fd = os.open(name, os.O_RDONLY | (_O_DIRECT if direct else 0))
    size = max(n for _, n in reads)
    bufs = [mmap.mmap(-1, size) for _ in range(workers)]  # page-aligned, as O_DIRECT needs
    try:
        def work(i: int) -> None:
            view = memoryview(bufs[i])
            for offset, n in reads[i::workers]:
                os.preadv(fd, [view[:n]], offset)  # releases the GIL: the reads overlap
            view.release()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        for b in bufs:
            b.close()
    return sum(n for _, n in reads) / seconds / 1e9
