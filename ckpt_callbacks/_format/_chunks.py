"""Chunked tensors: one tensor of a checkpoint stored as several pieces, pure (no I/O).

A sharded save (``ckpt_callbacks.distributed``) writes every rank's pieces into that rank's own data
file, so one tensor of the state may live in several files. Its index entry then has the global
``dtype`` / ``shape`` (and ``kind``) of a plain entry, and instead of one ``file`` / ``offset`` /
``length`` / ``checksum`` a list of ``chunks``, each a box of the global tensor::

    {"dtype": "float32", "shape": [8, 4], "kind": "torch",
     "chunks": [{"file": 0, "offset": 96, "length": 64, "offsets": [0, 0], "sizes": [4, 4],
                 "checksum": "xxh3_64:..."},
                {"file": 1, "offset": 96, "length": 64, "offsets": [4, 0], "sizes": [4, 4], ...}]}

The chunks must cover the tensor exactly: inside it, no two overlapping, their volumes adding up to
the tensor's. A reader that predates chunks finds no ``file`` in such an entry and rejects the
checkpoint as unreadable instead of loading part of a tensor.

For the single-process reader each chunk is presented as a plain tensor entry of its own (a name
that no tree can reference), read and verified by the ordinary code, then assembled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from . import _kinds
from ._dtypes import dtype_from_name, dtype_str
from ._index import Index, IndexTensor

# More chunks than this for one tensor is no save this library writes (one per rank and piece).
MAX_CHUNKS = 1 << 20


@dataclass
class ChunkedArray:
    """A tensor leaf stored as pieces: each ``(offsets, piece)`` a box of the whole tensor at those
    offsets, ``piece`` (a :class:`._format.LazyArray`) of the box's shape.

    Adapters give it for an array sharded over devices: each shard is written as it is, never
    gathered into one host array. The pieces must tile the tensor exactly (:mod:`._chunks` checks
    it when reading); the index records them as one chunked entry.
    """

    shape: tuple[int, ...]
    dtype: Any
    chunks: list[tuple[tuple[int, ...], Any]]

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = np.dtype(self.dtype)
        self.chunks = [(tuple(int(o) for o in off), piece) for off, piece in self.chunks]
        for off, piece in self.chunks:
            if (
                len(off) != len(self.shape)
                or len(piece.shape) != len(self.shape)
                or piece.dtype != self.dtype
            ):
                raise ValueError(
                    f"A piece at offsets {off} of shape {piece.shape} and dtype {piece.dtype} does not fit a "
                    f"chunked array of shape {self.shape} and dtype {self.dtype}."
                )


def add_pieces(obj: ChunkedArray, name: str, encoder: Any, entry_type: type) -> str:
    """Encode ``obj``, just added by ``encoder`` (of :func:`._format.encode_tree`) as tensor ``name``
    (checked like any array; the entry is taken back, its bytes are the pieces'): each piece becomes a
    tensor entry of its own, and ``chunked[name]`` of the encoded state is ``(dtype, shape, [(piece's
    entry name, offsets)])``, from which :func:`join` makes the index's one chunked entry."""
    out, used = encoder.out, encoder.used
    whole = out.tensors.pop()
    pieces = [(piece_name(name, o), o, p) for o, p in obj.chunks]
    if used & {n for n, _, _ in pieces}:
        raise ValueError(f"Pieces of tensor {name!r} take the name of another tensor.")
    used.update(n for n, _, _ in pieces)
    out.tensors += [entry_type(n, whole.dtype, p.shape, p) for n, _, p in pieces]
    out.chunked[name] = (whole.dtype, whole.shape, [(n, o) for n, o, _ in pieces])
    return name


def piece_name(name: str, offsets: Any) -> str:
    """The name of the piece of tensor ``name`` at ``offsets`` while it is written (every sharded
    writer's; an incremental save finds an unchanged piece of the last checkpoint by it)."""
    return f"{name}@{','.join(map(str, offsets))}"


def is_chunked(entry: Any) -> bool:
    return isinstance(entry, dict) and "chunks" in entry


def _int_list(x: Any, n: int | None) -> bool:
    return (
        isinstance(x, list)
        and (n is None or len(x) == n)
        and all(type(v) is int and 0 <= v < 1 << 62 for v in x)
    )


def validate(name: str, entry: dict, itemsize: int) -> list[dict]:
    """Check a chunked entry's chunks: well formed, inside the tensor, covering it exactly.

    Returns the chunks as plain entries (``file`` / ``offset`` / ``length`` / ``checksum`` plus the
    chunk ``shape``), for the caller's checks of where bytes lie in the data files.
    """
    shape = entry["shape"]
    chunks = entry.get("chunks")
    if not isinstance(chunks, list) or not chunks and math.prod(shape) or len(chunks) > MAX_CHUNKS:
        raise CorruptCheckpointError(f"Invalid chunk list for tensor {name!r:.120} in the checkpoint index.")
    plain = []
    boxes = []
    volume = 0
    for c in chunks:
        if not (
            isinstance(c, dict)
            and _int_list(c.get("offsets"), len(shape))
            and _int_list(c.get("sizes"), len(shape))
            and isinstance(c.get("checksum"), str)
        ):
            raise CorruptCheckpointError(f"Invalid chunk of tensor {name!r:.120}: {str(c)[:120]!r}.")
        off, size = c["offsets"], c["sizes"]
        if any(o + s > d for o, s, d in zip(off, size, shape)):
            raise CorruptCheckpointError(
                f"A chunk of tensor {name!r:.120} lies outside its shape {shape}: offsets {off}, sizes {size}."
            )
        n = math.prod(size)
        if c.get("length") != n * itemsize:
            raise CorruptCheckpointError(
                f"A chunk of tensor {name!r:.120} is {c.get('length')!r} bytes; its sizes {size} need {n * itemsize}."
            )
        volume += n
        if n:
            boxes.append((off, size))
        plain.append(
            {
                "file": c.get("file"),
                "offset": c.get("offset"),
                "length": c["length"],
                "checksum": c["checksum"],
                "shape": list(size),
            }
        )
    if volume != math.prod(shape):
        raise CorruptCheckpointError(
            f"The chunks of tensor {name!r:.120} hold {volume} elements; its shape {shape} has "
            f"{math.prod(shape)}: a chunk is missing or duplicated."
        )
    _check_disjoint(name, boxes)
    return plain


def _check_disjoint(name: str, boxes: list[tuple[list[int], list[int]]]) -> None:
    """No two boxes overlap (with the volume check: they tile the tensor exactly). A sweep over the
    first dimension compares only boxes whose first-dimension ranges meet."""
    if not boxes or not boxes[0][0]:
        if len(boxes) > 1:  # several non-empty chunks of a 0-d tensor
            raise CorruptCheckpointError(f"Chunks of tensor {name!r:.120} overlap.")
        return
    boxes = sorted(boxes, key=lambda b: b[0][0])
    active: list[tuple[list[int], list[int]]] = []
    for off, size in boxes:
        active = [b for b in active if b[0][0] + b[1][0] > off[0]]
        for o2, s2 in active:
            if all(a < c + t and c < a + s for a, s, c, t in zip(off, size, o2, s2)):
                raise CorruptCheckpointError(
                    f"Chunks of tensor {name!r:.120} overlap: offsets {o2} sizes {s2} and offsets {off} sizes {size}."
                )
        active.append((off, size))


def split(index: Index) -> dict[str, list[str]]:
    """Replace each chunked entry of ``index["tensors"]`` with one plain entry per chunk, in place.

    Returns ``{tensor name: [chunk entry names]}`` for :func:`assemble`. The chunk entries carry no
    ``kind`` (read as numpy); the global entry is kept under ``index["chunked"]``.
    """
    parts: dict[str, list[str]] = {}
    chunked = {n: t for n, t in index["tensors"].items() if is_chunked(t)}
    if not chunked:
        return parts
    index["chunked"] = chunked
    tensors = {}
    for n, t in index["tensors"].items():
        if n not in chunked:
            tensors[n] = t
            continue
        parts[n] = []
        for c in t["chunks"]:
            # Read as a tensor of its own under this name (error messages show it); never one the tree references.
            cname = f"{n} [chunk at {c['offsets']}]"
            if cname in index["tensors"] or cname in tensors:
                raise CorruptCheckpointError(f"Tensor {n!r:.120} has two chunks at offsets {c['offsets']}.")
            tensors[cname] = {
                "dtype": t["dtype"],
                "shape": list(c["sizes"]),
                "file": c["file"],
                "offset": c["offset"],
                "length": c["length"],
                "checksum": c["checksum"],
                **({"byteorder": t["byteorder"]} if "byteorder" in t else {}),
            }
            parts[n].append(cname)
    index["tensors"] = tensors
    return parts


def assemble(index: Index, parts: dict[str, list[str]], arrays: dict[str, Any]) -> None:
    """Build each chunked tensor from its chunks' arrays (numpy, chunk-shaped) in ``arrays``, in place:
    the chunk entries are replaced by the full tensor (of its recorded ``kind``, see :mod:`._kinds`)."""
    for name, cnames in parts.items():
        entry = index["chunked"][name]
        first = arrays[cnames[0]] if cnames else None
        dtype = first.dtype if first is not None else None
        if dtype is None:
            dtype = dtype_from_name(entry["dtype"]).newbyteorder("<")
        full = np.empty(entry["shape"], dtype=dtype)
        for cname, c in zip(cnames, entry["chunks"]):
            box = tuple(slice(o, o + s) for o, s in zip(c["offsets"], c["sizes"]))
            full[box] = arrays.pop(cname)
        arrays[name] = _kinds.from_numpy(entry.get("kind", "numpy"), full)


def join(tensors: dict[str, IndexTensor], chunked: dict[str, tuple]) -> None:
    """Replace the written pieces of each chunked tensor (``EncodedState.chunked``) in the index's
    ``tensors`` table by the tensor's one chunked entry, in place. One piece that is the whole tensor
    stays a plain entry, which every reader of this format understands."""
    for name, (dtype, shape, pieces) in chunked.items():
        chunks = []
        for pname, offsets in pieces:
            e = tensors.pop(pname)
            chunks.append({k: e[k] for k in ("file", "offset", "length", "checksum")})
            chunks[-1].update(offsets=list(offsets), sizes=list(e["shape"]))
        entry: dict[str, Any] = {"dtype": dtype_str(dtype), "shape": list(shape)}
        if len(chunks) == 1 and chunks[0]["sizes"] == list(shape):
            entry.update({k: chunks[0][k] for k in ("file", "offset", "length", "checksum")})
        else:
            entry["chunks"] = chunks
        tensors[name] = entry


def nbytes(entry: dict) -> int:
    """Stored bytes of a tensor entry, plain or chunked."""
    if is_chunked(entry):
        return sum(c["length"] for c in entry["chunks"])
    return entry["length"]
