"""Lazy access to the tensors of a HF safetensors checkpoint: one file, several, sharded with an index, or
pre-sharded for tensor parallelism.

Files are memory-mapped by `safetensors`; a tensor's bytes are read only when it is asked for, one at a time.
A tensor-parallel release (`*-TP-common.safetensors` beside `*-TP-000.safetensors`, `*-TP-001...`) holds some
tensors as one slice per rank file: the model family says along which dimension they join (`split` rules), and
the reader hands out the joined tensor.

Float8 checkpoints as DeepSeek and Moonshot publish them (DeepSeek-V3, R1, Kimi-K2) hold most matrices as float8
e4m3 with a float32 `<name>_scale_inv` beside each: one factor per 128 x 128 block. The reader hands such a matrix
out multiplied by its factors and cast to bfloat16, as the publisher's own cast to bfloat16 does, 128 rows at a
time; the factor tensors themselves are not listed among the names.

MXFP4 tensors as OpenAI publishes gpt-oss's experts (`<name>_blocks` [..., G, 16] bytes, two 4-bit E2M1 values
each, low nibble first, and `<name>_scales` [..., G] of E8M0 exponents, one per 32 values) are listed as `<name>`
[..., 32 G] and handed out expanded to bfloat16 (exactly: every such value is a bfloat16), one slice along the
first dimension (an expert) at a time when asked for one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..store.quant import dequantize

INDEX_NAME = "model.safetensors.index.json"
FP8, FP8_SCALE_SUFFIX, FP8_BLOCK = "F8_E4M3", "_scale_inv", 128
MXFP4 = "MXFP4"  # the dtype this reader gives a pair of *_blocks and *_scales tensors
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# bytes per value of what `get` hands out (float8 and MXFP4 come out as bfloat16)
_ITEMSIZE = {FP8: 2, MXFP4: 2, "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "BF16": 2, "F16": 2,
             "I16": 2, "U16": 2}
_RANK_FILE = re.compile(r"^(?P<group>.*)-TP-(?P<rank>\d{3})\.safetensors$")


class SafetensorsReader:
    """Tensor names -> shard files of a checkpoint directory; shapes and dtypes without reading data.

    keep_open=False maps a file only while one tensor is read from it, so that streaming through a
    checkpoint (conversion) does not keep its pages mapped and counted in the process's memory.
    split: (regex over tensor names, dim) rules for tensors sliced across tensor-parallel rank files.
    """

    def __init__(self, model_dir: str | Path, keep_open: bool = True, split: Sequence[tuple[str, int]] = ()):
        self.dir = Path(model_dir)
        self.keep_open = keep_open
        self._handles: dict[Path, object] = {}
        self.location: dict[str, Path] = {}
        self._slices: dict[str, list[Path]] = {}  # tensor -> its rank files, in rank order (split tensors only)
        self._dim: dict[str, int] = {}  # split tensor -> the dimension its slices join along
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
        found: dict[str, list[tuple[Path, tuple[int, ...], str]]] = {}
        for path in files:
            handle = self._open(path)
            for name in handle.keys():
                info = handle.get_slice(name)
                found.setdefault(name, []).append((path, tuple(info.get_shape()), info.get_dtype()))
            if keep_open:
                self._handles[path] = handle
        ranks = self._check_rank_files(files)
        rules = [(re.compile(pattern + "$"), dim) for pattern, dim in split]
        for name, places in found.items():
            if len(places) == 1 and not _RANK_FILE.match(places[0][0].name):
                self.location[name], shape, dtype = places[0]
                self._meta[name] = (shape, dtype)
            else:
                self._join(name, places, ranks, rules)
        self._fp8_scales = {name: self._fp8_scale(name) for name, (_, dtype) in self._meta.items() if dtype == FP8}
        self._mxfp4 = {name[:-len("_blocks")]: self._mxfp4_pair(name) for name, (_, dtype) in list(self._meta.items())
                       if name.endswith("_blocks") and dtype == "U8"}
        parts = set(self._fp8_scales.values()) | {n for pair in self._mxfp4.values() for n in pair}
        self._listed = [n for n in self.location if n not in parts]

    def _mxfp4_pair(self, blocks: str) -> tuple[str, str]:
        """(blocks, scales) of an MXFP4 tensor, checked, and the tensor they make entered under its own name."""
        name, scales = blocks[:-len("_blocks")], blocks[:-len("_blocks")] + "_scales"
        shape = self._meta[blocks][0]
        if scales not in self._meta or self._meta[scales][0] != shape[:-1] or shape[-1] != 16 or blocks in self._slices:
            raise CheckpointError(f"tensor {blocks} {list(shape)} in {self.describe(blocks)} is not MXFP4 blocks of 16 "
                                  f"bytes with their {scales} [{', '.join(map(str, shape[:-1]))}] beside them")
        self.location[name] = self.location[blocks]
        self._meta[name] = ((*shape[:-2], shape[-2] * 32), MXFP4)
        return blocks, scales

    def _fp8_scale(self, name: str) -> str:
        """The block factors of a float8 matrix, checked against its shape."""
        scale = name + FP8_SCALE_SUFFIX
        shape = self._meta[name][0]
        if scale not in self._meta:
            raise CheckpointError(f"tensor {name} in {self.describe(name)} is float8 without the {scale} that "
                                  f"scales it")
        want = tuple(-(-d // FP8_BLOCK) for d in shape)
        if len(shape) != 2 or self._meta[scale][0] != want or name in self._slices:
            raise CheckpointError(f"float8 tensor {name} {list(shape)} has factors {scale} "
                                  f"{list(self._meta[scale][0])}; expected one per {FP8_BLOCK} x {FP8_BLOCK} block of "
                                  f"a matrix, {list(want)}")
        return scale

    def _check_rank_files(self, files: list[Path]) -> int:
        """The number of tensor-parallel ranks (0 without rank files); every group of rank files must have all."""
        groups: dict[str, set[int]] = {}
        for path in files:
            m = _RANK_FILE.match(path.name)
            if m:
                groups.setdefault(m["group"], set()).add(int(m["rank"]))
        if not groups:
            return 0
        n = max(max(r) for r in groups.values()) + 1
        for group, have in sorted(groups.items()):
            missing = sorted(set(range(n)) - have)
            if missing:
                raise CheckpointError(f"{self.dir} lacks the tensor-parallel shard {group}-TP-{missing[0]:03d}"
                                      f".safetensors ({len(have)} of the {n} ranks of {group} are there)")
        return n

    def _join(self, name: str, places: list, ranks: int, rules: list) -> None:
        files = ", ".join(p.name for p, _, _ in places)
        by_rank = {}
        for path, shape, dtype in places:
            m = _RANK_FILE.match(path.name)
            if m is None or int(m["rank"]) in by_rank:
                raise CheckpointError(f"tensor {name} is in more than one file of {self.dir} ({files})")
            by_rank[int(m["rank"])] = (path, shape, dtype)
        dim = next((d for rx, d in rules if rx.match(name)), None)
        if dim is None:
            raise CheckpointError(f"tensor {name} is sliced across the tensor-parallel files {files}, and its model "
                                  f"family does not say how the slices join")
        if sorted(by_rank) != list(range(ranks)):
            absent = sorted(set(range(ranks)) - set(by_rank))
            raise CheckpointError(f"tensor {name} has no slice for rank {absent[0]} (found in {files})")
        shapes = {shape for _, shape, _ in by_rank.values()}
        dtypes = {dtype for _, _, dtype in by_rank.values()}
        if len(shapes) > 1 or len(dtypes) > 1 or dim >= len(next(iter(shapes))):
            raise CheckpointError(f"the slices of tensor {name} in {files} do not add up: shapes "
                                  f"{sorted(list(s) for s in shapes)}, dtypes {sorted(dtypes)}, joined along dim {dim}")
        shape = list(next(iter(shapes)))
        shape[dim] *= ranks
        self._slices[name] = [by_rank[r][0] for r in range(ranks)]
        self._dim[name] = dim
        self.location[name] = self._slices[name][0]
        self._meta[name] = (tuple(shape), dtypes.pop())

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is not None:
            return handle
        try:
            return safe_open(str(path), framework="pt")
        except Exception as e:  # safetensors raises its own error type for truncated or corrupt files
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self._listed)

    def describe(self, name: str) -> str:
        """Where a tensor is, for messages: its file, or how many rank files its slices are joined from."""
        if name in self._slices:
            return f"{len(self._slices[name])} tensor-parallel slices joined along dim {self._dim[name]}"
        return self.location[name].name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype | None:
        """The dtype `get` returns (bfloat16 for a float8 matrix); None for tensors it cannot read."""
        return torch.bfloat16 if name in self._fp8_scales or name in self._mxfp4 else DTYPES.get(self._meta[name][1])

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

    def _check_dtype(self, name: str) -> None:
        dtype = self._meta[name][1]
        if dtype not in DTYPES and name not in self._fp8_scales and name not in self._mxfp4:
            raise CheckpointError(f"tensor {name} in {self.location[name].name} has dtype {dtype}; edgerun reads "
                                  f"BF16, F16 and F32 checkpoints, and block-scaled float8 ones")

    def get(self, name: str, index: int | None = None) -> torch.Tensor:
        """The tensor, or only its slice [index] along the first dimension (one expert of a fused tensor)."""
        path = self.location[name]
        self._check_dtype(name)
        try:
            if name in self._fp8_scales:
                return self._fp8_matrix(name) if index is None else self._fp8_matrix(name)[index]
            if name in self._mxfp4:
                return self._mxfp4_tensor(name, index)
            if name in self._slices:
                return self._joined(name, index)
            handle = self._open(path)
            if index is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[index]
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {path} ({e})") from None

    def get_range(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """tensor[start:stop] along dim 0 or 1, reading only those bytes from a whole tensor's file."""
        self._check_dtype(name)
        if name in self._slices or name in self._fp8_scales or name in self._mxfp4:
            return self.get(name).narrow(dim, start, stop - start).contiguous()
        try:
            part = self._open(self.location[name]).get_slice(name)
            return (part[start:stop] if dim == 0 else part[:, start:stop]).contiguous()
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.location[name]} ({e})") from None

    def _fp8_matrix(self, name: str) -> torch.Tensor:
        """A float8 matrix times its block factors, in bfloat16, made one band of 128 rows at a time."""
        w = self._open(self.location[name]).get_tensor(name)
        scale_name = self._fp8_scales[name]
        scale = self._open(self.location[scale_name]).get_tensor(scale_name).float()
        rows, cols = w.shape
        out = torch.empty((rows, cols), dtype=torch.bfloat16)
        for band in range(scale.shape[0]):
            r = slice(band * FP8_BLOCK, min((band + 1) * FP8_BLOCK, rows))
            factors = scale[band].repeat_interleave(FP8_BLOCK)[:cols]
            out[r] = (w[r].float() * factors).to(torch.bfloat16)
        return out

    def _mxfp4_tensor(self, name: str, index: int | None) -> torch.Tensor:
        """An MXFP4 tensor (or its slice [index]) as bfloat16: E2M1 values times 2 ** (scale - 127)."""
        parts = []
        for part in self._mxfp4[name]:
            handle = self._open(self.location[part])
            parts.append(handle.get_tensor(part) if index is None else handle.get_slice(part)[index])
        blocks, scales = (p.numpy() for p in parts)
        groups = scales.shape[-1]
        rows = scales.reshape(-1, groups)
        values = dequantize(blocks.reshape(rows.shape[0], groups * 16), rows, groups * 32)
        return torch.from_numpy(values).reshape(*scales.shape[:-1], groups * 32).to(torch.bfloat16)

    def _joined(self, name: str, index: int | None) -> torch.Tensor:
        """A split tensor, its slices copied one at a time into the whole (memory: the whole and one slice)."""
        paths, dim = self._slices[name], self._dim[name]
        if index is not None and dim == 0:  # one row of the first dimension lives in one rank's slice
            rows = self._meta[name][0][0] // len(paths)
            return self._open(paths[index // rows]).get_slice(name)[index % rows]
        shape = list(self._meta[name][0])
        if index is not None:
            shape, dim = shape[1:], dim - 1
        out = torch.empty(shape, dtype=DTYPES[self._meta[name][1]])
        width = shape[dim] // len(paths)
        for rank, path in enumerate(paths):
            handle = self._open(path)
            piece = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
            out.narrow(dim, rank * width, width).copy_(piece)
        return out

    def close(self) -> None:
        self._handles.clear()
