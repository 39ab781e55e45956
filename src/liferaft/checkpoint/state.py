"""How a checkpoint's state is stored: arrays and tensors without pickle, the rest named as such.

A state is a tree of dicts, lists and tuples. Its parts go to three places:

- ``tensors.safetensors``: torch tensors (dense, from any device) and numpy arrays of
  plain dtypes, written straight from their host copy. The file is in the safetensors
  format, so ``safetensors.torch.load_file`` reads it too.
- the checkpoint manifest (JSON): the tree's shape and its plain values (None, bool,
  int, float, str).
- ``other.pkl``: everything else, pickled. This is the fallback, named as such; it is
  loaded only from the user's own folder or vault. With ``allow_pickle=False`` it is
  neither written (:func:`stage` refuses the state) nor loaded.

Saving happens in two halves. :func:`stage` runs in the caller's thread and only copies
the state into host memory (reusing the buffers of the previous save, because fresh
memory costs page faults). :func:`write_tensors` runs in the background and writes those
buffers to a file while hashing them.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import blake3

from ..errors import LiferaftError, VaultCorrupt

TENSORS = "tensors.safetensors"
PICKLE = "other.pkl"
_HEADER_MAX = 256 << 20
_IO_SLICE = 16 << 20

# safetensors dtype names
_TORCH_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}
_NUMPY_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
    "complex64": "C64",
}
_SCALARS = (type(None), bool, int, float, str)


class CheckpointDamaged(VaultCorrupt):
    """A checkpoint's bytes do not match its manifest (or cannot be parsed)."""


# ------------------------------------------------------------------ staging


@dataclass
class StagedArray:
    """One array or tensor copied into host memory, waiting to be written."""

    name: str
    lib: str  # "torch" or "numpy"
    dtype: str  # e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    buffer: Any  # a contiguous CPU torch.Tensor or numpy.ndarray owned by the pool

    @property
    def nbytes(self) -> int:
        if self.lib == "torch":
            return int(self.buffer.numel() * self.buffer.element_size())
        return int(self.buffer.nbytes)


@dataclass
class Staged:
    """A state copied into host memory: the tree layout, the arrays and the pickled rest."""

    layout: Any
    arrays: list[StagedArray] = field(default_factory=list)
    pickled: bytes | None = None
    pickled_what: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays) + len(self.pickled or b"")


class StagingPool:
    """Host buffers reused from one save to the next (pinned when the source is on a GPU)."""

    def __init__(self) -> None:
        self.buffers: dict[str, Any] = {}

    def take(self, name: str, make_key: tuple[Any, ...], make: Any) -> Any:
        key_buf = self.buffers.get(name)
        if key_buf is not None and key_buf[0] == make_key:
            return key_buf[1]
        buf = make()
        self.buffers[name] = (make_key, buf)
        return buf

    def keep_only(self, names: set[str]) -> None:
        for stale in set(self.buffers) - names:
            del self.buffers[stale]

    def clear(self) -> None:
        self.buffers.clear()


def _torch_plain(torch: Any, obj: Any) -> bool:
    return (
        type(obj) in (torch.Tensor, torch.nn.Parameter)
        and obj.layout == torch.strided
        and not obj.is_quantized
        and not getattr(obj, "is_nested", False)
        and obj.device.type != "meta"
        and str(obj.dtype).removeprefix("torch.") in _TORCH_DTYPES
    )


def _numpy_plain(np: Any, obj: Any) -> bool:
    return type(obj) is np.ndarray and obj.dtype.name in _NUMPY_DTYPES and obj.dtype.fields is None


