"""The commands of ``ckpt-callbacks`` (ls, inspect, verify, gc, export), on the core library.

Each ``cmd_*`` takes the parsed arguments and returns the exit status; ``_cli`` parses the command line
and turns exceptions into one line on stderr. Core only: no framework is imported except ``torch`` by
``export --to torch``.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from typing import Any

# ---------------------------------------------------------------- what the CLI takes from the core
# Every name the commands use from the library is imported here and only here: the public API plus a
# few documented internals (path resolution and the index / meta / pointer readers of _resolve, the
# state-file reader, the storage handle, and the data-file reader that verifies without keeping
# tensors).
from .. import CheckpointManager
from .._api._resolve import (
    open_checkpoint,
    pointer_target,
    read_index,
    read_meta,
    resolve_checkpoint,
    resolve_one,
)
from .._checkpoint._checkpoint_read import read_files
from .._format import _chunks
from .._format import _format as _fmt
from .._format._names import INDEX_SUFFIX, STATE_FILE_NAME
from .._manager._foreign import refuse_foreign
from .._manager._state import checked_name, read_state
from .._storage import Storage
from ..errors import CheckpointError, CheckpointNotFoundError
from ._output import _human, _metrics_str, _Progress, _table, _utc

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2

# Status of a checkpoint in the state file's retention records -> why it is still on storage.
_KEPT_BECAUSE = {"active": "recent", "hourly": "hourly", "best": "best"}


class UsageError(ValueError):
    """A problem with what was asked (not with a checkpoint): one line on stderr, exit status 2."""


def _readable(path: str, options: dict | None) -> None:
    """Before a command reads ``path``: CheckpointNotFoundError when a local path does not exist, and
    IncompatibleCheckpointError naming another tool's file or directory (exit status 2 for both).

    Object-store "directories" are prefixes, which exist as soon as a file is under them: for those
    the command's own reading says what is missing.
    """
    storage = Storage(path, options)
    if (
        storage.is_local
        and not os.path.exists(storage.root)
        and not os.path.exists(storage.root + INDEX_SUFFIX)
    ):
        raise CheckpointNotFoundError(
            f"No checkpoint directory or file at {path!r}: the path does not exist."
        )
    refuse_foreign(path, options)


def _meta_of(path: str, options: dict | None) -> dict:
    try:
        return read_meta(path, options)
    except CheckpointError as e:
        return {"error": str(e)}


def _markers(storage: Storage, names: list[str]) -> list[tuple[str, str]]:
    """(marker, checkpoint) for every marker file ``FsspecCheckpointIO`` wrote in the directory.

    A marker ``last.ckpt`` names ``last.ckpt.<token>``, whose ``.index`` is in the listing, so only
    names that prefix an index are read (no read per file of a big directory).
    """
    indexes = {n[: -len(INDEX_SUFFIX)] for n in names if n.endswith(INDEX_SUFFIX)}
    candidates = sorted(n for n in set(names) - indexes if any(i.startswith(n + ".") for i in indexes))
    if storage.is_local:  # ModelCheckpoint(save_last="link"): last.ckpt is a symlink to another marker
        candidates += sorted(n for n in names if os.path.islink(storage.path(n)))
    out = []
    for n in candidates:
        target = pointer_target(storage, n)
        if target is not None and target in indexes:
            out.append((n, target))
    return out


def _verify_checkpoint(path: str, options: dict | None, progress: _Progress | None = None) -> None:
    """Check every checksum of one checkpoint, keeping no tensor; raises CorruptCheckpointError."""
    storage, _ = open_checkpoint(path, options)
    index = read_index(path, options)
    read_files(storage, index, _Discard(), verify=True, on_file=progress.advance if progress else None)


class _Discard(dict):
    """Verification reads each tensor, checks it, and keeps nothing (bounded memory)."""

    def __setitem__(self, key: str, value: Any) -> None:
        pass


# ---------------------------------------------------------------- ls


def _describe(storage: Storage, name: str, options: dict | None) -> dict:
    """step, size and metrics of one checkpoint, from its index and meta (no data file is read)."""
    path = storage.url_of(name)
    try:
        index = read_index(path, options, verify=False)
        # an incremental checkpoint points into earlier checkpoints' data files: those bytes are shared
        shared = sum(f["size"] for f in index["files"] if not f["name"].startswith(name + "."))
        size = sum(f["size"] for f in index["files"]) + (storage.size(name + INDEX_SUFFIX) or 0)
        meta = _meta_of(path, options)
        return {
            "step": index.get("step"),
            "size": size,
            "written": size - shared,
            "referenced": shared,
            "metrics": meta.get("metrics") or {},
            "meta_time": meta.get("time"),
        }
    except CheckpointError as e:
        unknown = dict.fromkeys(["step", "size", "written", "referenced", "meta_time"])
        return {**unknown, "metrics": {}, "error": str(e)}


def _ls_row(e: dict) -> list[str]:
    """One checkpoint of ``ls`` as a table row."""
    name = e["checkpoint"] + (" *" if e["latest"] else "") + (f" -> {e['target']}" if "target" in e else "")
    return [
        str(e["step"] if e["step"] is not None else "?"),
        _utc(e["time"]),
        _human(e["size"]) if e["size"] is not None else "?",
        e["kept_because"],
        _metrics_str(e["metrics"]) if "error" not in e else f"unreadable: {e['error'][:60]}",
        name,
    ]


def _state_and_markers(storage: Storage, not_found: str) -> tuple[Any, list[tuple[str, str]]]:
    """The directory's parsed state file (or None) and its marker files; CheckpointNotFoundError
    with ``not_found`` when it has neither."""
    parsed = read_state(storage)
    markers = _markers(storage, storage.list_names())
    if parsed is None and not markers:
        raise CheckpointNotFoundError(not_found)
    return parsed, markers


def cmd_ls(args: argparse.Namespace) -> int:
    _readable(args.directory, args.storage_options)
    storage = Storage(args.directory, args.storage_options)
    parsed, markers = _state_and_markers(
        storage,
        f"No checkpoints in {storage.url}: no '{STATE_FILE_NAME}' state file and no marker file "
        "written by FsspecCheckpointIO.",
    )
    doc: list[dict] = []
    latest = ""
    if parsed is not None:
        state, records, _ = parsed
        latest = checked_name(state.model_checkpoint_path) if state.model_checkpoint_path else ""
        names = [checked_name(n) for n in state.all_model_checkpoint_paths]
        if records is not None:
            reasons = {r.name: _KEPT_BECAUSE[r.status] for r in records}
            stamps = {r.name: r.timestamp for r in records}
        else:  # a state file TensorFlow wrote: its list is the max_to_keep window, older ones preserved
            stamps = dict(zip(names, state.all_model_checkpoint_timestamps))
            reasons = {
                n: "recent" if stamps.get(n, 0.0) > state.last_preserved_timestamp else "hourly"
                for n in names
            }
        for name in names:
            entry = {"checkpoint": name, "path": storage.url_of(name), "time": stamps.get(name)}
            entry.update(_describe(storage, name, args.storage_options))
            entry["kept_because"] = reasons.get(name, "recent")
            entry["latest"] = name == latest
            doc.append(entry)
    for marker, target in markers:
        entry = {"checkpoint": marker, "path": storage.url_of(marker), "target": target, "time": None}
        entry.update(_describe(storage, target, args.storage_options))
        entry["time"] = entry["meta_time"]  # no state file: the save time the meta recorded
        entry["kept_because"] = "marker"
        entry["latest"] = False
        doc.append(entry)
    for e in doc:
        del e["meta_time"]
    if args.json:
        print(json.dumps({"directory": storage.url, "latest": latest or None, "checkpoints": doc}, indent=2))
        return EXIT_OK
    rows = [_ls_row(e) for e in doc]
    legend = "* = latest; " if latest else ""
    print(f"{storage.url}  ({len(rows)} checkpoints; {legend}kept-because: see ckpt-callbacks ls --help)")
    print(_table(rows, ["step", "time (UTC)", "size", "kept-because", "metrics", "checkpoint"]))
    shared = [e for e in doc if e.get("referenced")]
    if shared:  # incremental checkpoints: size counts the bytes they share with earlier ones
        written, referenced = (_human(sum(e[k] for e in shared)) for k in ("written", "referenced"))
        print(f"{len(shared)} incremental checkpoint(s): {written} written, {referenced} shared (in size)")
    return EXIT_OK


# ---------------------------------------------------------------- inspect


def _tree_lines(node: Any, tensors: dict, indent: str = "") -> Iterable[str]:
    kind, val = _fmt.tree_view(node)
    if kind in ("dict", "list", "tuple"):
        for k, v in val if kind == "dict" else enumerate(val):
            label = f"{k!r}" if kind == "dict" else f"[{k}]"
            if _is_leaf(v):
                yield f"{indent}{label}: {_leaf_str(v, tensors)}"
            else:
                yield f"{indent}{label}:"
                yield from _tree_lines(v, tensors, indent + "  ")
        return
    yield indent + _leaf_str(node, tensors)


def _is_leaf(node: Any) -> bool:
    return _fmt.tree_view(node)[0] not in ("dict", "list", "tuple")


def _leaf_str(node: Any, tensors: dict) -> str:
    kind, val = _fmt.tree_view(node)
    if kind == "tensor":
        t = tensors.get(val, {})
        return f"<tensor {val} {t.get('dtype')} {tuple(t.get('shape', ()))}>"
    if kind == "float":
        return repr(val)
    if kind == "bytes":
        return f"<bytes, {val} B>"
    if kind == "scalar":
        return f"<{val} scalar>"
    if kind == "pickle":
        return "<pickled object>"
    return repr(node)


def _tensors_under(node: Any) -> list[str]:
    kind, val = _fmt.tree_view(node)
    if kind == "tensor":
        return [val]
    if kind in ("dict", "list", "tuple"):
        children = [v for _, v in val] if kind == "dict" else val
        return [t for v in children for t in _tensors_under(v)]
    return []


def _top_level(tree: Any, tensors: dict) -> list[dict]:
    """One summary per top-level entry of the state tree: its kind, tensor count and bytes, or value."""
    kind, val = _fmt.tree_view(tree)
    if _is_leaf(tree):
        pairs: list[tuple[Any, Any]] = [("(root)", tree)]
    else:
        pairs = list(val) if kind == "dict" else list(enumerate(val))
    out = []
    for key, node in pairs:
        names = _tensors_under(node)
        item: dict[str, Any] = {"key": key, "tensors": len(names)}
        item["bytes"] = sum(_chunks.nbytes(tensors[n]) for n in names if n in tensors)
        if _is_leaf(node):
            item["kind"] = "tensor" if names else "value"
            text = _leaf_str(node, tensors)
            item["value"] = text if len(text) <= 60 else text[:57] + "..."
        else:
            node_kind, entries = _fmt.tree_view(node)
            item["kind"] = node_kind
            item["entries"] = len(entries)
        out.append(item)
    return out


def _meta_summary(meta: dict) -> dict:
    model = meta.get("model")
    if isinstance(model, dict):
        model = (
            model.get("class_name") or model.get("class") or "{" + ", ".join(map(str, list(model)[:5])) + "}"
        )
    keys = ("framework", "framework_versions", "step", "epoch", "time", "metrics")
    summary = {k: meta.get(k) for k in keys if meta.get(k) not in (None, {}, [])}
    if model is not None:
        summary["model"] = model
    if "error" in meta:
        summary["error"] = meta["error"]
    return summary


def _print_meta_summary(summary: dict) -> None:
    """The meta lines of ``inspect`` (text): framework and versions, model, epoch, time, metrics."""
    for key in ("framework", "model", "epoch", "time", "metrics", "error"):
        if key not in summary:
            continue
        value = summary[key]
        if key == "framework" and summary.get("framework_versions"):
            value = f"{value} ({', '.join(f'{k} {v}' for k, v in summary['framework_versions'].items())})"
        elif key == "time":
            value = _utc(value) + " UTC"
        elif key == "metrics":
            value = _metrics_str(value)
        print(f"  {key}: {value}")


def cmd_inspect(args: argparse.Namespace) -> int:
    _readable(args.path, args.storage_options)
    path = resolve_checkpoint(args.path, args.storage_options, checkpoint=args.checkpoint)
    index = read_index(path, args.storage_options)
    meta = _meta_of(path, args.storage_options)
    tensors = index["tensors"]
    total = sum(_chunks.nbytes(t) for t in tensors.values())
    top = _top_level(index["tree"], tensors)
    if args.json:
        doc: dict[str, Any] = {
            "checkpoint": path,
            "step": index["step"],
            "tensor_count": len(tensors),
            "total_bytes": total,
            "top_level": top,
            "meta": meta if args.full else _meta_summary(meta),
        }
        if args.full:
            doc["tensors"] = [
                {"name": n, "dtype": t["dtype"], "shape": t["shape"], "bytes": _chunks.nbytes(t)}
                for n, t in sorted(tensors.items())
            ]
            doc["files"] = index["files"]
            doc["tree"] = index["tree"]
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"{path}  step {index['step']}  {len(tensors)} tensors, {_human(total)}")
    _print_meta_summary(_meta_summary(meta))
    if not args.full:
        print("\ntop level of the state:")
        rows = []
        for item in top:
            if item["kind"] in ("tensor", "value"):
                what = item["value"]
            else:
                what = f"{item['kind']} of {item['entries']}"
                what += f", {item['tensors']} tensors, {_human(item['bytes'])}" if item["tensors"] else ""
            rows.append([f"  {item['key']}", what])
        print(_table(rows, ["  key", "content"]))
        print("\n(--full: every tensor, the whole tree and meta; --json: machine-readable)")
        return EXIT_OK
    print()
    rows = [
        [n, t["dtype"], str(tuple(t["shape"])), _human(_chunks.nbytes(t))] for n, t in sorted(tensors.items())
    ]
    print(_table(rows, ["tensor", "dtype", "shape", "bytes"]))
    print("\ntree:")
    for line in _tree_lines(index["tree"], tensors, "  "):
        print(line)
    print("\nmeta:")
    print(json.dumps(meta, indent=2))
    return EXIT_OK


# ---------------------------------------------------------------- verify


def _verify_targets(args: argparse.Namespace) -> list[str]:
    if args.checkpoint:  # one checkpoint of the directory, not skipped when it is corrupt (verify=False)
        return [resolve_checkpoint(args.path, args.storage_options, verify=False, checkpoint=args.checkpoint)]
    one = resolve_one(args.path, args.storage_options)  # a checkpoint, its .index, or a marker
    if one is not None:
        return [one]
    storage = Storage(args.path, args.storage_options)
    parsed, markers = _state_and_markers(
        storage,
        f"No checkpoint or checkpoint directory at {args.path!r}: expected a checkpoint path (with a "
        f"'.index' file), a marker file, or a directory with a '{STATE_FILE_NAME}' state file.",
    )
    names = []
    if parsed is not None:
        state = parsed[0]
        names = list(dict.fromkeys([*state.all_model_checkpoint_paths, state.model_checkpoint_path]))
        names = [checked_name(n) for n in names if n]
    names += [target for _, target in markers if target not in names]
    return [storage.url_of(n) for n in names]


def cmd_verify(args: argparse.Namespace) -> int:
    _readable(args.path, args.storage_options)
    targets = _verify_targets(args)
    total = 0
    for path in targets:
        try:
            total += sum(f["size"] for f in read_index(path, args.storage_options, verify=False)["files"])
        except CheckpointError:
            pass
    progress = None if args.json else _Progress(total, "verify")
    results = []
    for path in targets:
        try:
            _verify_checkpoint(path, args.storage_options, progress)
            results.append({"checkpoint": path, "ok": True, "problem": None})
        except CheckpointError as e:
            results.append({"checkpoint": path, "ok": False, "problem": str(e)})
    if progress:
        progress.close()
    bad = sum(not r["ok"] for r in results)
    if args.json:
        print(json.dumps({"ok": not bad, "corrupt": bad, "checkpoints": results}, indent=2))
    else:
        for r in results:
            print(f"OK      {r['checkpoint']}" if r["ok"] else f"CORRUPT {r['checkpoint']}: {r['problem']}")
    return EXIT_CORRUPT if bad else EXIT_OK


# ---------------------------------------------------------------- gc


def cmd_gc(args: argparse.Namespace) -> int:
    storage = Storage(args.directory, args.storage_options)
    # A local path that does not exist would be created; object-store "directories" are prefixes,
    # which may hold nothing but a killed save's pending uploads.
    _readable(args.directory, args.storage_options)
    if storage.is_local and not os.path.isdir(storage.root):
        raise UsageError(f"gc takes a checkpoint directory; {args.directory!r} is a file.")
    mgr = CheckpointManager(
        args.directory, prefix=args.prefix, max_to_keep=None, storage_options=args.storage_options
    )
    mgr.close()
    for name in mgr.removed_leftovers:
        print(f"removed {storage.url_of(name)}")
    for name in mgr.aborted_uploads:
        print(f"aborted pending upload of {storage.url_of(name)}")
    print(f"{len(mgr.removed_leftovers)} leftover file(s) removed from {mgr.directory}")
    return EXIT_OK
