"""``ckpt-callbacks`` (also ``python -m ckpt_callbacks``): look at, check and export checkpoints.

Exit status: 0 ok, 1 corruption found, 2 usage error or nothing found. Core only: no framework is
imported except ``torch`` by ``export --to torch``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import numpy as np

from . import _chunks
from . import _format as fmt
from ._manager import (
    INDEX_SUFFIX,
    CheckpointManager,
    _load,
    _read_data_file,
    _read_index,
    _split,
    read_meta,
    resolve_checkpoint,
    resolve_one,
)
from ._retention import kept_because
from ._state import MAX_STATE_FILE_BYTES, STATE_FILE_NAME, checked_name, parse_state
from ._storage import Storage
from .errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError

EXIT_OK, EXIT_CORRUPT, EXIT_USAGE = 0, 1, 2


def _options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs; values that parse as JSON (numbers, booleans, objects) are taken as such.

    A dotted key nests: ``client_kwargs.endpoint_url=http://...``.
    """
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--storage-option expects KEY=VALUE. Received: {pair!r}.")
        key, value = pair.split("=", 1)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return out


class _Progress:
    """A one-line progress bar on stderr, only when it is a terminal."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.done, self.label = max(total, 1), 0, label
        self.on = sys.stderr.isatty()

    def advance(self, n: int) -> None:
        self.done += n
        if self.on:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac:6.1%}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.on:
            sys.stderr.write("\n")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------- commands


def cmd_ls(args: argparse.Namespace) -> int:
    storage = Storage(args.directory, args.storage_options)
    try:
        state, records = parse_state(storage.read_bytes(STATE_FILE_NAME, max_bytes=MAX_STATE_FILE_BYTES))
    except CheckpointNotFoundError:
        print(f"No checkpoints in {storage.url} (no '{STATE_FILE_NAME}' state file).", file=sys.stderr)
        return EXIT_USAGE
    statuses = {r.name: kept_because(r) for r in records or []}
    latest = checked_name(state.model_checkpoint_path) if state.model_checkpoint_path else ""
    rows, doc = [], []
    for name, ts in zip(
        state.all_model_checkpoint_paths, state.all_model_checkpoint_timestamps or [None] * 10**6
    ):
        checked_name(name)
        size, metrics, step = None, {}, None
        try:
            index = _read_index(storage, name, verify=False)
            size = sum(f["size"] for f in index["files"]) + (storage.size(name + INDEX_SUFFIX) or 0)
            step = index.get("step")
            metrics = read_meta(storage.url_of(name), args.storage_options).get("metrics", {})
        except CheckpointError as e:
            metrics = {"error": str(e)[:60]}
        reasons = [statuses.get(name, "latest")]
        if name == latest and "latest" not in reasons:
            reasons.insert(0, "latest")
        entry = {
            "checkpoint": name,
            "path": storage.url_of(name),
            "step": step,
            "time": ts,
            "size": size,
            "kept_because": reasons,
            "metrics": metrics,
        }
        doc.append(entry)
        when = (
            datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
            if ts
            else "?"
        )
        rows.append(
            [
                str(step if step is not None else "?"),
                when,
                _human(size) if size is not None else "?",
                ",".join(reasons),
                " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
                name + (" *" if name == latest else ""),
            ]
        )
    if args.json:
        print(json.dumps({"directory": storage.url, "latest": latest, "checkpoints": doc}, indent=2))
    else:
        print(f"{storage.url}  ({len(rows)} checkpoints, * = latest)")
        print(_table(rows, ["step", "time (UTC)", "size", "kept-because", "metrics", "checkpoint"]))
    return EXIT_OK


def _tree_lines(node: Any, tensors: dict, indent: str = "") -> Iterable[str]:
    if isinstance(node, dict) and len(node) == 1:
        ((tag, val),) = node.items()
        if tag in ("d", "od"):
            for k, v in val:
                if _is_leaf(v):
                    yield f"{indent}{k!r}: {_leaf_str(v, tensors)}"
                else:
                    yield f"{indent}{k!r}:"
                    yield from _tree_lines(v, tensors, indent + "  ")
            return
        if tag in ("l", "t"):
            for i, v in enumerate(val):
                if _is_leaf(v):
                    yield f"{indent}[{i}]: {_leaf_str(v, tensors)}"
                else:
                    yield f"{indent}[{i}]:"
                    yield from _tree_lines(v, tensors, indent + "  ")
            return
    yield indent + _leaf_str(node, tensors)


def _is_leaf(node: Any) -> bool:
    return not (isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("d", "od", "l", "t"))


def _leaf_str(node: Any, tensors: dict) -> str:
    if isinstance(node, dict) and len(node) == 1:
        ((tag, val),) = node.items()
        if tag == "x":
            t = tensors.get(val, {})
            return f"<tensor {val} {t.get('dtype')} {tuple(t.get('shape', ()))}>"
        if tag == "f":
            return repr(float(val))
        if tag == "b":
            return f"<bytes, {len(fmt._b64(val))} B>"
        if tag == "s":
            return f"<{val[0]} scalar>"
        if tag == "p":
            return "<pickled object>"
    return repr(node)


def cmd_inspect(args: argparse.Namespace) -> int:
    path = resolve_checkpoint(args.path, args.storage_options)
    directory, name = _split(path)
    storage = Storage(directory, args.storage_options)
    index = _read_index(storage, name)
    try:
        meta = read_meta(path, args.storage_options)
    except CheckpointError as e:
        meta = {"error": str(e)}
    tensors = index["tensors"]
    if args.json:
        print(
            json.dumps(
                {
                    "checkpoint": storage.url_of(name),
                    "step": index["step"],
                    "tensors": [
                        {"name": n, "dtype": t["dtype"], "shape": t["shape"], "bytes": _chunks.nbytes(t)}
                        for n, t in sorted(tensors.items())
                    ],
                    "files": index["files"],
                    "tree": index["tree"],
                    "meta": meta,
                },
                indent=2,
            )
        )
        return EXIT_OK
    total = sum(_chunks.nbytes(t) for t in tensors.values())
    print(f"{storage.url_of(name)}  step {index['step']}  {len(tensors)} tensors, {_human(total)}")
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


class _Discard(dict):
    """Verification reads each tensor, checks it, and keeps nothing (bounded memory)."""

    def __setitem__(self, key: str, value: Any) -> None:
        pass


def _verify_one(storage: Storage, name: str, progress: _Progress | None = None) -> str | None:
    """None if the checkpoint verifies, else the problem (naming file and tensor)."""
    try:
        index = _read_index(storage, name)
        _chunks.split(index)  # a sharded save's chunks are verified as tensors of their own
        by_file: dict[int, list] = {}
        for tname, t in index["tensors"].items():
            by_file.setdefault(t["file"], []).append((tname, t))
        for file_no, f in enumerate(index["files"]):
            if f.get("kind") == "meta":
                data = storage.read_bytes(f["name"], max_bytes=f["size"] + 1)
                if len(data) != f["size"] or fmt.checksum_bytes(data) != f["checksum"]:
                    return f"{storage.url_of(f['name'])}: size or checksum does not match the index"
                continue
            tensors = sorted(by_file.get(file_no, []), key=lambda x: x[1]["offset"])
            _read_data_file(storage, f, tensors, _Discard(), True)
            if progress:
                progress.advance(f["size"])
    except CheckpointError as e:
        return str(e)
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    one = resolve_one(args.path, args.storage_options)  # a checkpoint, its .index, or a marker file
    if one is not None:
        directory, name = _split(one)
        targets = [(Storage(directory, args.storage_options), name)]
    else:
        storage = Storage(args.path, args.storage_options)
        try:
            state, _ = parse_state(storage.read_bytes(STATE_FILE_NAME, max_bytes=MAX_STATE_FILE_BYTES))
        except CheckpointNotFoundError:
            print(f"No checkpoint or checkpoint directory at {args.path!r}.", file=sys.stderr)
            return EXIT_USAGE
        except CorruptCheckpointError as e:
            print(f"CORRUPT {storage.url_of(STATE_FILE_NAME)}: {e}")
            return EXIT_CORRUPT
        names = list(dict.fromkeys([*state.all_model_checkpoint_paths, state.model_checkpoint_path]))
        try:
            targets = [(storage, checked_name(n)) for n in names if n]
        except CorruptCheckpointError as e:
            print(f"CORRUPT {storage.url_of(STATE_FILE_NAME)}: {e}")
            return EXIT_CORRUPT
    total = 0
    for st, n in targets:
        try:
            total += sum(f["size"] for f in _read_index(st, n, verify=False)["files"])
        except CheckpointError:
            pass
    progress = _Progress(total, "verify")
    bad = 0
    for st, n in targets:
        problem = _verify_one(st, n, progress)
        if problem:
            bad += 1
            print(f"CORRUPT {st.url_of(n)}: {problem}")
        else:
            print(f"OK      {st.url_of(n)}")
    progress.close()
    return EXIT_CORRUPT if bad else EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    storage = Storage(args.directory, args.storage_options)
    # A local path that does not exist would be created; object-store "directories" are prefixes,
    # which may hold nothing but a killed save's pending uploads.
    if storage.is_local and not os.path.isdir(storage.root):
        print(f"No checkpoint directory at {args.directory!r}.", file=sys.stderr)
        return EXIT_USAGE
    mgr = CheckpointManager(
        args.directory, prefix=args.prefix, max_to_keep=None, storage_options=args.storage_options
    )
    mgr.close()
    for name in mgr.removed_leftovers:
        print(f"removed {mgr._storage.url_of(name)}")
    for name in mgr.aborted_uploads:
        print(f"aborted pending upload of {mgr._storage.url_of(name)}")
    print(f"{len(mgr.removed_leftovers)} leftover file(s) removed from {mgr.directory}")
    return EXIT_OK


def _flat_tensors(tree: Any, prefix: str = "") -> dict[str, Any]:
    """name -> tensor for every array leaf, named by its key path."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat_tensors(v, f"{prefix}{k}/"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat_tensors(v, f"{prefix}{i}/"))
    elif isinstance(tree, np.ndarray) or type(tree).__module__ == "torch":
        out[prefix.rstrip("/")] = tree
    return out


