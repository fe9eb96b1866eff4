"""The checkpoint format, pure: state tree <-> (tensors, JSON). No I/O happens here.

A checkpoint ``ckpt-1000`` is

- ``ckpt-1000.data-00000-of-00001``: a valid safetensors file holding every tensor leaf;
- ``ckpt-1000.meta``: JSON describing the run (framework, model, step, epoch, time, metrics);
- ``ckpt-1000.index``: JSON with the state tree (non-tensor leaves inline, tensors by reference),
  each tensor's dtype / shape / file / offset / length / checksum, each file's size, and its own
  checksum on the last line. Written last: a checkpoint without a valid index does not exist.

Tree encoding (JSON): ``None``, ``bool``, ``str`` and ``int`` are themselves; everything else is a
one-key object: ``{"f": 1.5}`` / ``{"f": "nan"}`` floats, ``{"l": [...]}`` lists, ``{"t": [...]}`` tuples,
``{"d": [[key, value], ...]}`` dicts (str or int keys, order kept), ``{"od": ...}`` OrderedDicts,
``{"b": "<base64>"}`` bytes, ``{"s": [dtype, "<base64>"]}`` numpy scalars, ``{"x": name}`` tensors,
``{"p": "<base64>"}`` pickled objects (only with ``allow_pickle=True``). Readers outside the codec
see these tags through :func:`tree_view` only."""

from __future__ import annotations

import base64
import collections
import json
import math
import re
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import xxhash

from ..errors import CorruptCheckpointError, IncompatibleCheckpointError, PickleRefusedError
from . import _chunks, _kinds
from ._dtypes import _ML_DTYPE_NAMES, _parse_dtype, dtype_from_name, dtype_name, dtype_str  # noqa: F401
from ._index import Index
from ._names import data_file_name  # noqa: F401 - re-exported: the name of a data shard

FORMAT_NAME = "ckpt_callbacks"
FORMAT_VERSION = 1
CHECKSUM_ALGO = "xxh3_64"

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors refuses more; so do we, before allocating anything
MAX_INDEX_BYTES = 512 * 1024 * 1024
MAX_TREE_DEPTH = 512
_Ranges = dict[int, list[tuple[int, int, str]]]  # data file number -> (begin, end, tensor name)

# numpy dtype name -> safetensors dtype. Dtypes safetensors has no name for are stored as raw
# bytes ("U8", shape [nbytes]); the index keeps the real dtype and shape.
_SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}


@dataclass
class LazyArray:
    """A tensor leaf whose bytes are produced only when written.

    Adapters wrap framework variables in it so that a sync save converts one tensor at a time
    instead of copying the whole state up front. Loading gives back a numpy array.

    ``immutable``: what ``materialize()`` returns never changes afterwards, whatever happens to the
    variable it came from (a read-only view of an immutable buffer, such as a CPU JAX array's, or a
    fresh copy). An async snapshot then keeps that array as it is, instead of copying it into a host
    buffer: the bytes written are the ones of the moment of the save, at no copy.
    """

    shape: tuple[int, ...]
    dtype: Any
    materialize: Callable[[], Any]
    immutable: bool = False

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = np.dtype(self.dtype) if not isinstance(self.dtype, str) else _parse_dtype(self.dtype)