class _Stager:
    def __init__(self, pool: StagingPool, *, allow_pickle: bool = True) -> None:
        self.pool = pool
        self.allow_pickle = allow_pickle
        self.torch = sys.modules.get("torch")
        self.np = sys.modules.get("numpy")
        self.arrays: list[StagedArray] = []
        self.names: set[str] = set()
        self.others: list[Any] = []
        self.other_paths: list[str] = []
        self.cuda_used = False

    def name_for(self, path: tuple[Any, ...]) -> str:
        base = "/".join(str(p) for p in path) or "state"
        name, n = base, 2
        while name in self.names:
            name, n = f"{base}#{n}", n + 1
        self.names.add(name)
        return name

    @property
    def refusing(self) -> bool:
        """The save will be refused (it needs pickle and may not use it): copy nothing more."""
        return not self.allow_pickle and bool(self.other_paths)

    def tensor(self, obj: Any, path: tuple[Any, ...]) -> dict[str, Any]:
        torch = self.torch
        assert torch is not None
        name = self.name_for(path)
        if self.refusing:
            return {"$tensor": name}
        dtype = str(obj.dtype).removeprefix("torch.")
        shape = tuple(obj.shape)
        pinned = obj.device.type == "cuda"
        buf = self.pool.take(
            name,
            ("torch", dtype, shape, pinned),
            lambda: torch.empty(shape, dtype=obj.dtype, device="cpu", pin_memory=pinned),
        )
        with torch.no_grad():
            if pinned:
                buf.copy_(obj, non_blocking=True)  # completed by one synchronize in stage()
                self.cuda_used = True
            else:
                buf.copy_(obj)
        self.arrays.append(StagedArray(name, "torch", dtype, shape, buf))
        return {"$tensor": name}

    def array(self, obj: Any, path: tuple[Any, ...], scalar: bool = False) -> dict[str, Any]:
        np = self.np
        assert np is not None
        name = self.name_for(path)
        if self.refusing:
            return {"$array": name}
        dtype = obj.dtype.newbyteorder("<")  # safetensors is little-endian; copyto swaps if needed
        shape = tuple(obj.shape)
        buf = self.pool.take(name, ("numpy", dtype.str, shape), lambda: np.empty(shape, dtype=dtype))
        np.copyto(buf, obj, casting="no" if dtype == obj.dtype else "equiv")
        self.arrays.append(StagedArray(name, "numpy", dtype.name, shape, buf))
        return {"$npscalar" if scalar else "$array": name}

    def encode(self, obj: Any, path: tuple[Any, ...]) -> Any:
        t = type(obj)
        if t in _SCALARS:
            return obj
        torch, np = self.torch, self.np
        if torch is not None and isinstance(obj, torch.Tensor) and _torch_plain(torch, obj):
            return self.tensor(obj, path)
        if np is not None:
            if _numpy_plain(np, obj):
                return self.array(obj, path)
            if isinstance(obj, np.generic) and type(obj).__module__ == "numpy" and obj.dtype.name in _NUMPY_DTYPES:
                return self.array(np.asarray(obj), path, scalar=True)
        if (t is dict or t is OrderedDict) and all(type(k) in _SCALARS for k in obj):
            out: dict[str, Any] = {"$dict": [[k, self.encode(v, (*path, k))] for k, v in obj.items()]}
            if t is OrderedDict:
                out["$ordered"] = True
                meta = getattr(obj, "_metadata", None)  # torch state_dict versions
                if meta is not None:
                    out["$meta"] = self.encode(meta, (*path, "_metadata"))
            return out
        if t is list:
            return {"$list": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        if t is tuple:
            return {"$tuple": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        self.others.append(obj)
        where = "/".join(str(p) for p in path) or "state"
        self.other_paths.append(where if self.allow_pickle else f"{where} ({type(obj).__name__})")
        return {"$pickle": len(self.others) - 1}


def stage(state: Any, pool: StagingPool, *, allow_pickle: bool = True) -> Staged:
    """Copy ``state`` into host memory (buffers from ``pool``); the caller may change it afterwards.

    With ``allow_pickle=False`` a state that holds anything but arrays, tensors and plain
    values is refused here, before anything is written: its checkpoint could never be
    restored with that setting.
    """
    stager = _Stager(pool, allow_pickle=allow_pickle)
    layout = stager.encode(state, ())
    if stager.cuda_used:
        stager.torch.cuda.synchronize()  # type: ignore[union-attr]
    if stager.refusing:
        paths = stager.other_paths
        more = f" and {len(paths) - 5} more" if len(paths) > 5 else ""
        raise LiferaftError(
            f"the state holds objects that need pickle ({', '.join(paths[:5])}{more}) and allow_pickle=False; nothing was saved",
            "convert them to tensors, numpy arrays or plain values (dict with str/int keys, list, tuple, str, number, bool, None), "
            "e.g. a set to a sorted list, or pass allow_pickle=True if the folder and vault are your own",
        )
    pickled = None
    if stager.others:
        try:
            pickled = pickle.dumps(stager.others, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise LiferaftError(
                f"the state holds an object that cannot be saved ({stager.other_paths[0]}: {type(err).__name__}: {err})",
                "save its state_dict() or plain values instead",
            ) from None
    pool.keep_only(stager.names)
    return Staged(layout, stager.arrays, pickled, stager.other_paths)


# ------------------------------------------------------------------ writing


def _byte_view(arr: StagedArray) -> memoryview:
    if arr.nbytes == 0:
        return memoryview(b"")
    if arr.lib == "torch":
        raw = (ctypes.c_ubyte * arr.nbytes).from_address(arr.buffer.data_ptr())
        return memoryview(raw).cast("B")
    return memoryview(arr.buffer.reshape(-1).view("u1"))


def _dtype_code(arr: StagedArray) -> str:
    table = _TORCH_DTYPES if arr.lib == "torch" else _NUMPY_DTYPES
    return table[arr.dtype]


def _header(arrays: list[StagedArray]) -> bytes:
    doc: dict[str, Any] = {"__metadata__": {"format": "pt", "written_by": "liferaft"}}
    offset = 0
    for a in arrays:
        doc[a.name] = {"dtype": _dtype_code(a), "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors: data starts 8-aligned
    return struct.pack("<Q", len(raw)) + raw


def write_tensors(path: Path, arrays: list[StagedArray]) -> tuple[int, str]:
    """Write staged arrays as one safetensors file; return (size, BLAKE3 hex)."""
    hasher = blake3.blake3()
    size = 0
    with open(path, "wb") as f:
        head = _header(arrays)
        f.write(head)
        hasher.update(head)
        size += len(head)
        for a in arrays:
            view = _byte_view(a)
            for start in range(0, len(view), _IO_SLICE):
                piece = view[start : start + _IO_SLICE]
                f.write(piece)
                hasher.update(piece)
            size += len(view)
    return size, hasher.hexdigest()


def write_bytes(path: Path, data: bytes) -> tuple[int, str]:
    with open(path, "wb") as f:
        f.write(data)
    return len(data), blake3.blake3(data).hexdigest()


# ------------------------------------------------------------------ reading


def _readinto(f: BinaryIO, view: memoryview, hasher: Any, what: str) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done : done + _IO_SLICE])  # type: ignore[attr-defined]
        if not n:
            raise CheckpointDamaged(f"{what} is shorter than its header says")
        hasher.update(view[done : done + n])
        done += n


def _alloc(lib: str, dtype: str, shape: tuple[int, ...], nbytes: int, what: str) -> tuple[Any, memoryview]:
    """A fresh array for one entry and a writable byte view of it."""
    if lib == "torch":
        torch = sys.modules.get("torch")
        if torch is None:
            try:
                import torch
            except ImportError:
                raise LiferaftError(f"{what} holds torch tensors", "pip install torch") from None
        tdtype = getattr(torch, dtype)
        if nbytes == 0:
            return torch.empty(shape, dtype=tdtype), memoryview(b"")
        raw = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview((ctypes.c_ubyte * nbytes).from_address(raw.data_ptr())).cast("B")
        return raw.view(tdtype).reshape(shape), view
    try:
        import numpy as np
    except ImportError:
        raise LiferaftError(f"{what} holds numpy arrays", "pip install numpy") from None
    arr = np.empty(shape, dtype=np.dtype(dtype).newbyteorder("<"))
    return arr, memoryview(arr.reshape(-1).view("u1")) if nbytes else memoryview(b"")


def _itemsize(lib: str, dtype: str) -> int:
    if lib == "numpy":
        import numpy as np

        return int(np.dtype(dtype).itemsize)
    sizes = {"float64": 8, "int64": 8, "uint64": 8, "complex64": 8, "float32": 4, "int32": 4, "uint32": 4}
    sizes.update({"float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2})
    return sizes.get(dtype, 1)


def read_tensors(path: Path, expect_size: int, expect_hash: str, arrays: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Read a safetensors file written by :func:`write_tensors`, checking its hash.

    ``arrays`` maps each name to (lib, dtype) from the manifest. Raises
    :class:`CheckpointDamaged` when anything disagrees.
    """
    what = f"{path.parent.name}/{path.name}"
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise CheckpointDamaged(f"{what} is missing") from None
    with f:
        actual = _fstat_size(f)
        if actual != expect_size:
            raise CheckpointDamaged(f"{what} has {actual} bytes, its manifest says {expect_size}")
        hasher = blake3.blake3()
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointDamaged(f"{what} is truncated")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > min(_HEADER_MAX, actual - 8):
            raise CheckpointDamaged(f"{what} has a bad header length")
        raw = f.read(hlen)
        hasher.update(head)
        hasher.update(raw)
        try:
            doc = json.loads(raw)
            entries = sorted(((k, v) for k, v in doc.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise CheckpointDamaged(f"{what} has an unreadable header") from None
        out: dict[str, Any] = {}
        offset = 0
        data_size = actual - 8 - hlen
        for name, meta in entries:
            if name not in arrays:
                raise CheckpointDamaged(f"{what} holds {name!r}, which its manifest does not list")
            lib, dtype = arrays[name]
            try:
                begin, end = (int(x) for x in meta["data_offsets"])
                shape = tuple(int(s) for s in meta["shape"])
            except (ValueError, TypeError, KeyError):
                raise CheckpointDamaged(f"{what}: bad entry for {name!r}") from None
            count = 1
            for s in shape:
                count *= s
            if (
                begin != offset
                or end < begin
                or end > data_size
                or min(shape, default=0) < 0
                or count * _itemsize(lib, dtype) != end - begin
            ):
                raise CheckpointDamaged(f"{what}: entry {name!r} does not fit the file")
            obj, view = _alloc(lib, dtype, shape, end - begin, what)
            _readinto(f, view, hasher, what)
            out[name] = obj
            offset = end
        if offset != data_size:
            raise CheckpointDamaged(f"{what} has {data_size - offset} bytes no entry covers")
        if set(arrays) - set(out):
            raise CheckpointDamaged(f"{what} lacks {sorted(set(arrays) - set(out))[0]!r}")
    if hasher.hexdigest() != expect_hash:
        raise CheckpointDamaged(f"{what} does not match its hash")
    return out


def _fstat_size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def read_bytes(path: Path, expect_size: int, expect_hash: str) -> bytes:
    what = f"{path.parent.name}/{path.name}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointDamaged(f"{what} is missing") from None
    if len(data) != expect_size or blake3.blake3(data).hexdigest() != expect_hash:
        raise CheckpointDamaged(f"{what} does not match its hash")
    return data


def hash_file(path: Path) -> tuple[int, str]:
    hasher = blake3.blake3()
    size = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_IO_SLICE)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()


# ------------------------------------------------------------------ layout


def decode(layout: Any, arrays: dict[str, Any], others: list[Any] | None) -> Any:
    """Rebuild the state from its layout, arrays and unpickled others."""
    if not isinstance(layout, (dict, list)):
        return layout
    if isinstance(layout, list):
        raise CheckpointDamaged("the manifest's state layout is malformed")
    try:
        if "$tensor" in layout or "$array" in layout:
            return arrays[layout.get("$tensor", layout.get("$array"))]
        if "$npscalar" in layout:
            return arrays[layout["$npscalar"]][()]
        if "$pickle" in layout:
            if others is None:
                raise CheckpointDamaged("the manifest refers to pickled objects but the checkpoint has none")
            return others[layout["$pickle"]]
        if "$dict" in layout:
            items = [(k, decode(v, arrays, others)) for k, v in layout["$dict"]]
            if layout.get("$ordered"):
                od: OrderedDict[Any, Any] = OrderedDict(items)
                if "$meta" in layout:
                    od._metadata = decode(layout["$meta"], arrays, others)  # type: ignore[attr-defined]
                return od
            return dict(items)
        if "$list" in layout:
            return [decode(v, arrays, others) for v in layout["$list"]]
        if "$tuple" in layout:
            return tuple(decode(v, arrays, others) for v in layout["$tuple"])
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise CheckpointDamaged(f"the manifest's state layout is malformed ({type(err).__name__}: {err})") from None
    raise CheckpointDamaged("the manifest's state layout is malformed")
