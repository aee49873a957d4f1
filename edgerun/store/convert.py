"""`edgerun convert`: a checkpoint (Hugging Face, or Grok-1 as xai-org released it) -> an expert store, streamed
tensor by tensor.

The store is written into DST.partial and renamed to DST only once every chunk has been written and read
back against its checksum. A progress log in DST.partial lets an interrupted conversion resume without
redoing finished chunks; the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..checkpoint.loader import CheckpointTensors
from ..checkpoint.source import Checkpoint, locate
from ..errors import ArgumentError, CheckpointError, EdgerunError
from ..progress import ByteProgress
from ..runtime.placement import ModelLayout
from .layout import QUANTIZED, TORCH_FORMAT
from .store import FORMAT_NAME, FORMAT_VERSION, META_KEY, TOKENIZER_DIR, crc32, expert_chunk_path, tensor_chunk_path

QUANT_CHOICES = ("none", "bf16", "q8", "q4", "mxfp4")
DENSE_CHOICES = ("q8", "q4", "bf16", "none")
SETTINGS_FILE = "edgerun-conversion.json"
LOG_FILE = "edgerun-progress.jsonl"


def check_choices(quant: str | None, dense: str | None) -> None:
    """A --quant / --dense choice (None: not given) is one edgerun knows, or ArgumentError."""
    if quant is not None and quant not in QUANT_CHOICES:
        raise ArgumentError(f"quant must be one of {', '.join(QUANT_CHOICES)}; got {quant!r}")
    if dense is not None and dense not in DENSE_CHOICES:
        raise ArgumentError(f"dense must be one of {', '.join(DENSE_CHOICES)}; got {dense!r}")


def formats_for(quant: str, dense: str | None, source: str) -> tuple[str, str]:
    """(expert format, dense-matrix format) for a --quant/--dense choice; source: the checkpoint's format."""
    check_choices(quant, dense)
    experts = {"none": source, "bf16": "bf16"}.get(quant, quant)
    if dense is None:
        dense = {"none": "none", "bf16": "bf16"}.get(quant, "q8")
    return experts, source if dense == "none" else dense


class _Conversion:
    """What to write: every tensor's layout and the expert chunk layout, from the checkpoint and options. Every
    tensor the model needs is checked (present, right shape) before anything is written."""

    def __init__(self, source: Checkpoint, quant: str, dense: str | None, group: int):
        if group % 32 or group <= 0:
            raise ArgumentError(f"group must be a positive multiple of 32; got {group}")
        if quant == "mxfp4" and group != 32:
            raise ArgumentError(f"mxfp4 experts have groups of 32; got --group {group}")
        self.source = source
        self.config, self.family, self.spec = source.config, source.family, source.spec
        self.reader = source.reader(keep_open=False)
        self.tensors = CheckpointTensors(self.reader, self.spec, self.family.RULES)
        self.tensors.check()
        self.source_format = TORCH_FORMAT.get(self.reader.common_dtype(), "f32")
        self.expert_format, self.dense_format = formats_for(quant, dense, self.source_format)
        self.quant, self.group = quant, group
        self.layout = ModelLayout.for_formats(self.spec, self.expert_format, self.dense_format, group)
        self.expert_layout = self.layout.expert_layout
        self.layouts = self.layout.tensors
        self.fingerprint = source.fingerprint()

    def describe(self) -> dict:
        return {"source_fingerprint": self.fingerprint, "quant": self.quant, "experts": self.expert_format,
                "dense": self.dense_format, "group": self.group, "version": FORMAT_VERSION}

    def items(self) -> list[str]:
        return [f"dense/{n}" for n in self.layouts] + [
            f"expert/{layer}/{e}" for layer in self.tensors.moe_layers for e in range(self.layout.stored_experts)]

    def item_bytes(self, item: str) -> int:
        if _expert_of(item) is None:
            return self.reader.nbytes(self.tensors.names[item[6:]])
        return 3 * self.spec.hidden_size * self.spec.moe_intermediate_size * (2 if self.source_format != "f32" else 4)

    @property
    def quantized(self) -> bool:
        return self.expert_format in QUANTIZED or self.dense_format in QUANTIZED

    def compute_dtype(self) -> str:
        return str(self.layout.compute_dtype).removeprefix("torch.")


