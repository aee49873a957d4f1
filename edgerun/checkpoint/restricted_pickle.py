"""Reading pickled numpy arrays without running pickle.

xai-org's Grok-1 release stores every parameter as a Python pickle (protocol 4) of a numpy array, or of a
`QuantizedWeight8bit` record holding an int8 `weight` and its `scales`. Unpickling calls whatever a file names,
so these files never reach `pickle`: this module interprets the opcodes itself, knows only the globals such a
file references (numpy's array reconstruction, `numpy.dtype`, ml_dtypes' bfloat16 and the record class), and
builds descriptions of the arrays. It calls nothing a file names. Any other global or opcode is refused with an
error naming the file.

Array payloads bigger than a few KiB are not read while parsing: their place in the file is recorded, so that a
tensor, or one expert of a stacked tensor, is read later with one ranged read.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

INLINE_BYTES = 1 << 12  # payloads up to this size are read while parsing, bigger ones only located
MAX_TEXT = 1 << 12  # module, class and dtype names are short; a longer string is not a tensor file

# the globals a tensor file may reference, and what each stands for
_RECONSTRUCT, _NDARRAY, _DTYPE, _BFLOAT16, _RECORD = "reconstruct", "ndarray", "dtype", "bfloat16", "record"
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 1.x
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2.x
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("ml_dtypes._ml_dtypes_ext", "bfloat16"): _BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): _RECORD,  # how xai-org's checkpoint.py makes the class findable
    ("model", "QuantizedWeight8bit"): _RECORD,
}
# numpy type strings -> (torch dtype, item size); bfloat16 arrives as ml_dtypes' type, not a string
_DTYPES = {"i1": (torch.int8, 1), "f4": (torch.float32, 4), "f2": (torch.float16, 2), "bfloat16": (torch.bfloat16, 2)}


@dataclass
class Payload:
    """Bytes of a file left unread: where they are."""

    offset: int
    nbytes: int


class _Dtype:
    def __init__(self, name: str):
        self.name = name
        self.torch, self.itemsize = _DTYPES[name]


class _Array:
    """An array under construction (numpy's _reconstruct, then BUILD with its state)."""

    shape: tuple[int, ...] | None = None
    dtype: _Dtype | None = None
    data: bytes | Payload | None = None


class _Record:
    """A QuantizedWeight8bit under construction (NEWOBJ, then BUILD with its attribute dict)."""

    state: dict | None = None


@dataclass
class StoredArray:
    """One array of a pickle file: dtype, shape and where its C-ordered bytes are."""

    path: Path
    dtype: torch.dtype
    itemsize: int
    shape: tuple[int, ...]
    data: bytes | Payload

    def read(self, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The array, or its rows [start:stop] along the first dimension, read from disk."""
        n = self.shape[0] if self.shape else 1
        start, stop = (0, n) if start is None else (start, stop)
        row = self.itemsize * math.prod(self.shape[1:])
        shape = (stop - start, *self.shape[1:]) if self.shape else ()
        if isinstance(self.data, Payload):
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.data.offset + start * row)
                    raw = bytearray((stop - start) * row)
                    got = f.readinto(raw)
            except OSError as e:
                raise CheckpointError(f"cannot read {self.path} ({e.strerror or e})") from None
            if got != len(raw):
                raise CheckpointError(f"{self.path} is cut short: download it again")
            buf = np.frombuffer(raw, dtype=np.uint8)
        else:
            buf = np.frombuffer(self.data, dtype=np.uint8)[start * row:stop * row]
        return torch.from_numpy(buf.copy() if not buf.flags.writeable else buf).view(self.dtype).reshape(shape)

    def describe(self) -> str:
        return f"{str(self.dtype).removeprefix('torch.')} {list(self.shape)}"


@dataclass
class StoredQuantized:
    """A QuantizedWeight8bit record: int8 weight and its scales."""

    weight: StoredArray
    scales: StoredArray

    def describe(self) -> str:
        return f"int8 weight {list(self.weight.shape)} with scales {self.scales.describe()}"


def read_pickle(path: str | Path) -> StoredArray | StoredQuantized:
    """Parse a pickled array or QuantizedWeight8bit file; raises CheckpointError naming the file for anything
    else (another global, an opcode such files do not use, a file cut short)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            return _Machine(path, f, size).run()
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e})") from None


