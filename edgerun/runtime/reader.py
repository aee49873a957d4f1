"""Background reads of expert chunks from the store into caller-owned slot buffers.

A request reads one chunk in pieces of PIECE bytes (a speculative read in smaller ones). Demand reads (the layer
is waiting) go ahead of prefetches, and prefetches ahead of speculative reads, also of one already under way:
between two pieces a worker hands a read back to the queue when one of a higher priority is waiting. Within a
priority the read of the earliest layer goes first: a token needs its layers in that order. A queued
or running prefetch can be cancelled; a cancelled read stops at the next piece. Chunks are read with O_DIRECT
where the filesystem allows (no second copy in the page cache), else buffered, dropping the pages from the page
cache after each chunk. Nothing is allocated per read besides the request object: the buffers are the cache's slots.

A low read takes an expert's low-bit copy (store/lowbit.py) instead: the worker reads it into its own staging
buffer, in one go (it is smaller than a chunk, so it never makes way for a demand read), and expands it into the
slot as an ordinary q4 chunk.
"""

from __future__ import annotations

import heapq
import mmap
import os
import threading
import time

import numpy as np

from ..errors import CheckpointError
from ..store.store import ExpertStore

PIECE = 4 << 20  # bytes per read call: how long a demand read may wait behind a running prefetch
SPECULATIVE_PIECE = 1 << 20  # the same behind a running speculative read
DEMAND, PREFETCH, SPECULATIVE = 0, 1, 2  # priorities: a speculative read goes after every prefetch
QUEUED, RUNNING, DONE, FAILED, CANCELLED = range(5)
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class ReadRequest:
    __slots__ = ("key", "layer", "expert", "buf", "priority", "seq", "state", "offset", "error", "done", "low")

    def __init__(self, key, layer: int, expert: int, buf: np.ndarray, priority: int, seq: int, low: bool = False):
        self.key, self.layer, self.expert, self.buf = key, layer, expert, buf
        self.priority, self.seq, self.low = priority, seq, low
        self.state, self.offset, self.error = QUEUED, 0, None
        self.done = threading.Event()

    def __lt__(self, other: ReadRequest) -> bool:
        return (self.priority, self.layer, self.seq) < (other.priority, other.layer, other.seq)


def supports_direct_io(path: str | os.PathLike) -> bool:
    """Whether an O_DIRECT read of the file's first 4096 bytes works on its filesystem."""
    if not _O_DIRECT:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECT)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, 4096) as page:  # page-aligned, as O_DIRECT needs
            return os.preadv(fd, [page], 0) >= 0
    except OSError:
        return False
    finally:
        os.close(fd)