def convert(src: str | os.PathLike | Checkpoint, dst: str | os.PathLike, quant: str = "q4", dense: str | None = None,
            group: int = 32, progress: bool | None = None,
            on_item: Callable[[str], None] | None = None) -> Path:
    """Convert a checkpoint into an expert store at dst; returns dst. src: a HF checkpoint directory, a repo id
    in the HF cache, Grok-1 as xai-org released it (the folder holding ckpt-0/, or ckpt-0/ itself), or a
    Checkpoint already located.

    quant: none (the checkpoint's own precision), bf16, q8, q4 (experts q4, other matrices q8) or mxfp4 (experts
    in gpt-oss's 4.25-bit format, other matrices q8; an MXFP4 release's values are kept exactly);
    dense: override the format of the non-expert matrices (q8, q4, bf16, none).
    on_item is called after each chunk is durably recorded (progress reporting).
    """
    dst = Path(dst)
    if dst.exists():
        raise EdgerunError(f"{dst} already exists; remove it or choose another destination")
    source = src if isinstance(src, Checkpoint) else locate(src)
    job = _Conversion(source, quant, dense, group)
    partial = dst.with_name(dst.name + ".partial")
    done = _prepare(partial, job)
    quantize = None
    if job.quantized:
        from .. import native

        native.warmup()
        quantize = native.quantize

    items = [i for i in job.items() if i not in done]
    total = sum(job.item_bytes(i) for i in job.items())
    try:
        with ByteProgress(total, f"converting {source.dir.name}", enabled=progress) as bar, \
                open(partial / LOG_FILE, "a") as log, ThreadPoolExecutor(1) as reader:
            bar.update(sum(job.item_bytes(i) for i in done))
            # read the next item's tensors while the current one is quantized and written
            pending = reader.submit(_read, job, items[0]) if items else None
            for n, item in enumerate(items):
                tensors = pending.result()
                pending = reader.submit(_read, job, items[n + 1]) if n + 1 < len(items) else None
                checksum = _write(job, partial, item, tensors, quantize)
                log.write(json.dumps({"item": item, "crc32": checksum}) + "\n")
                log.flush()
                os.fsync(log.fileno())
                done[item] = checksum
                bar.update(job.item_bytes(item))
                if on_item:
                    on_item(item)
    except OSError as e:
        raise EdgerunError(f"writing {partial} failed ({e}); run the same command again to resume") from None
    _verify(partial, job, done)
    _finish(partial, job, done)
    os.replace(partial, dst)
    return dst


def _prepare(partial: Path, job: _Conversion) -> dict[str, int]:
    """Create partial (or reopen it to resume); returns the items already written, with their checksums."""
    import zarr

    settings_file = partial / SETTINGS_FILE
    if partial.exists():
        try:
            previous = json.loads(settings_file.read_text())
        except (OSError, ValueError):
            previous = None
        if previous != job.describe():
            raise EdgerunError(
                f"{partial} holds an unfinished conversion with other settings or another source; "
                f"remove it to start again"
            )
        done = {}
        for line in (partial / LOG_FILE).read_text().splitlines() if (partial / LOG_FILE).exists() else []:
            try:
                entry = json.loads(line)
                done[entry["item"]] = entry["crc32"]
            except (ValueError, KeyError):
                break  # a line cut short by the interruption: everything after it is redone
        return done
    partial.mkdir(parents=True)
    root = zarr.open_group(str(partial), mode="w", zarr_format=3)
    spec = job.spec
    if job.tensors.moe_layers:
        nbytes = job.expert_layout.nbytes
        root.create_array(name="experts", shape=(spec.num_layers, job.layout.stored_experts, nbytes),
                          chunks=(1, 1, nbytes), dtype="uint8", compressors=None, fill_value=0)
    dense = root.create_group("dense")
    for name, layout in job.layouts.items():
        dense.create_array(name=name, shape=(layout.nbytes,), chunks=(layout.nbytes,), dtype="uint8",
                           compressors=None, fill_value=0)
    tok = partial / TOKENIZER_DIR
    tok.mkdir()
    for f in job.source.tokenizer_files:
        shutil.copyfile(f, tok / f.name)
    if job.source.tokenizer_defaults and not (tok / "tokenizer_config.json").exists():
        (tok / "tokenizer_config.json").write_text(json.dumps(job.source.tokenizer_defaults, indent=1))
    settings_file.write_text(json.dumps(job.describe(), indent=1))
    return {}


