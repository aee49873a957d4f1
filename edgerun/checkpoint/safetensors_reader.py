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
    """Tensor names -> shard files of a checkpoint directory; shapes and dtypes without reading data.

    keep_open=False maps a file only while one tensor is read from it, so that streaming through a
    checkpoint (conversion) does not keep its pages mapped and counted in the process's memory.
    """

    def __init__(self, model_dir: str | Path, keep_open: bool = True):
        self.dir = Path(model_dir)
        self.keep_open = keep_open
        self._handles: dict[Path, object] = {}
        self.location: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # name -> (shape, safetensors dtype)
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
            handle = self._open(path)
            for name in handle.keys():
                info = handle.get_slice(name)
                self.location[name] = path
                self._meta[name] = (tuple(info.get_shape()), info.get_dtype())
            if keep_open:
                self._handles[path] = handle

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is not None:
            return handle
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self.location)

    def file_of(self, name: str) -> Path:
        return self.location[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype | None:
        return DTYPES.get(self._meta[name][1])

    def common_dtype(self) -> torch.dtype | None:
        """The dtype every float tensor of the checkpoint has, or None when they differ."""
        stored = {self.dtype(n) for n in self.names()} - {None}
        return stored.pop() if len(stored) == 1 else None

    def nbytes(self, name: str) -> int:
        shape, dtype = self._meta[name]
        n = 1
        for d in shape:
            n *= d
        return n * _ITEMSIZE.get(dtype, 1)

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or only its slice [index] along the first dimension (one expert of a fused tensor)."""
        path = self.location[name]
        dtype = self._meta[name][1]
        if dtype not in DTYPES:
            raise CheckpointError(
                f"tensor {name} in {path.name} has dtype {dtype}; edgerun reads BF16, F16 and F32 checkpoints"
            )
        try:
            handle = self._open(path)
            if index is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[index]
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {path} ({e})") from None

    def close(self) -> None:
        self._handles.clear()