def cmd_export(args: argparse.Namespace) -> int:
    directory, name = _split(resolve_checkpoint(args.path, args.storage_options))
    storage = Storage(directory, args.storage_options)
    state = _load(storage, name, verify=True, allow_pickle=False)
    tensors = _flat_tensors(state)
    if args.only:
        tensors = {k: v for k, v in tensors.items() if k.startswith(args.only)}
    progress = _Progress(len(tensors), f"export {args.to}")
    if args.to == "torch":
        try:
            import torch
        except ImportError:
            print("export --to torch needs PyTorch: pip install 'ckpt-callbacks[lightning]'", file=sys.stderr)
            return EXIT_USAGE
        from . import _torch

        out = {
            k: v if isinstance(v, torch.Tensor) else _torch.from_numpy(np.ascontiguousarray(v))
            for k, v in tensors.items()
        }
        torch.save(out, args.out)
    else:
        arrays = {k: v if isinstance(v, np.ndarray) else _to_numpy(v) for k, v in tensors.items()}
        if args.to == "npz":
            native = {}
            for k, a in arrays.items():
                if a.dtype.name in fmt._ML_DTYPE_NAMES:  # npz readers know no ml_dtypes: widen losslessly
                    print(f"note: {k} ({a.dtype.name}) is stored as float32 in the npz", file=sys.stderr)
                    a = a.astype(np.float32)
                native[k] = a
            np.savez(args.out, **native)
        else:
            entries = [fmt.TensorEntry(k, a.dtype, a.shape, a) for k, a in arrays.items()]
            header, _ = fmt.safetensors_header(entries)
            with open(args.out, "wb") as f:
                f.write(header)
                for e in entries:
                    for chunk in fmt.iter_tensor_bytes(np.ascontiguousarray(e.source)):
                        f.write(chunk)
                    progress.advance(1)
    progress.close()
    print(f"wrote {len(tensors)} tensors to {args.out} ({args.to})")
    return EXIT_OK


