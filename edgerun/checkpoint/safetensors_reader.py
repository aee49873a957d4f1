"""Lazy access to the tensors of a HF safetensors checkpoint: one file, several, or sharded with an index.

Files are memory-mapped by `safetensors`; a tensor's bytes are read only when it is asked for, one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2, "I16": 2, "U16": 2}


class SafetensorsReader:
    """Tensor names -> shard files of a checkpoint directory; shapes and dtypes without reading data."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self._handles: dict[Path, object] = {}
        self.location: dict[str, Path] = {}
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.dir / shard).is_file():
                    raise CheckpointError(f"shard {shard} named in {index} is missing from {self.dir}")
            files = sorted({self.dir / f for f in weight_map.values()})
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no .safetensors files in {self.dir}")
        for path in files:
            for name in self._open(path).keys():
                self.location[name] = path

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
                raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
            self._handles[path] = handle
        return handle

    def names(self) -> list[str]:
        return list(self.location)

    def file_of(self, name: str) -> Path:
        return self.location[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.location[name]).get_slice(name).get_shape())

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or only its slice [index] along the first dimension (one expert of a fused tensor)."""
        path = self.location[name]
        dtype = self._open(path).get_slice(name).get_dtype()
        if dtype not in DTYPES:
            raise CheckpointError(
                f"tensor {name} in {path.name} has dtype {dtype}; edgerun reads BF16, F16 and F32 checkpoints"
            )
        try:
            if index is None:
                return self._open(path).get_tensor(name)
            return self._open(path).get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {path} ({e})") from None

    def nbytes(self, name: str) -> int:
        shape, dtype = self.shape(name), self._open(self.location[name]).get_slice(name).get_dtype()
        n = 1
        for d in shape:
            n *= d
        return n * _ITEMSIZE.get(dtype, 1)

    def dtype(self, name: str) -> torch.dtype | None:
        return DTYPES.get(self._open(self.location[name]).get_slice(name).get_dtype())

    def close(self) -> None:
        self._handles.clear()
