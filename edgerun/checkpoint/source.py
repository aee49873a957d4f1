"""Where a model's weights come from: a Hugging Face checkpoint (a directory, or a repo id in the local cache), or
Grok-1 as xai-org released it (`ckpt-0/`, see grok1_release). `locate` finds one (by path, or by repo id in the HF
cache) and reads its config without touching any weights; `Checkpoint.reader` opens its tensors."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..models import spec_from_config
from ..models.spec import ModelSpec
from . import grok1_release
from .hf import read_json, resolve_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.tok.json")
_HF_SUFFIXES = (".safetensors", ".json", ".model", ".jinja")


@dataclass
class Checkpoint:
    dir: Path  # the model's folder: names it in messages and in the conversion cache
    config: dict  # config.json, or the equivalent one for Grok-1 as released
    config_source: str  # where the config comes from, for messages
    files: list[Path]  # what a conversion reads (weights, config, tokenizer): its size and fingerprint
    tokenizer_dir: Path | None
    tokenizer_files: list[Path]
    generation_config: dict = field(default_factory=dict)
    tokenizer_defaults: dict = field(default_factory=dict)  # tokenizer_config.json values a file may override
    release: tuple | None = None  # (root, ckpt-0, Grok1Config) for xai-org's Grok-1 release
    family: ModuleType = field(init=False)
    spec: ModelSpec = field(init=False)

    def __post_init__(self):
        self.family, self.spec = spec_from_config(self.config, self.config_source)

    def reader(self, keep_open: bool = True):
        """The checkpoint's tensors (SafetensorsReader, or Grok1Release with the same interface); every file is
        checked (present, readable, of the expected shape) before this returns."""
        if self.release is not None:
            return grok1_release.Grok1Release(*self.release)
        from .safetensors_reader import SafetensorsReader

        return SafetensorsReader(self.dir, keep_open=keep_open, split=getattr(self.family, "TP_SPLIT", ()))

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def fingerprint(self) -> str:
        """Identifies the contents cheaply: names, sizes and mtimes of the files."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.relative_to(self.dir) if f.is_relative_to(self.dir) else f.name}:{st.st_size}:"
                     f"{st.st_mtime_ns};".encode())
        return h.hexdigest()


def locate(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at path: a Hugging Face model directory or repo id, or Grok-1's release folder (the one
    holding ckpt-0/, or ckpt-0/ itself). Raises ModelNotFoundError when path is neither."""
    release = grok1_release.find_release(path)
    if release is not None:
        return _release(*release)
    model_dir = resolve_model_dir(path)
    release = grok1_release.find_release(model_dir)  # a repo id whose snapshot in the HF cache is the release
    if release is not None:
        return _release(*release)
    files = sorted(f for f in model_dir.iterdir() if f.is_file() and f.suffix in _HF_SUFFIXES)
    return Checkpoint(
        dir=model_dir, config=read_json(model_dir / "config.json"), config_source=str(model_dir / "config.json"),
        files=files, tokenizer_dir=model_dir,
        tokenizer_files=[model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()],
        generation_config=read_json(model_dir / "generation_config.json", required=False))


def _release(root: Path, ckpt: Path) -> Checkpoint:
    config = grok1_release.read_config(root)
    config_file = root / grok1_release.CONFIG_FILE
    tokenizer = grok1_release.tokenizer_path(root)
    files = sorted(f for f in ckpt.iterdir() if f.is_file())
    files += [f for f in (config_file, tokenizer) if f.is_file()]
    source = str(config_file) if config_file.is_file() else f"{ckpt} (Grok-1 as released)"
    return Checkpoint(dir=root, config=config.hf_config(), config_source=source, files=files,
                      tokenizer_dir=tokenizer.parent, tokenizer_files=[tokenizer],
                      tokenizer_defaults=grok1_release.TOKENIZER_CONFIG, release=(root, ckpt, config))