class ExpertReader:
    """A pool of reader threads over one store. Thread-safe."""

    def __init__(self, store: ExpertStore, workers: int = 1, direct: bool | None = None, verify: bool = True):
        self.store = store
        first = store.expert_path(store.moe_layers[0], 0)
        self.direct = supports_direct_io(first) if direct is None else direct
        self.verify = verify
        self._verified: set[tuple[int, int]] = set()
        self._heap: list[ReadRequest] = []
        self._cv = threading.Condition()
        self._seq = 0
        self._closed = False
        self.bytes_read = 0
        self.read_seconds = 0.0  # time the workers spent in read calls, summed over them
        self.reads = 0
        self._staging = threading.local()  # each worker's buffer for low reads
        self._threads = [threading.Thread(target=self._work, name=f"edgerun-reader-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    # -- client side ------------------------------------------------------------------------------------------
    def submit(self, key, layer: int, expert: int, buf: np.ndarray, demand: bool, low: bool = False,
               speculative: bool = False) -> ReadRequest:
        """Read the chunk of layer's expert (or its low-bit copy, expanded) into buf: a demand read, a prefetch, or
        (speculative) a read behind every prefetch that makes way for them as a prefetch makes way for a demand."""
        with self._cv:
            if self._closed:
                raise RuntimeError("the reader is closed")
            self._seq += 1
            priority = DEMAND if demand else SPECULATIVE if speculative else PREFETCH
            req = ReadRequest(key, layer, expert, buf, priority, self._seq, low)
            heapq.heappush(self._heap, req)
            self._cv.notify()
        return req

    def promote(self, req: ReadRequest, priority: int = DEMAND) -> None:
        """A prefetch the model now waits for becomes a demand read (or a speculative read a prefetch)."""
        with self._cv:
            if req.priority <= priority or req.state not in (QUEUED, RUNNING):
                return
            req.priority = priority
            if req.state == QUEUED:
                heapq.heapify(self._heap)
            self._cv.notify()

    def cancel(self, req: ReadRequest) -> None:
        """Stop a read whose data is no longer wanted; returns once no worker writes into its buffer."""
        with self._cv:
            if req.state == QUEUED:
                req.state = CANCELLED
                self._heap.remove(req)
                heapq.heapify(self._heap)
                req.done.set()
                return
            if req.state == RUNNING:
                req.state = CANCELLED  # the worker stops at the end of its current piece
        req.done.wait()

    def wait(self, req: ReadRequest) -> None:
        """Block until the read is done; a failed read raises CheckpointError naming the chunk."""
        if not req.done.is_set():
            self.promote(req)
            req.done.wait()
        if req.state == FAILED:
            raise req.error
        if req.state == CANCELLED:
            raise RuntimeError(f"read of layer {req.layer} expert {req.expert} was cancelled")

    def queued(self) -> int:
        with self._cv:
            return len(self._heap)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for req in self._heap:
                req.state = CANCELLED
                req.done.set()
            self._heap.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)

    # -- worker side ------------------------------------------------------------------------------------------
    def _next(self) -> ReadRequest | None:
        with self._cv:
            while not self._heap and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            req = heapq.heappop(self._heap)
            req.state = RUNNING
            return req

    def _work(self) -> None:
        while (req := self._next()) is not None:
            try:
                finished = self._read(req)
            except Exception as e:  # noqa: BLE001 - any failure is handed to the waiting thread
                finished = False
                req.error = e if isinstance(e, CheckpointError) else CheckpointError(
                    f"store {self.store.path}: reading layer {req.layer} expert {req.expert} failed "
                    f"({type(e).__name__}: {e})")
                with self._cv:
                    req.state = FAILED
                    req.done.set()
            if finished:
                with self._cv:
                    if req.state == RUNNING:
                        req.state = DONE
                    req.done.set()

    def _read(self, req: ReadRequest) -> bool:
        """Read pieces until the chunk is complete (True), or the request is cancelled or yields to a demand
        read (False). req.offset counts the bytes of the file read; a complete request's slot holds a whole chunk
        (offset = chunk bytes), a low read's once expanded."""
        low = req.low
        size = self.store.low_layout.nbytes if low else self.store.chunk_bytes
        path = (self.store.low_path if low else self.store.expert_path)(req.layer, req.expert)
        buf = self._staging_buffer(size) if low else req.buf
        fd = os.open(path, os.O_RDONLY | (_O_DIRECT if self.direct else 0))
        try:
            view = memoryview(buf)[:size]
            while req.offset < size:
                with self._cv:
                    if req.state == CANCELLED:
                        req.done.set()
                        return False
                    if not low and self._heap and self._heap[0].priority < req.priority:
                        req.state = QUEUED  # make way; resumes at req.offset
                        heapq.heappush(self._heap, req)
                        return False
                end = min(size, req.offset + (SPECULATIVE_PIECE if req.priority == SPECULATIVE else PIECE))
                t0 = time.perf_counter()
                n = os.preadv(fd, [view[req.offset:end]], req.offset)
                self.read_seconds += time.perf_counter() - t0
                if n <= 0:
                    raise CheckpointError(f"store {self.store.path}: layer {req.layer} expert {req.expert} is "
                                          f"shorter than a chunk ({req.offset} of {size} bytes; file damaged?)")
                req.offset += n
                self.bytes_read += n
            if not self.direct:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the slot holds it: not twice in RAM
        finally:
            os.close(fd)
        self.reads += 1
        key = (req.layer, req.expert, low)
        if self.verify and key not in self._verified:
            self.store.verify_expert(req.layer, req.expert, buf[:size], low=low)
            self._verified.add(key)
        if low:
            self.store.low_layout.expand(buf[:size], req.buf[:self.store.chunk_bytes])
            req.offset = self.store.chunk_bytes
        return True

    def _staging_buffer(self, size: int) -> np.ndarray:
        buf = getattr(self._staging, "buf", None)
        if buf is None:
            self._staging.mem = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs
            buf = self._staging.buf = np.frombuffer(self._staging.mem, dtype=np.uint8)
        return buf
