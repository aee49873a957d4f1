"""Reading a memory-mapped store ahead at load: when every expert fits the budget, a background thread reads the
store's files in the order a token uses them (the dense tensors, then the experts layer by layer), so that the
page cache holds them before the first tokens touch them. Without it, a cold start pays a disk read for every
page the first tokens fault in, one small read at a time."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from .reader import PIECE


class PageCacheWarmer:
    """Reads `paths` start to end, one after the other, on a daemon thread; `stop()` ends it at the next piece."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.bytes = 0
        self.seconds = 0.0
        self.done = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgerun-warmup", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t0 = time.perf_counter()
        buf = bytearray(PIECE)
        try:
            for path in self.paths:
                with open(path, "rb", buffering=0) as f:
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                    while not self._stop.is_set():
                        n = f.readinto(buf)
                        if not n:
                            break
                        self.bytes += n
                if self._stop.is_set():
                    return
            self.done = True
        except OSError as e:  # the model still runs; its pages are read when touched
            self.error = str(e)
        finally:
            self.seconds = time.perf_counter() - t0

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
