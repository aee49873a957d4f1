"""Opening an expert store: metadata, integrity checks, and access to chunks by memory map (the reader in
runtime/reader.py reads them into cache slots).

Opening reads only metadata and the sizes of the chunk files; expert bytes are read when a chunk is
first used, and checked against its CRC32 then.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import zlib
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .layout import ExpertLayout, TensorLayout
from .lowbit import LowLayout, low_chunk_path

FORMAT_NAME = "edgerun-store"
FORMAT_VERSION = 2  # what conversions write: v2 chunks may hold the experts' biases (experts.biases in the metadata)
READ_VERSIONS = (1, 2)  # v1 stores have no expert biases and are read as they are
META_KEY = "edgerun"
TOKENIZER_DIR = "tokenizer"


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def map_file(path: Path, huge_pages: bool = False) -> np.ndarray:
    """A chunk file memory-mapped copy-on-write (the file is never written) as a plain uint8 ndarray (views of it
    are cheap to make). huge_pages asks for transparent huge pages before anything touches the mapping: pages the
    kernel reads for it then come in 2 MiB folios mapped by one TLB entry each (where the filesystem has large
    folios), instead of 512 entries of 4 KiB, which kernels streaming through gigabytes of weights miss on."""
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    handle = getattr(mapped, "_mmap", None)  # numpy's mmap object behind the array
    if huge_pages and handle is not None:
        _advise_huge_pages(handle)
    return mapped.view(np.ndarray)


def _advise_huge_pages(region: mmap.mmap) -> None:
    """Ask for transparent huge pages in a mapping nothing has touched yet; a kernel without them keeps 4 KiB
    pages, as without the advice."""
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass


def huge_page_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in anonymous memory advised to use transparent huge pages (as a resident store's mappings are),
    for weights that kernels stream through and that are made at load rather than mapped from the store."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < 1 << 21 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, dtype)
    region = mmap.mmap(-1, nbytes)
    _advise_huge_pages(region)
    return np.frombuffer(region, dtype=dtype).reshape(shape)


def is_store(path: str | os.PathLike) -> bool:
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    try:
        return META_KEY in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def expert_chunk_path(root: Path, layer: int, expert: int) -> Path:
    # zarr v3 default chunk key encoding for the [layers, experts, bytes] array with chunks [1, 1, bytes]
    return root / "experts" / "c" / str(layer) / str(expert) / "0"


def tensor_chunk_path(root: Path, name: str) -> Path:
    return root / "dense" / name / "c" / "0"


def drop_page_cache(directory: str | os.PathLike) -> int:
    """Ask the kernel to drop the files under directory (or that file) from the page cache (a cold start);
    returns their bytes. Pages mapped by a running process stay."""
    total = 0
    top = Path(directory)
    for path in [top] if top.is_file() else top.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


class ExpertStore:
    """A converted model on disk. Thread-safe for reads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            meta = json.loads((self.path / "zarr.json").read_text())["attributes"][META_KEY]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.path} is not an edgerun store ({type(e).__name__}: {e})") from None
        if meta.get("format") != FORMAT_NAME or meta.get("version") not in READ_VERSIONS:
            raise CheckpointError(
                f"{self.path} is a store of format {meta.get('format')} v{meta.get('version')}; this edgerun "
                f"reads {FORMAT_NAME} v{' and v'.join(map(str, READ_VERSIONS))}: convert the model again"
            )
        self.meta = meta
        self.config: dict = meta["config"]
        self.generation_config: dict = meta.get("generation_config", {})
        self.quant: dict = meta["quant"]
        ex = meta["experts"]
        self.moe_layers: list[int] = ex["layers"]
        self.num_experts: int = ex["num_experts"]
        self.expert_layout = ExpertLayout(ex["format"], ex["hidden"], ex["inter"], self.quant["group"],
                                          bool(ex.get("biases", False)))  # stores without the key have none
        self._expert_crc = {int(k): v for k, v in ex["crc32"].items()}
        # low-bit copies of the experts (store/lowbit.py), when made
        low = ex.get("low")
        self.low_layout = None
        if low is not None:
            self.low_layout = LowLayout(low["format"], self.expert_layout)
            self._low_crc = {int(k): v for k, v in low["crc32"].items()}
        self._maps: dict[tuple[int, int], np.ndarray] = {}
        # whether the store's mappings ask for huge pages: the loader sets it when the whole store stays mapped
        # (decode 8-10% faster); streaming from the disk measured slower with it (the dense tensors' folios)
        self.huge_pages = False
        self._views: dict[tuple[int, int], tuple] = {}
        self._lock = threading.Lock()
        self._check_files()

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def chunk_bytes(self) -> int:
        return self.expert_layout.nbytes

    def _check_files(self) -> None:
        """Every chunk file is there with its full size (a truncated file is caught here, cheaply)."""
        for name in self.tensor_names():
            self._check_size(tensor_chunk_path(self.path, name), self.tensor_layout(name).nbytes, f"tensor {name}")
        for layer in self.moe_layers:
            for e in range(self.num_experts):
                self._check_size(expert_chunk_path(self.path, layer, e), self.chunk_bytes,
                                 f"layer {layer} expert {e}")
                if self.low_layout is not None:
                    self._check_size(self.low_path(layer, e), self.low_layout.nbytes,
                                     f"layer {layer} expert {e}'s low-bit copy")

    def _check_size(self, path: Path, want: int, what: str) -> None:
        try:
            got = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"store {self.path} is missing the chunk of {what} ({path})") from None
        if got != want:
            raise CheckpointError(
                f"store {self.path}: the chunk of {what} has {got} bytes, expected {want} (truncated or damaged; "
                f"convert again)"
            )

    # -- experts -----------------------------------------------------------------------------------------
    def expert_path(self, layer: int, expert: int) -> Path:
        return expert_chunk_path(self.path, layer, expert)

    def low_path(self, layer: int, expert: int) -> Path:
        return low_chunk_path(self.path, layer, expert)

    def verify_expert(self, layer: int, expert: int, data: np.ndarray, low: bool = False) -> None:
        if crc32(data) != (self._low_crc if low else self._expert_crc)[layer][expert]:
            path = self.low_path(layer, expert) if low else self.expert_path(layer, expert)
            raise CheckpointError(
                f"store {self.path}: checksum mismatch in layer {layer} expert {expert} ({path}); the file is "
                f"damaged, convert the model again" + (" or make the low-bit copies again" if low else "")
            )

    def map_expert(self, layer: int, expert: int) -> np.ndarray:
        """The chunk memory-mapped (uint8, copy-on-write: the file is never written), checked against its
        checksum on first access."""
        key = (layer, expert)
        chunk = self._maps.get(key)
        if chunk is None:
            with self._lock:
                chunk = self._maps.get(key)
                if chunk is None:
                    # a plain ndarray over the mapping: views of it are cheap to make
                    chunk = map_file(self.expert_path(layer, expert), self.huge_pages)
                    self.verify_expert(layer, expert, chunk)
                    self._maps[key] = chunk
        return chunk

    def expert_biases(self, layer: int, expert: int) -> list[np.ndarray]:
        """[gate_up bias, down bias] of an expert as float32 arrays over its memory map; [] for experts without."""
        if not self.expert_layout.biases:
            return []
        return self.expert_layout.bias_views(self.map_expert(layer, expert))

    def expert_views(self, layer: int, expert: int):
        """(gate_up sections, down sections) of an expert as arrays over its memory map."""
        views = self._views.get((layer, expert))
        if views is None:
            views = self._views[(layer, expert)] = self.expert_layout.views(self.map_expert(layer, expert))
        return views

    # -- other tensors -----------------------------------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self.meta["tensors"])

    def tensor_layout(self, name: str) -> TensorLayout:
        info = self.meta["tensors"][name]
        return TensorLayout(info["format"], tuple(info["shape"]), self.quant["group"])

    def tensor_views(self, name: str) -> list[np.ndarray]:
        """The sections of a non-expert tensor, memory-mapped copy-on-write, checked against its checksum."""
        data = map_file(tensor_chunk_path(self.path, name), self.huge_pages)
        if crc32(data) != self.meta["tensors"][name]["crc32"]:
            raise CheckpointError(
                f"store {self.path}: checksum mismatch in tensor {name}; the file is damaged, convert again"
            )
        return self.tensor_layout(name).views(data)