def _to_numpy(t: Any) -> np.ndarray:
    from . import _torch

    return _torch.to_numpy(t)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-callbacks", description="Inspect, verify, clean and export ckpt_callbacks checkpoints."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fsspec storage option (repeatable; dotted keys nest, values may be JSON)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", parents=[common], help="list the checkpoints of a directory")
    p.add_argument("directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("inspect", parents=[common], help="tensors, tree and meta of one checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("verify", parents=[common], help="check every checksum; exit 1 on corruption")
    p.add_argument("path", help="a checkpoint path or a checkpoint directory")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("gc", parents=[common], help="remove leftovers of interrupted saves")
    p.add_argument("directory")
    p.add_argument("--prefix", default="ckpt")
    p.set_defaults(func=cmd_gc)
    p = sub.add_parser("export", parents=[common], help="write the tensors as safetensors, torch or npz")
    p.add_argument("path")
    p.add_argument("--to", choices=["safetensors", "torch", "npz"], required=True)
    p.add_argument("--only", default="", metavar="PREFIX", help="only tensors whose name starts with PREFIX")
    p.add_argument("out")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.storage_options = _options(args.storage_option) or None
        return args.func(args)
    except CheckpointNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CorruptCheckpointError as e:
        print(f"CORRUPT: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
