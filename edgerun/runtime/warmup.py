"""Reading a memory-mapped store ahead at load: when every expert fits the budget, background threads read the
store's files in the order a token uses them (the dense tensors, then the experts layer by layer), so that the
page cache holds them before the first tokens touch them. Without it, a cold start pays a disk read for every
page the first tokens fault in, one small read at a time.

The files are read through mappings that ask for huge pages, every page touched in turn: the kernel then reads
them into 2 MiB folios, which the model's own mappings (store.map_file) map with one TLB entry each. A read()
would fill the page cache with folios of the readahead's size, mapped 4 KiB at a time ever after (decode of the
2.7 GB resident model: 48 -> 52 tok/s with the page cache filled this way). Two threads keep two files' reads in
flight, which a single faulting thread does not (0.5-1 GB/s alone, 2.9 GB/s with two, on the same disk)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from ..store.store import map_file

STEP = 2 << 20  # bytes touched between checks for stop()
PAGE = 4096
THREADS = 2


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
                for start in range(0, len(data), STEP):
                    if self._stop.is_set():
                        break
                    end = min(len(data), start + STEP)
                    int(data[start:end:PAGE].sum())  # one byte a page: the faults read the file
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
