"""Incremental checkpoints: a tensor whose bytes did not change since the last committed checkpoint is
not written again; the new index points at the data file that already holds those bytes.

A tensor is unchanged when its dtype, shape, kind and content checksum (xxh3, the one the index
records anyway) equal the last checkpoint's entry at the same name. Hashing before writing would
slow a save where everything changed, so two cheap negative signals come first, each of which
proves a change and skips the hash: the framework's own in-place-modification counter (torch's
version counter, read through the tensor kind) and a *probe*, the checksum of three 4 KiB pieces
(start, middle, end) kept in memory for each tensor this manager wrote (an optimizer step changes
every element of a trained tensor, so its probe differs). Only a tensor that passes both is hashed
in full; a checksum computed for a tensor that turns out changed is handed to the writer, which
then does not hash it again.

A reference always names the data file that holds the bytes (never a checkpoint that itself
references them), so deleting a checkpoint only has to know which data files the kept ones name:
each committed checkpoint's referenced files ride in its state-file record (:class:`._state.Record`
``refs``), and retention and the leftover sweep never delete a file a kept checkpoint names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._format import _chunks, _kinds
from .._format import _format as fmt
from .._format._index import Index
from .._format._names import INDEX_SUFFIX, may_reference
from .._storage import Storage
from ..errors import CheckpointError
from ._checkpoint_read import files_of, read_index

_PROBE_PIECE = 4 << 10
# Materialised tensors (e.g. a GPU variable's host copy) found changed by the full hash are kept
# for the writer up to this many bytes, instead of being materialised a second time.
_KEEP_MATERIALISED_BYTES = 16 << 20


@dataclass
class Known:
    """One tensor of the last committed checkpoint: where its bytes are and how to tell a change."""

    entry: dict  # its index entry, without "file"
    file: dict  # the index's entry of the data file that holds it
    probe: str | None = None  # checksum of its start, middle and end (only for tensors written here)
    version: Any = None  # the kind's modification counter when it was saved (torch), or None


@dataclass
class Plan:
    """What one save reuses, and what it learns for the next one."""

    previous: dict[str, Known]
    name: str  # of the checkpoint being written: it points only into data files of lower steps
    reused: dict[str, Known] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)  # full checksums already computed
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # materialised, changed, kept for the writer
    versions: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, str] = field(default_factory=dict)  # of the tensors written, for the next save
    table: dict[str, Known] | None = None  # the new checkpoint's, once written
    # unchanged, but written again (their earlier file is mostly dead bytes): best in a file of their own
    stable: set[str] = field(default_factory=set)

    def split(self, tensors: list[fmt.TensorEntry], arrays: dict | None) -> list[fmt.TensorEntry]:
        """The tensors that must be written; the others are recorded in ``reused``."""
        if not self.previous:
            return tensors
        kept_bytes = 0
        out = []
        candidates = {}
        for t in tensors:
            known = _known(self.previous, t)
            version = _version_of(t)
            self.versions[t.name] = version
            if (
                known is None
                or t.nbytes == 0  # nothing to save: a reference would only keep an earlier file
                or not _same_layout(t, known.entry)
                or not may_reference(self.name, known.file["name"])
                or known.file["name"].startswith(self.name + ".")  # a re-saved step: its old bytes go
            ):
                out.append(t)
                continue
            if version is not None and known.version is not None and version != known.version:
                out.append(t)
                continue
            arr = arrays[t.name] if arrays is not None else t.array()
            if known.probe is not None and probe(arr) != known.probe:
                out.append(t)
                continue
            checksum = full_checksum(arr)
            if checksum == known.entry["checksum"]:
                self.reused[t.name] = known
                candidates[t.name] = t
                continue
            self.checksums[t.name] = checksum
            if arrays is None and not _is_view(t) and kept_bytes + arr.nbytes <= _KEEP_MATERIALISED_BYTES:
                self.arrays[t.name] = arr
                kept_bytes += arr.nbytes
            out.append(t)
        return out + self._not_worth_pinning(candidates)

    def _not_worth_pinning(self, candidates: dict[str, fmt.TensorEntry]) -> list[fmt.TensorEntry]:
        """Unchanged tensors written again after all: those whose earlier data file would be more dead
        bytes than bytes reused from it. A reference keeps its whole file; so a few small unchanged
        tensors (an RNG state, a constant) never keep an old checkpoint's weights on storage, and the
        dead bytes a reference keeps are at most the bytes it saves writing. They go to a file of their
        own (:attr:`stable`), which the next save points into whole."""
        live: dict[str, int] = {}  # per earlier data file: its tensor bytes less twice those reused
        for known in self.reused.values():
            f = known.file
            live.setdefault(f["name"], int(f["size"]) - int(f.get("header_size", 0)))
            live[f["name"]] -= 2 * known.entry["length"]
        weak = {f for f, rest in live.items() if rest > 0}  # reused bytes under half of it
        out = []
        for name in [n for n, k in self.reused.items() if k.file["name"] in weak]:
            self.checksums[name] = self.reused.pop(name).entry["checksum"]
            self.stable.add(name)
            out.append(candidates[name])
        return out

    def learn(self, written: list[tuple[dict, dict[str, dict]]]) -> None:
        """Set :attr:`table` (this writer's memory for its next save) from the data files written,
        each ``(its files entry, its tensors' entries by name)``, and the tensors reused."""
        table = {
            n: Known(e, f, self.probes.pop(n, None), self.versions.get(n))
            for f, tensors in written
            for n, e in tensors.items()
        }
        for n, known in self.reused.items():
            table[n] = Known(known.entry, known.file, known.probe, self.versions.get(n))
        self.table = table

    def report(self) -> dict[str, dict]:
        """The reused tensors as the index needs them (JSON, for a coordinator of a sharded save):
        ``{name: {"entry": its entry without "file", "file": the data file's files entry}}``."""
        return {n: {"entry": k.entry, "file": k.file} for n, k in self.reused.items()}

    def refs(self) -> list[str]:
        """The data files of other checkpoints the new one points into, each once."""
        return sorted({k.file["name"] for k in self.reused.values()})


class Tracker:
    """A manager's memory of its last committed checkpoint's tensors, for the next save's :class:`Plan`."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.source: str | None = None  # the checkpoint ``table`` describes
        self.table: dict[str, Known] = {}

    def plan(self, storage: Storage, name: str, base_of: Callable[[], str | None]) -> Plan | None:
        """What saving ``name`` compares with: the tensors of committed checkpoint ``base_of()`` (the
        latest, as a rule; asked only when turned on, as it may read the state file), from memory
        when this writer committed it, else (a first save, a resume that passed over a corrupt
        latest, another writer's commit) read from its index. None (a full save) when turned off."""
        if not self.enabled:
            return None
        base = base_of()
        if self.source != base:
            self.source, self.table = base, read_table(storage, base)
        return Plan(self.table, name)

    def committed(self, name: str, plan: Plan | None) -> None:
        """``name`` was committed, written with ``plan``."""
        if plan is not None and plan.table is not None:
            self.source, self.table = name, plan.table


def place_reused(files: list, tensors: dict, reused: dict[str, dict]) -> tuple[str, ...]:
    """Point the index's entries of ``reused`` tensors (:meth:`Plan.report`, of every process of a
    sharded save) into the data files that hold them, each file added to ``files`` once, in place.
    Returns those files' names (the state file's ``refs`` of the new checkpoint)."""
    file_no = {f["name"]: i for i, f in enumerate(files)}
    refs = []
    for name, r in reused.items():
        fname = r["file"]["name"]
        if fname not in file_no:
            file_no[fname] = len(files)
            files.append(r["file"])
            refs.append(fname)
        tensors[name] = {**r["entry"], "file": file_no[fname]}
    return tuple(sorted(refs))


def refs_of(plan: Plan | None) -> tuple[str, ...]:
    return tuple(plan.refs()) if plan is not None else ()


def _version_of(t: fmt.TensorEntry) -> Any:
    if t.kind == _kinds.NUMPY:
        return None
    version = getattr(_kinds.get(t.kind), "version", None)
    return version(t.source) if version is not None else None


def _is_view(t: fmt.TensorEntry) -> bool:
    """Whether ``t.array()`` is free (a numpy array as it is), so keeping it saves nothing."""
    return isinstance(t.source, np.ndarray)


def _same_layout(t: fmt.TensorEntry, entry: dict) -> bool:
    return (
        not _chunks.is_chunked(entry)
        and entry["dtype"] == fmt.dtype_str(t.dtype)
        and entry["shape"] == list(t.shape)
        and entry.get("kind", _kinds.NUMPY) == t.kind
        and entry.get("byteorder", "<") == t.byteorder
    )


def full_checksum(arr: np.ndarray) -> str:
    """The checksum the index records, computed before writing (only for a possibly unchanged tensor)."""
    return fmt.checksum_bytes(_bytes_of(arr))


def _bytes_of(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1).view(np.uint8))


def probe(arr: np.ndarray) -> str:
    """The checksum of a tensor's first, middle and last 4 KiB (all of it when small)."""
    return probe_bytes(_bytes_of(arr))


def probe_bytes(data: memoryview, checksum: str | None = None) -> str:
    """:func:`probe` of a tensor's bytes (``checksum``: theirs, when known: a small tensor's probe)."""
    n = len(data)
    if n <= 3 * _PROBE_PIECE:
        return checksum or fmt.checksum_bytes(data)
    mid = (n - _PROBE_PIECE) // 2
    hasher = fmt.new_hasher()
    for begin in (0, mid, n - _PROBE_PIECE):
        hasher.update(data[begin : begin + _PROBE_PIECE])
    return fmt.checksum_str(hasher)


def table_of(index: Index) -> dict[str, Known]:
    """The reusable tensors of a committed checkpoint's index. A chunked tensor (a sharded save's)
    gives one entry per chunk, named as the writers name its pieces (``<name>@<offsets>``), so a
    piece that did not change is found whichever process writes it."""
    files = index["files"]
    table = {}
    for name, t in index["tensors"].items():
        if _chunks.is_chunked(t):
            keep = {k: t[k] for k in ("dtype", "byteorder") if k in t}
            for c in t["chunks"]:
                piece = {**keep, "shape": c["sizes"], **{k: c[k] for k in ("offset", "length", "checksum")}}
                table[_chunks.piece_name(name, c["offsets"])] = Known(piece, files[c["file"]])
            continue
        entry = {k: v for k, v in t.items() if k != "file"}
        table[name] = Known(entry, files[t["file"]])
    return table


def _known(previous: dict[str, Known], t: fmt.TensorEntry) -> Known | None:
    """The last checkpoint's tensor at ``t``'s name; for a piece that is a whole tensor
    (``<name>@0,0``: its sharding changed), that tensor's plain entry (the same bytes)."""
    known = previous.get(t.name)
    if known is not None:
        return known
    name, at, _ = t.name.rpartition("@")
    plain = previous.get(name) if at else None
    if plain is None or t.name != _chunks.piece_name(name, [0] * len(t.shape)):
        return None
    return Known({k: v for k, v in plain.entry.items() if k != "kind"}, plain.file, plain.probe)


def referenced_files(index: Index, name: str) -> list[str]:
    """The data files an index names that belong to other checkpoints (incremental references)."""
    return sorted(
        f["name"] for f in index["files"] if f.get("kind") != "meta" and not f["name"].startswith(name + ".")
    )


def read_table(storage: Storage, name: str | None) -> dict[str, Known]:
    """The reusable tensors of committed checkpoint ``name`` from its index ({} when unreadable:
    the next save is then a full one)."""
    if name is None:
        return {}
    try:
        return table_of(read_index(storage, name))
    except CheckpointError:
        return {}


def held_files(storage: Storage, records: list) -> set[str]:
    """Every data file the checkpoints of ``records`` (kept ``_state.Record``s) need: their own and
    those of other checkpoints they point into."""
    held: set[str] = set()
    for r in records:
        if r.refs is None:  # unknown (a record rebuilt from TensorFlow's fields): its index says
            try:
                held.update(referenced_files(read_index(storage, r.name, verify=False), r.name))
            except CheckpointError:
                pass
        else:
            held.update(r.refs)
        held.update(files_of(r.name, r.shards, storage))
    return held


def files_to_delete(storage: Storage, record: Any, held: set[str]) -> list[str]:
    """The files that deleting checkpoint ``record`` removes, index first: its own, and the earlier
    data files it pointed into, except those a kept checkpoint still points into (``held``)."""
    files = [record.name + INDEX_SUFFIX, *files_of(record.name, record.shards, storage)]
    files += [f for f in record.refs or () if may_reference(record.name, f) and f not in files]
    return [f for f in files if f not in held]
