"""Reading a memory-mapped store ahead at load: when every expert fits the budget, background threads read the
store's files in the order a token uses them (the dense tensors, then the experts layer by layer), so that the
page cache holds them before the first tokens touch them. Without it, a cold start pays a disk read for every
page the first tokens fault in, one small read at a time.

The files are read through mappings that ask for huge pages, range by range (MADV_POPULATE_READ): the kernel
then reads them into 2 MiB folios, which the model's own mappings (store.map_file) map with one TLB entry each. A
read() would fill the page cache with folios of the readahead's size, mapped 4 KiB at a time ever after (decode of
the 2.7 GB resident model: 48 -> 52 tok/s with the page cache filled this way). Two threads keep two files' reads
in flight, which a single faulting thread does not (about 1 GB/s alone, 2.9 GB/s with two, on the same disk)."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ..store.store import map_file

STEP = 2 << 20  # bytes read between checks for stop()
THREADS = 2


_POPULATE_READ = 22  # MADV_POPULATE_READ (Linux 5.14): fault a range in, an error instead of SIGBUS past a file's end
_populate_ok = sys.platform.startswith("linux")
_libc = None


def _populate(view: np.ndarray) -> bool:
    """Fault the pages of a mapped range in (through its mapping, so in the folios the mapping asks for), in one
    madvise call that leaves the GIL free; False where the kernel cannot, so that the caller reads the range instead.
    A file cut short while mapped (it happens: a store rewritten under a running model) gives an OSError, where
    touching its pages would kill the process with SIGBUS."""
    global _populate_ok, _libc
    if not _populate_ok:
        return False
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if _libc.madvise(view.ctypes.data, view.size, _POPULATE_READ) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EINVAL:  # an older kernel
        _populate_ok = False
        return False
    raise OSError(err, f"reading ahead: {os.strerror(err)}")


class PageCacheWarmer:
    """Reads `paths` start to end on THREADS daemon threads, each taking the next file in order; `stop()` ends
    them at the next STEP bytes."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.bytes = 0
        self.seconds = 0.0
        self.done = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0  # index in paths of the next file to take
        self._running = THREADS
        self._t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, name="edgerun-warmup", daemon=True)
                         for _ in range(THREADS)]
        for t in self._threads:
            t.start()

    def _take(self) -> Path | None:
        with self._lock:
            if self._next >= len(self.paths) or self._stop.is_set() or self.error:
                return None
            self._next += 1
            return self.paths[self._next - 1]

    def _run(self) -> None:
        error = None
        try:
            while (path := self._take()) is not None:
                if not path.stat().st_size:
                    continue  # nothing to read, and nothing numpy can map
                data = map_file(path, huge_pages=True)
                with open(path, "rb", buffering=0) as f:  # for kernels without MADV_POPULATE_READ
                    for start in range(0, len(data), STEP):
                        if self._stop.is_set():
                            break
                        end = min(len(data), start + STEP)
                        if not _populate(data[start:end]):
                            os.pread(f.fileno(), end - start, start)  # into the page cache the plain way
                        with self._lock:
                            self.bytes += end - start
                del data
        except (OSError, ValueError) as e:  # the model still runs; its pages are read when touched
            error = str(e)
        with self._lock:
            self.error = self.error or error
            self._running -= 1
            if not self._running:
                self.seconds = time.perf_counter() - self._t0
                self.done = not self._stop.is_set() and self.error is None

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict:
        return {"bytes": self.bytes, "seconds": round(self.seconds, 3), "done": self.done, "error": self.error}


def store_files(store, dense: bool = True) -> list[Path]:
    """A store's files in the order a token uses them: the dense tensors (unless `dense` is False: they were
    copied elsewhere), then each MoE layer's experts."""
    from ..store.store import expert_chunk_path, tensor_chunk_path

    first = [tensor_chunk_path(store.path, name) for name in store.tensor_names()] if dense else []
    return first + [expert_chunk_path(store.path, layer, e) for layer in store.moe_layers
                    for e in range(store.num_experts)]