@dataclass
class TensorEntry:
    """One tensor leaf of a state being saved."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    source: Any  # np.ndarray, LazyArray or a framework tensor of a registered kind
    kind: str = "numpy"  # "numpy" or a registered kind's name (:mod:`._kinds`): what loading gives back
    # ">" for a big-endian numpy array: stored little-endian (safetensors is), given back big-endian.
    byteorder: str = "<"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def array(self) -> np.ndarray:
        """The tensor as a C-contiguous little-endian numpy array (one conversion, no extra copy)."""
        src = self.source
        if isinstance(src, LazyArray):
            arr = np.asarray(src.materialize())
            if arr.shape != self.shape or arr.dtype != self.dtype:
                arr = arr.astype(self.dtype, copy=False).reshape(self.shape)
        elif self.kind != _kinds.NUMPY:
            arr = _kinds.get(self.kind).to_numpy(src)
        else:
            arr = src
        if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
            arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        return arr


@dataclass
class EncodedState:
    tree: Any
    tensors: list[TensorEntry] = field(default_factory=list)
    chunked: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # ChunkedArray leaves (_chunks)


def _path_str(path: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{k!r}]" for k in path)


def encode_tree(state: Any, *, allow_pickle: bool = False) -> EncodedState:
    """Split a state tree into a JSON-able tree and its tensor leaves.

    Raises TypeError naming the key path of the first leaf that cannot be stored.
    """
    encoder = _Encoder(allow_pickle)
    encoder.out.tree = encoder.enc(state, (), 0)
    return encoder.out


class _Encoder:
    """One encode_tree pass: the tensors found so far and the names they took."""

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.out = EncodedState(tree=None)
        self.used: set[str] = set()

    def tensor_name(self, path: tuple[Any, ...]) -> str:
        base = "/".join(str(k) for k in path) or "tensor"
        name, n = base, 1
        while name in self.used:
            name = f"{base}#{n}"
            n += 1
        self.used.add(name)
        return name

    def enc(self, obj: Any, path: tuple[Any, ...], depth: int) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise ValueError(
                f"State tree is nested deeper than {MAX_TREE_DEPTH} levels at {_path_str(path)}."
            )
        t = type(obj)
        if obj is None or t is bool or t is str:
            return obj
        if t is int:
            return obj
        if t is float:
            return {"f": obj if math.isfinite(obj) else repr(obj)}
        if t is dict or t is collections.OrderedDict:
            return self.enc_dict(obj, path, depth)
        if t is list or t is tuple:
            items = [self.enc(v, (*path, i), depth + 1) for i, v in enumerate(obj)]
            return {"l" if t is list else "t": items}
        if t is bytes:
            return {"b": base64.b64encode(obj).decode("ascii")}
        if t is np.ndarray or t is LazyArray:
            return {"x": self.add_tensor(obj, path, None)}
        if t is _chunks.ChunkedArray:  # its pieces are tensors of their own
            return {"x": _chunks.add_pieces(obj, self.add_tensor(obj, path, None), self, TensorEntry)}
        kind = _kinds.kind_of(obj)
        if kind is not None:
            return {"x": self.add_tensor(obj, path, kind)}
        if isinstance(obj, np.generic) and _numeric(obj.dtype):
            return {"s": [dtype_name(obj.dtype), base64.b64encode(obj.tobytes()).decode("ascii")]}
        if self.allow_pickle:
            import pickle

            return {"p": base64.b64encode(pickle.dumps(obj)).decode("ascii")}
        raise TypeError(
            f"Cannot save {_path_str(path)} of type {t.__module__}.{t.__qualname__}: only dict, list, tuple, "
            "None, bool, int, float, str, bytes, numpy arrays/scalars and torch tensors are stored without "
            "pickle. Convert it to one of those, or pass allow_pickle=True to both save and load."
        )

    def enc_dict(self, obj: dict[str, Any], path: tuple[Any, ...], depth: int) -> dict[str, Any]:
        items = []
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise TypeError(
                    f"Cannot save dict key {k!r} of type {type(k).__name__} at {_path_str(path)}: "
                    "keys must be str or int."
                )
            items.append([k, self.enc(v, (*path, k), depth + 1)])
        return {"od" if type(obj) is collections.OrderedDict else "d": items}

    def add_tensor(self, obj: Any, path: tuple[Any, ...], tensor_kind: Any) -> str:
        if tensor_kind is None:  # a numpy array or LazyArray
            dtype, shape, kind = obj.dtype, obj.shape, _kinds.NUMPY
        else:
            try:
                dtype = tensor_kind.numpy_dtype(obj)
            except TypeError as e:
                raise TypeError(f"Cannot save {_path_str(path)}: {e}") from None
            shape, kind = tuple(obj.shape), tensor_kind.name
        if not _numeric(dtype):
            raise TypeError(
                f"Cannot save {_path_str(path)}: arrays of dtype {dtype!r} are not numeric. Only numeric "
                "arrays (bool, int, uint, float, complex, ml_dtypes) are stored; convert it or pass "
                "allow_pickle=True to both save and load."
            )
        dtype = np.dtype(dtype)
        big = kind == "numpy" and (
            dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big")
        )
        entry = TensorEntry(self.tensor_name(path), dtype.newbyteorder("<"), tuple(shape), obj, kind)
        if big and dtype.itemsize > 1:
            entry.byteorder = ">"
        self.out.tensors.append(entry)
        return entry.name


def _numeric(dtype: np.dtype) -> bool:
    try:
        dtype_name(np.dtype(dtype))
    except TypeError:
        return False
    return True


def decode_tree(tree: Any, tensors: dict[str, Any], *, allow_pickle: bool = False) -> Any:
    """Rebuild the state tree from its JSON form and the loaded tensors (by name)."""

    def dec(node: Any, depth: int, path: tuple[Any, ...] = ()) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise CorruptCheckpointError(f"Checkpoint tree is nested deeper than {MAX_TREE_DEPTH} levels.")
        if node is None or isinstance(node, (bool, str, int)):
            return node
        if not isinstance(node, dict) or len(node) != 1:
            raise CorruptCheckpointError(f"Invalid node in checkpoint tree: {str(node)[:80]!r}.")
        ((tag, val),) = node.items()
        if tag == "f":
            if isinstance(val, (int, float)) and not isinstance(val, bool):
                return float(val)
            if val in ("nan", "inf", "-inf"):
                return float(val)
        elif tag in ("d", "od") and isinstance(val, list):
            pairs = []
            for item in val:
                if not (isinstance(item, list) and len(item) == 2 and type(item[0]) in (str, int)):
                    raise CorruptCheckpointError("Invalid dict entry in checkpoint tree.")
                pairs.append((item[0], dec(item[1], depth + 1, (*path, item[0]))))
            return dict(pairs) if tag == "d" else collections.OrderedDict(pairs)
        elif tag in ("l", "t") and isinstance(val, list):
            items = [dec(v, depth + 1, (*path, i)) for i, v in enumerate(val)]
            return items if tag == "l" else tuple(items)
        elif tag == "b" and isinstance(val, str):
            return _b64(val)
        elif tag == "s" and isinstance(val, list) and len(val) == 2:
            dtype = dtype_from_name(val[0])
            raw = _b64(val[1])
            if len(raw) != dtype.itemsize:
                raise CorruptCheckpointError("Invalid numpy scalar in checkpoint tree.")
            return np.frombuffer(raw, dtype=dtype)[0]
        elif tag == "x" and isinstance(val, str):
            if val not in tensors:
                raise CorruptCheckpointError(f"Checkpoint tree references unknown tensor {val!r}.")
            return tensors[val]
        elif tag == "p" and isinstance(val, str):
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{_path_str(path)} is a pickled object (it was saved with allow_pickle=True); "
                    "refusing to unpickle it because unpickling can execute code. If you trust this "
                    "checkpoint, load it with allow_pickle=True."
                )
            import pickle

            return pickle.loads(_b64(val))
        raise CorruptCheckpointError(f"Invalid node {tag!r} in checkpoint tree.")

    return dec(tree, 0)


def tree_view(node: Any) -> tuple[str, Any]:
    """A stored tree node for readers outside the codec: ``("dict", [(key, child)])``, ``("list" | "tuple",
    children)``, ``("tensor", name)``, ``("float" | "bytes" | "scalar" | "pickle", x | size | dtype | None)``."""
    tag, val = next(iter(node.items())) if isinstance(node, dict) and len(node) == 1 else (None, node)
    if tag in ("d", "od", "l", "t") and isinstance(val, list):
        pairs = [tuple(i) for i in val if isinstance(i, list) and len(i) == 2]
        return ("dict", pairs) if tag in ("d", "od") else ("list" if tag == "l" else "tuple", val)
    if tag == "x" and isinstance(val, str):
        return "tensor", val
    if tag in ("f", "b", "s", "p"):
        return {"f": "float", "b": "bytes", "s": "scalar", "p": "pickle"}[tag], (
            float(val) if tag == "f" else len(_b64(val)) if tag == "b" else val[0] if tag == "s" else None
        )
    return "value", node


def _b64(s: str) -> bytes:
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise CorruptCheckpointError("Invalid base64 payload in checkpoint tree.") from None


# ---------------------------------------------------------------- safetensors data files


def plan_shards(tensors: list[TensorEntry], num_shards: int) -> list[list[TensorEntry]]:
    """Split tensors into at most ``num_shards`` groups of similar byte size, order kept."""
    if num_shards <= 1 or len(tensors) <= 1:
        return [tensors]
    total = sum(t.nbytes for t in tensors)
    target = total / num_shards
    shards: list[list[TensorEntry]] = [[]]
    acc = 0
    for t in tensors:
        if shards[-1] and acc >= target * len(shards) and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(t)
        acc += t.nbytes
    return shards


def safetensors_header(tensors: list[TensorEntry]) -> tuple[bytes, list[tuple[int, int]]]:
    """The safetensors header (length prefix included) and each tensor's absolute [begin, end)."""
    meta: dict[str, Any] = {"__metadata__": {"format": FORMAT_NAME}}
    offsets = []
    pos = 0
    for t in tensors:
        st = _SAFETENSORS_DTYPES.get(dtype_str(t.dtype))
        nbytes = t.nbytes
        shape = list(t.shape) if st is not None else [nbytes]
        meta[t.name] = {"dtype": st or "U8", "shape": shape, "data_offsets": [pos, pos + nbytes]}
        offsets.append((pos, pos + nbytes))
        pos += nbytes
    header = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # safetensors pads the header to 8 bytes
    start = 8 + len(header)
    return struct.pack("<Q", len(header)) + header, [(start + b, start + e) for b, e in offsets]