def _expert_of(item: str) -> tuple[int, int] | None:
    """(layer, expert) of an "expert/L/E" work item; None for a "dense/NAME" one."""
    if item.startswith("dense/"):
        return None
    _, layer, e = item.split("/")
    return int(layer), int(e)


def _read(job: _Conversion, item: str):
    expert = _expert_of(item)
    return (job.tensors.dense(item[6:]),) if expert is None else job.tensors.expert(*expert)


def _write(job: _Conversion, partial: Path, item: str, tensors, quantize) -> int:
    import zarr

    expert = _expert_of(item)
    if expert is None:
        name = item[6:]
        layout = job.layouts[name]
        buf = np.zeros(layout.nbytes, dtype=np.uint8)
        layout.pack(tensors[0], buf, quantize)
        array, index = str(partial / "dense" / name), slice(None)
    else:
        buf = job.expert_layout.pack(*tensors, quantize=quantize)
        array, index = str(partial / "experts"), (*expert, slice(None))
    # every chunk is written, all-zero ones included: the store's files are its contents
    with zarr.config.set({"array.write_empty_chunks": True}):
        zarr.open_array(array, mode="r+")[index] = buf
    return crc32(buf)


def _verify(partial: Path, job: _Conversion, done: dict[str, int]) -> None:
    """Read every chunk back from disk and compare with the checksum recorded when it was written."""
    for item in job.items():
        expert = _expert_of(item)
        path = tensor_chunk_path(partial, item[6:]) if expert is None else expert_chunk_path(partial, *expert)
        if not path.is_file() or _read_back(path) != done[item]:
            raise CheckpointError(f"verification of {path} failed after writing; the disk may be failing")


def _read_back(path: Path) -> int:
    """CRC32 of a file as the disk holds it: written back, dropped from the page cache, read, and dropped again. The
    store's pages are best brought in by the model's own mappings, which ask for huge pages (store.map_file); pages
    a write or a read() left in the page cache would stay there in small folios, 4 KiB to a TLB entry."""
    drop = getattr(os, "posix_fadvise", None)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        if drop:
            drop(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        checksum = crc32(np.fromfile(f, dtype=np.uint8))
        if drop:
            drop(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return checksum


def _finish(partial: Path, job: _Conversion, done: dict[str, int]) -> None:
    import zarr

    spec = job.spec
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": job.config,
        "generation_config": job.source.generation_config,
        "quant": {"name": job.quant, "experts": job.expert_format, "dense": job.dense_format,
                  "group": job.group},
        "compute_dtype": job.compute_dtype(),
        "source": {"name": job.source.dir.name, "fingerprint": job.fingerprint, "format": job.source_format},
        "tensors": {name: {"format": layout.fmt, "shape": list(layout.shape), "crc32": done[f"dense/{name}"]}
                    for name, layout in job.layouts.items()},
        "experts": {
            "format": job.expert_format, "hidden": spec.hidden_size, "inter": spec.moe_intermediate_size,
            "biases": job.expert_layout.biases,
            "num_experts": job.layout.stored_experts, "layers": job.tensors.moe_layers,
            "crc32": {str(layer): [done[f"expert/{layer}/{e}"] for e in range(job.layout.stored_experts)]
                      for layer in job.tensors.moe_layers},
        },
    }
    zarr.open_group(str(partial), mode="r+").attrs[META_KEY] = meta
    (partial / SETTINGS_FILE).unlink()
    (partial / LOG_FILE).unlink()


def cached_store_path(source: Checkpoint, quant: str, dense: str | None, group: int) -> Path:
    """Where edgerun.load(checkpoint, quant=...) keeps its automatic conversion."""
    from ..paths import cache_dir

    key = hashlib.sha256(f"{source.dir.resolve()}|{source.fingerprint()}".encode()).hexdigest()[:12]
    suffix = f"{quant}" + (f"-dense-{dense}" if dense else "") + (f"-g{group}" if group != 32 else "")
    return cache_dir() / "stores" / f"{source.dir.name}-{key}-{suffix}"