class _Machine:
    """A pickle interpreter for the opcodes pickle protocols 2 to 4 write for numpy arrays and plain records."""

    def __init__(self, path: Path, f, size: int):
        self.path, self.f, self.size = path, f, size
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a tensor file of the Grok-1 release: {what}")

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path} is cut short ({self.size} bytes): download it again")
        return data

    def uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "little")

    def text(self, n: int) -> str:
        if n > MAX_TEXT:
            raise self.fail(f"a {n}-byte string")
        return self.read(n).decode("utf-8", "surrogatepass")

    def payload(self, n: int) -> bytes | Payload:
        if n <= INLINE_BYTES:
            return self.read(n)
        offset = self.f.tell()
        if offset + n > self.size:
            raise CheckpointError(f"{self.path} is cut short ({self.size} bytes, its array needs "
                                  f"{offset + n}): download it again")
        self.f.seek(n, 1)
        return Payload(offset, n)

    def pop_mark(self) -> list:
        if not self.marks:
            raise self.fail("unbalanced pickle marks")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise self.fail("pickle stack underflow")
        return self.stack.pop()

    def run(self) -> StoredArray | StoredQuantized:
        ops = self._ops()
        while True:
            code = self.read(1)
            if code == b".":
                break
            op = ops.get(code)
            if op is None:
                raise self.fail(f"pickle opcode {code!r} at byte {self.f.tell() - 1}")
            op()
        if len(self.stack) != 1:
            raise self.fail("the pickle does not hold one object")
        return self._result(self.stack[0])

    def _ops(self) -> dict:
        s = self.stack
        return {
            b"\x80": lambda: self.read(1),  # PROTO
            b"\x95": lambda: self.read(8),  # FRAME: frames are transparent to a sequential reader
            b"(": lambda: self.marks.append(len(s)),  # MARK
            b"\x94": lambda: self.memo.__setitem__(len(self.memo), s[-1]),  # MEMOIZE
            b"q": lambda: self.memo.__setitem__(self.uint(1), s[-1]),  # BINPUT
            b"r": lambda: self.memo.__setitem__(self.uint(4), s[-1]),  # LONG_BINPUT
            b"h": lambda: s.append(self._memo(self.uint(1))),  # BINGET
            b"j": lambda: s.append(self._memo(self.uint(4))),  # LONG_BINGET
            b"\x8c": lambda: s.append(self.text(self.uint(1))),  # SHORT_BINUNICODE
            b"X": lambda: s.append(self.text(self.uint(4))),  # BINUNICODE
            b"C": lambda: s.append(self.read(self.uint(1))),  # SHORT_BINBYTES
            b"B": lambda: s.append(self.payload(self.uint(4))),  # BINBYTES
            b"\x8e": lambda: s.append(self.payload(self.uint(8))),  # BINBYTES8
            b"K": lambda: s.append(self.uint(1)),  # BININT1
            b"M": lambda: s.append(self.uint(2)),  # BININT2
            b"J": lambda: s.append(struct.unpack("<i", self.read(4))[0]),  # BININT
            b"\x8a": lambda: s.append(int.from_bytes(self.read(self.uint(1)), "little", signed=True)),  # LONG1
            b"N": lambda: s.append(None),  # NONE
            b"\x88": lambda: s.append(True),  # NEWTRUE
            b"\x89": lambda: s.append(False),  # NEWFALSE
            b")": lambda: s.append(()),  # EMPTY_TUPLE
            b"t": lambda: s.append(tuple(self.pop_mark())),  # TUPLE
            b"\x85": lambda: self._tuple(1),  # TUPLE1
            b"\x86": lambda: self._tuple(2),  # TUPLE2
            b"\x87": lambda: self._tuple(3),  # TUPLE3
            b"}": lambda: s.append({}),  # EMPTY_DICT
            b"s": self._setitem,  # SETITEM
            b"u": self._setitems,  # SETITEMS
            b"]": lambda: s.append([]),  # EMPTY_LIST
            b"a": self._append,  # APPEND
            b"e": self._appends,  # APPENDS
            b"\x93": self._stack_global,  # STACK_GLOBAL
            b"c": self._global,  # GLOBAL
            b"R": self._reduce,  # REDUCE
            b"\x81": self._newobj,  # NEWOBJ
            b"b": self._build,  # BUILD
        }

    def _memo(self, key: int):
        if key not in self.memo:
            raise self.fail(f"pickle memo {key} used before it is set")
        return self.memo[key]

    def _tuple(self, n: int) -> None:
        items = [self.pop() for _ in range(n)][::-1]
        self.stack.append(tuple(items))

    def _setitem(self) -> None:
        value, key = self.pop(), self.pop()
        self._dict(self.stack[-1])[key] = value

    def _setitems(self) -> None:
        items = self.pop_mark()
        target = self._dict(self.stack[-1])
        for key, value in zip(items[::2], items[1::2]):
            target[key] = value

    def _dict(self, obj) -> dict:
        if not isinstance(obj, dict):
            raise self.fail("items set on something that is not a dict")
        return obj

    def _append(self) -> None:
        value = self.pop()
        self._list(self.stack[-1]).append(value)

    def _appends(self) -> None:
        items = self.pop_mark()
        self._list(self.stack[-1]).extend(items)

    def _list(self, obj) -> list:
        if not isinstance(obj, list):
            raise self.fail("items appended to something that is not a list")
        return obj

    def _lookup(self, module: str, name: str) -> str:
        kind = ALLOWED_GLOBALS.get((module, name))
        if kind is None:
            raise CheckpointError(f"{self.path} refers to {module}.{name}, which a Grok-1 tensor file never does; "
                                  f"refusing to load it (the file may be damaged or made to run code)")
        return kind

    def _stack_global(self) -> None:
        name, module = self.pop(), self.pop()
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("a global named by something other than strings")
        self.stack.append(self._lookup(module, name))

    def _global(self) -> None:
        module = self.f.readline(MAX_TEXT).decode("utf-8", "replace").rstrip("\n")
        name = self.f.readline(MAX_TEXT).decode("utf-8", "replace").rstrip("\n")
        self.stack.append(self._lookup(module, name))

    def _reduce(self) -> None:
        args, func = self.pop(), self.pop()
        if func == _RECONSTRUCT and isinstance(args, tuple) and args[:1] == (_NDARRAY,):
            self.stack.append(_Array())
        elif func == _DTYPE and isinstance(args, tuple) and args:
            name = args[0]
            if name == _BFLOAT16:
                name = "bfloat16"
            if not isinstance(name, str) or name.lstrip("<|=") not in _DTYPES:
                raise self.fail(f"an array of dtype {name!r}")
            self.stack.append(_Dtype(name.lstrip("<|=")))
        else:
            raise self.fail(f"a call of {func!r}")

    def _newobj(self) -> None:
        args, cls = self.pop(), self.pop()
        if cls != _RECORD or args != ():
            raise self.fail(f"an object of {cls!r}")
        self.stack.append(_Record())

    def _build(self) -> None:
        state = self.pop()
        obj = self.stack[-1] if self.stack else None
        if isinstance(obj, _Dtype):
            if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", "|", "="):
                raise self.fail(f"a dtype with byte order {state[1] if isinstance(state, tuple) else state!r}")
        elif isinstance(obj, _Array):
            self._array_state(obj, state)
        elif isinstance(obj, _Record):
            if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
                raise self.fail("a QuantizedWeight8bit without exactly a weight and scales")
            obj.state = state
        else:
            raise self.fail("state set on an unknown object")

    def _array_state(self, obj: _Array, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
                and isinstance(state[2], _Dtype) and all(isinstance(d, int) and d >= 0 for d in state[1])):
            raise self.fail("an array with a malformed state")
        _, shape, dtype, fortran, data = state
        if fortran and len(shape) > 1:
            raise self.fail("an array in Fortran order")
        if not isinstance(data, (bytes, Payload)):
            raise self.fail("an array whose data is not raw bytes")
        want = math.prod(shape) * dtype.itemsize
        got = data.nbytes if isinstance(data, Payload) else len(data)
        if got != want:
            raise self.fail(f"an array of shape {list(shape)} with {got} bytes of data instead of {want}")
        obj.shape, obj.dtype, obj.data = shape, dtype, data

    def _stored(self, obj) -> StoredArray:
        if not isinstance(obj, _Array) or obj.dtype is None:
            raise self.fail("something other than an array where an array belongs")
        return StoredArray(self.path, obj.dtype.torch, obj.dtype.itemsize, obj.shape, obj.data)

    def _result(self, obj) -> StoredArray | StoredQuantized:
        if isinstance(obj, _Record):
            if obj.state is None:
                raise self.fail("a QuantizedWeight8bit without its arrays")
            return StoredQuantized(self._stored(obj.state["weight"]), self._stored(obj.state["scales"]))
        return self._stored(obj)