def iter_tensor_bytes(arr: np.ndarray, chunk: int = 64 << 20) -> Iterator[memoryview]:
    """The bytes of a C-contiguous array as memoryviews of at most ``chunk`` bytes, without a copy."""
    flat = arr.reshape(-1).view(np.uint8)
    mv = flat.data
    for i in range(0, len(mv), chunk):
        yield mv[i : i + chunk]


def new_hasher() -> Any:
    return xxhash.xxh3_64()


def checksum_str(hasher: Any) -> str:
    return f"{CHECKSUM_ALGO}:{hasher.hexdigest()}"


def checksum_bytes(data: bytes | memoryview) -> str:
    return f"{CHECKSUM_ALGO}:{xxhash.xxh3_64_hexdigest(data)}"


# ---------------------------------------------------------------- index


_INDEX_HEAD = re.compile(
    rb'\{\s*"format"\s*:\s*"' + FORMAT_NAME.encode() + rb'"\s*,\s*"format_version"\s*:\s*(\d{1,9})\s*[,}]'
)
_INDEX_TAIL = re.compile(rb',"index_checksum":"xxh3_64:([0-9a-f]{16})"\}\n\Z')


def dump_index(index: Index) -> bytes:
    """Serialize the index with a checksum of its own bytes as the last key (still plain JSON)."""
    body = json.dumps(index, separators=(",", ":"), allow_nan=False).encode("utf-8")
    assert body.endswith(b"}")
    head = body[:-1]
    return head + b',"index_checksum":"' + checksum_bytes(head).encode() + b'"}\n'


def parse_index(data: bytes, *, verify: bool = True) -> Index:
    """Parse and validate an index file; raises CorruptCheckpointError on any defect."""
    if len(data) > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(
            f"Checkpoint index is {len(data)} bytes, over the {MAX_INDEX_BYTES} limit."
        )
    # Format and version come first, whatever a later version changes: newer is not corrupt.
    v = _INDEX_HEAD.match(data)
    if v is not None and int(v.group(1)) > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"Checkpoint format version {int(v.group(1))} is newer than this library supports "
            f"({FORMAT_VERSION}). Upgrade ckpt-callbacks to load it."
        )
    m = _INDEX_TAIL.search(data)
    if m is None:
        raise CorruptCheckpointError(
            "Checkpoint index is truncated or not written by this library (no checksum)."
        )
    head = data[: m.start()]
    if verify and checksum_bytes(head) != f"{CHECKSUM_ALGO}:{m.group(1).decode()}":
        raise CorruptCheckpointError("Checkpoint index checksum does not match its contents.")
    try:
        index: Index = json.loads(head + b"}")
    except (ValueError, RecursionError):
        raise CorruptCheckpointError("Checkpoint index is not valid JSON.") from None
    validate_index(index)
    return index


def validate_index(index: Any) -> None:
    """Structural checks of a parsed index: types, dtypes, shapes, offsets inside their files."""
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError("Checkpoint index does not describe a ckpt_callbacks checkpoint.")
    version = index.get("format_version")
    if not isinstance(version, int):
        raise CorruptCheckpointError("Checkpoint index has no format_version.")
    if version > FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"Checkpoint format version {version} is newer than this library supports ({FORMAT_VERSION}). "
            "Upgrade ckpt-callbacks to load it."
        )
    files = index.get("files")
    tensors = index.get("tensors")
    if not isinstance(files, list) or not isinstance(tensors, dict):
        raise CorruptCheckpointError("Checkpoint index lacks its file or tensor table.")
    sizes = []
    for f in files:
        if not (
            isinstance(f, dict)
            and _safe_name(f.get("name"))
            and _nonneg_int(f.get("size"))
            and isinstance(f.get("checksum"), str)
        ):
            raise CorruptCheckpointError(f"Invalid file entry in checkpoint index: {str(f)[:120]!r}.")
        sizes.append(f["size"])
    ranges: _Ranges = {}
    for name, t in tensors.items():
        if not isinstance(t, dict):
            raise CorruptCheckpointError(f"Invalid tensor entry {name!r} in checkpoint index.")
        dtype = dtype_from_name(t.get("dtype"))
        shape = t.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 64 and all(_nonneg_int(d) for d in shape)):
            raise CorruptCheckpointError(f"Invalid shape for tensor {name!r}: {str(shape)[:80]}.")
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
            if nbytes > 1 << 62:
                raise CorruptCheckpointError(f"Shape of tensor {name!r} overflows: {shape}.")
        locs = _chunks.validate(name, t, dtype.itemsize) if _chunks.is_chunked(t) else [t]
        for loc in locs:  # a sharded save's tensor has several (see _chunks), a plain one itself
            _check_location(name, loc, nbytes if loc is t else loc["length"], sizes, ranges)
        if (
            t.get("kind", "numpy") not in _kinds.known_kinds()
            or t.get("byteorder", "<") not in ("<", ">")
            or not all(isinstance(loc.get("checksum"), str) for loc in locs)
        ):
            raise CorruptCheckpointError(f"Invalid tensor entry {name!r} in checkpoint index.")
    for spans in ranges.values():
        spans.sort()
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise CorruptCheckpointError(f"Tensors {a!r} and {b!r} overlap in the data file.")


def _check_location(name: str, loc: dict[str, Any], nbytes: int, sizes: list[int], ranges: _Ranges) -> None:
    """``loc`` (a tensor entry or a chunk) holds ``nbytes`` bytes inside its data file; its byte range
    is added to ``ranges`` for the overlap check."""
    fi, off, length = loc.get("file"), loc.get("offset"), loc.get("length")
    if not (_nonneg_int(fi) and fi < len(sizes) and _nonneg_int(off) and _nonneg_int(length)):
        raise CorruptCheckpointError(f"Invalid location for tensor {name!r} in checkpoint index.")
    if length != nbytes or off + length > sizes[fi]:
        raise CorruptCheckpointError(
            f"Tensor {name!r} is {length} bytes at offset {off}; expected {nbytes} bytes inside its "
            f"{sizes[fi]}-byte data file."
        )
    ranges.setdefault(fi, []).append((off, off + length, name))


def _nonneg_int(x: Any) -> TypeGuard[int]:
    return type(x) is int and 0 <= x < 1 << 62


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.=+-][A-Za-z0-9_.=+-]*\Z")


def _safe_name(name: Any) -> TypeGuard[str]:
    """A plain file name inside the checkpoint directory: no separators, no '..', no scheme."""
    return (
        isinstance(name, str) and len(name) < 256 and bool(_SAFE_NAME.match(name)) and name not in (".", "..")
    )


def is_plain_name(name: Any) -> TypeGuard[str]:
    """The one rule for a file name read from storage (index, state file, pointer file): a plain
    name inside the checkpoint directory, no '..' anywhere."""
    return _safe_name(name) and ".." not in name


def check_name(name: Any) -> str:
    if not is_plain_name(name):
        raise CorruptCheckpointError(
            f"Refusing checkpoint file name {str(name)[:120]!r}: names must stay inside the checkpoint directory."
        )
    return name
