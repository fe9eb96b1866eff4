"""``FsspecCheckpointIO``: Lightning's ``CheckpointIO`` writing this library's format through fsspec.

Lightning hands a checkpoint IO one *file* path per checkpoint (``.../epoch=0-step=10.ckpt``,
``.../last.ckpt``) and then checks that path with ``fs.exists`` / ``fs.modified`` / ``fs.ls``
(``ModelCheckpoint``'s version counter, ``ckpt_path="last"``, ``save_top_k`` removals). Our format is
several files, so the path Lightning names becomes a small JSON *marker* file, written last, that
names the checkpoint files next to it::

    epoch=0-step=10.ckpt                           marker: {"format": "ckpt_callbacks.lightning", ...}
    epoch=0-step=10.ckpt.3f9a0c1e.data-00000-of-00001
    epoch=0-step=10.ckpt.3f9a0c1e.meta
    epoch=0-step=10.ckpt.3f9a0c1e.index

A marker name containing ``ckpt_`` (``hpc_ckpt_3.ckpt``) has its files spelled ``ckpt+_``
(:func:`side_name`): Lightning's SLURM requeue reads digits after ``ckpt_`` in every file name.

Each save writes under a fresh 8-hex token and replaces the marker atomically, so re-saving
``last.ckpt`` never leaves a half-overwritten checkpoint: a crash leaves the previous marker naming
the previous, complete files. The files of the replaced token are deleted after the new marker is
committed; leftovers of a crashed save (same name, unreferenced token) are deleted on the next save
or removal of that path. Only files matching this naming are ever deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import torch

from .. import _storage
from .._api._resolve import POINTER_FORMAT as MARKER_FORMAT
from .._api._resolve import load_checkpoint as _core_load
from .._api._resolve import pointer_bytes, resolve_checkpoint, resolve_one
from .._api._resolve import pointer_target as _read_marker
from .._api._resolve import save_checkpoint as _core_save
from .._checkpoint._checkpoint_io import jsonable
from .._format._names import INDEX_SUFFIX, STATE_FILE_NAME
from .._format._names import join_url as _join
from .._manager import _foreign
from .._validation import check_checkpoint_choice
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
)
from . import _compat, _convert

_TOKEN_RE = r"[0-9a-f]{8}"
_FILE_KINDS = r"(?:\.index|\.meta|\.data-\d{5}-of-\d{5})"


def _jsonable(x: Any) -> Any:
    """A JSON-safe description of hyper-parameters for the ``.meta`` file (repr for anything else)."""
    return jsonable(x, other=lambda v: repr(v)[:200])


def split_path(path: str | os.PathLike) -> tuple[str, str]:
    """(directory, file name) of a local path or fsspec URL."""
    p = os.fspath(path)
    if "://" in p:
        protocol, rest = p.split("://", 1)
        head, base = posixpath.split(rest.rstrip("/"))
        return f"{protocol}://{head}", base
    head, base = os.path.split(p.rstrip(os.sep) or p)
    return head or ".", base


def resolve_ours(path: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """The core checkpoint path behind ``path`` if it is in this library's format, else None.

    Accepted: a marker file written by :class:`FsspecCheckpointIO`; a checkpoint prefix
    (``.../ckpt-100``, has a ``.index``); its ``.index``, ``.meta`` or data file; a directory with a
    ``checkpoint`` state file (its newest valid checkpoint).
    """
    one = resolve_one(path, storage_options)
    if one is not None:
        return one
    # One of a checkpoint's other files (a directory listing hands those out too): its checkpoint.
    side = re.fullmatch(r"(?P<prefix>.+)(?:\.meta|\.data-\d{5}-of-\d{5})", os.fspath(path))
    if side is not None:
        one = resolve_one(side.group("prefix"), storage_options)
        if one is not None:
            return one
    sub = _storage.Storage(os.fspath(path), storage_options)
    if sub.exists(STATE_FILE_NAME):
        return resolve_checkpoint(os.fspath(path), storage_options)
    return None


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = _to_device(v, device)
        return obj
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if type(obj) is tuple:
        return tuple(_to_device(v, device) for v in obj)
    return obj


def load_lightning_checkpoint(
    path: str, storage_options: dict | None = None, allow_pickle: bool = False, map_location: Any = None
) -> dict[str, Any]:
    """Load one checkpoint of this format (a core checkpoint path) as Lightning's checkpoint dict."""
    state = _core_load(path, storage_options=storage_options, allow_pickle=allow_pickle)
    return _to_map_location(_convert.from_tree(state), map_location)


def is_http(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(("http://", "https://"))


_SAFE_NAME = re.compile(r"[A-Za-z0-9_.=+-]+")


@contextlib.contextmanager
def fetched_over_http(url: str, storage_options: dict | None = None) -> Iterator[str]:
    """A local copy of the checkpoint an http(s) URL names, read with whole-file GETs.

    Plain web servers often ignore byte ranges, which every other read path uses; Lightning's own
    ``ckpt_path="https://..."`` downloads the whole file too. Accepts the forms of
    :func:`resolve_ours` (prefix, ``.index``, marker, directory = its newest checkpoint).
    """
    import fsspec

    fs = fsspec.filesystem(url.split("://", 1)[0], **(storage_options or {}))

    def get(u: str) -> bytes | None:
        try:
            return fs.cat_file(u)
        except FileNotFoundError:
            return None

    url = url.rstrip("/")
    directory = url.rsplit("/", 1)[0]
    prefix, index = url, get(url + INDEX_SUFFIX)
    if index is None:
        body = get(url)
        if body is not None and body.startswith(b'{"format":"' + MARKER_FORMAT.encode()):
            prefix = f"{directory}/{_checked(json.loads(body).get('checkpoint'), url)}"
        elif body is not None and url.endswith(INDEX_SUFFIX):
            prefix, index = url[: -len(INDEX_SUFFIX)], body
        else:
            from .._manager._state import parse_state

            state_file = get(f"{url}/{STATE_FILE_NAME}")
            if state_file is None:
                raise CheckpointNotFoundError(
                    f"No checkpoint at {url!r}: expected a checkpoint path (with a '.index' file), its "
                    "'.index' file, a marker file, or a directory with a 'checkpoint' state file."
                )
            prefix = f"{url}/{_checked(parse_state(state_file)[0].model_checkpoint_path, url)}"
        index = index if index is not None else get(prefix + INDEX_SUFFIX)
        if index is None:
            raise CheckpointNotFoundError(f"No file {prefix + INDEX_SUFFIX!r}.")
    try:
        files = [_checked(f.get("name"), prefix) for f in json.loads(index).get("files") or []]
    except (ValueError, AttributeError):
        raise CorruptCheckpointError(f"Checkpoint index {prefix + INDEX_SUFFIX!r} is not valid.") from None
    local = tempfile.mkdtemp(prefix="ckpt-http-")
    try:
        name = _checked(prefix.rsplit("/", 1)[-1], prefix)
        base = prefix.rsplit("/", 1)[0]
        with open(os.path.join(local, name + INDEX_SUFFIX), "wb") as f:
            f.write(index)
        for fname in files:
            data = get(f"{base}/{fname}")
            if data is None:
                raise CheckpointNotFoundError(
                    f"No file {base}/{fname!r} (named by {prefix + INDEX_SUFFIX!r})."
                )
            with open(os.path.join(local, fname), "wb") as f:
                f.write(data)
        yield os.path.join(local, name)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _checked(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise CorruptCheckpointError(f"{where!r} names an invalid checkpoint file {str(name)[:80]!r}.")
    return name


def load_any(
    path: Any,
    storage_options: dict | None,
    allow_pickle: bool,
    dropped: list | None = None,
    ns: str | None = None,
    checkpoint: str = "latest",
) -> tuple[str, dict[str, Any]] | None:
    """(checkpoint path, Lightning checkpoint dict) for any path form this format accepts, else None.

    ``checkpoint="best"``: the best checkpoint a directory's manager kept (``keep_best``); ``path``
    must then be that directory.
    """
    check_checkpoint_choice(checkpoint)
    if checkpoint != "latest":
        if is_http(path):
            raise ValueError(
                f"checkpoint={checkpoint!r} is not supported over http(s). Received: {os.fspath(path)!r}. "
                "Pass the checkpoint's own URL instead of its directory's."
            )
        target = resolve_checkpoint(os.fspath(path), storage_options, checkpoint=checkpoint)
        state = _core_load(target, storage_options=storage_options, allow_pickle=allow_pickle)
        return target, _convert.from_tree(state, dropped=dropped, ns=ns)
    if is_http(path):
        with fetched_over_http(os.fspath(path), storage_options) as local:
            state = _core_load(local, allow_pickle=allow_pickle)
        return os.fspath(path), _convert.from_tree(state, dropped=dropped, ns=ns)
    target = resolve_ours(path, storage_options)
    if target is None:
        return None
    state = _core_load(target, storage_options=storage_options, allow_pickle=allow_pickle)
    return target, _convert.from_tree(state, dropped=dropped, ns=ns)


def _to_map_location(checkpoint: dict[str, Any], map_location: Any) -> dict[str, Any]:
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        if device.type != "cpu":
            checkpoint = _to_device(checkpoint, device)
    return checkpoint


def side_name(marker: str) -> str:
    """The name the checkpoint files of ``marker`` start with (before ``.<token>``).

    Lightning's SLURM requeue reads the digits after every ``ckpt_`` in the folder's file names as
    version numbers (``hpc_ckpt_3.ckpt`` -> 3), so our files next to ``hpc_ckpt_3.ckpt`` must not
    contain ``ckpt_``. Escaping ``+`` first keeps the mapping one-to-one: two markers never share
    a side name, so removing one marker's files never touches another's.
    """
    return marker.replace("+", "++").replace(_compat.HPC_NAME_KEY, "ckpt+_")


class FsspecCheckpointIO(_compat.Bound):
    """A Lightning ``CheckpointIO`` that writes ckpt_callbacks checkpoints to any fsspec URL, pickle-free.

    With it, Lightning's own ``ModelCheckpoint`` (``save_top_k``, ``save_last``, ``every_n_train_steps``,
    ``ckpt_path="last"`` / ``"best"`` / a path) works unchanged. The path Lightning names
    (``.../epoch=0-step=10.ckpt``) becomes a small marker file, written last as the commit point,
    that names the checkpoint's data / meta / index files next to it (``<path>.<token>.index`` ...).
    Loading accepts such a marker, a ckpt_callbacks checkpoint prefix (``.../ckpt-100``), its
    ``.index`` file, or a directory with a ``checkpoint`` state file.

    Args:
        storage_options: passed to fsspec for every path (credentials, endpoint, ...). Options that
            Lightning passes to ``save_checkpoint`` (``trainer.save_checkpoint(..., storage_options=)``)
            override these.
        allow_pickle: store (and load) leaves that are not plain tree types with pickle. Off by
            default: loading never executes code. With it, legacy ``torch.save`` files are loaded too.

    Example:
        >>> trainer = Trainer(
        ...     plugins=[FsspecCheckpointIO()],
        ...     callbacks=[ModelCheckpoint(dirpath="s3://bucket/run", save_top_k=2, monitor="val_loss", save_last=True)],
        ... )
        >>> trainer.fit(model)
        >>> trainer.fit(model, ckpt_path="last")   # resumes from s3://bucket/run/last.ckpt
    """

    _role = "checkpoint_io"

    def __init__(self, storage_options: dict | None = None, allow_pickle: bool = False) -> None:
        if storage_options is not None and not isinstance(storage_options, dict):
            raise TypeError(
                f"storage_options must be a dict or None. Received: storage_options={storage_options!r}. "
                "Pass fsspec options such as {'anon': False}."
            )
        if not isinstance(allow_pickle, bool):
            raise TypeError(f"allow_pickle must be a bool. Received: allow_pickle={allow_pickle!r}.")
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle
        self._warned_hparams: set[str] = set()  # hparams left out of the checkpoints, warned once

    def _options(self, extra: Any = None) -> dict | None:
        if extra is not None and not isinstance(extra, dict):
            raise TypeError(
                f"storage_options must be a dict of fsspec options. Received: storage_options={extra!r}."
            )
        merged = {**self.storage_options, **(extra or {})}
        return merged or None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        """Write ``checkpoint`` as ``<path>.<token>.*`` files, then the marker ``path`` (the commit point)."""
        options = self._options(storage_options)
        directory, name = split_path(path)
        storage = _storage.Storage(directory, options)
        storage.makedirs()
        previous = _read_marker_quietly(storage, name)
        target = f"{side_name(name)}.{uuid.uuid4().hex[:8]}"
        tree = _convert.to_tree(checkpoint, allow_pickle=self.allow_pickle, warned=self._warned_hparams)
        step = checkpoint.get("global_step")
        ns = self._namespaces[0]
        info = {
            "framework": "lightning",
            "framework_versions": {ns: _compat.version(ns), "torch": torch.__version__},
            "model": {"hparams": _jsonable(dict(checkpoint.get("hyper_parameters") or {}))},
            "epoch": checkpoint.get("epoch"),
            "lightning": {"path": name},
        }
        _core_save(
            _join(directory, target),
            tree,
            storage_options=options,
            allow_pickle=self.allow_pickle,
            _step=step if isinstance(step, int) else None,
            _info=info,
        )
        storage.write_bytes(name, pointer_bytes(target))
        storage.sync_dir()
        _remove_unreferenced(storage, name, keep=target, also=previous)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's checkpoint dict from ``path`` (never unpickles unless ``allow_pickle=True``)."""
        found = load_any(path, self._options(), self.allow_pickle)
        if found is None:
            return self._load_foreign(path, map_location, weights_only)
        return _to_map_location(found[1], map_location)

    def _load_foreign(self, path: Any, map_location: Any, weights_only: bool | None) -> dict[str, Any]:
        directory, name = split_path(path)
        if not _storage.Storage(directory, self._options()).exists(name):
            raise CheckpointNotFoundError(
                f"Checkpoint file not found: {os.fspath(path)!r}. Expected a checkpoint written by "
                "FsspecCheckpointIO or CheckpointCallback (a marker file, a checkpoint prefix with a '.index' "
                "file, or a directory with a 'checkpoint' state file)."
            )
        if self.allow_pickle:
            torch_io = _compat.submodule(self._namespaces[0], "fabric", "plugins.io.torch_io")
            return torch_io.TorchCheckpointIO().load_checkpoint(
                path, map_location=map_location, weights_only=weights_only
            )
        what = _foreign.identify(path, self._options()) or (
            f"{os.fspath(path)!r} is not a ckpt_callbacks checkpoint (probably a torch.save file)."
        )
        raise IncompatibleCheckpointError(
            f"{what} Loading it through FsspecCheckpointIO would unpickle it: pass "
            "FsspecCheckpointIO(allow_pickle=True) if you trust it, or re-save it with FsspecCheckpointIO."
        )

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the marker first (the checkpoint stops existing), then its files; other paths as fsspec does."""
        options = self._options()
        directory, name = split_path(path)
        storage = _storage.Storage(directory, options)
        target = _read_marker_quietly(storage, name)
        if target is not None:
            storage.remove([name])
            storage.sync_dir()
            _remove_unreferenced(storage, name, keep=None, also=target)
            return
        if storage.exists(name + INDEX_SUFFIX):  # a core checkpoint prefix: index first
            _remove_unreferenced(storage, None, keep=None, also=name)
            return
        if storage.fs.exists(storage.path(name)):
            storage.fs.rm(storage.path(name), recursive=True)


def refuse_stock_checkpoints(directory: str, storage_options: dict | None, shown: int = 5) -> None:
    """Raise IncompatibleCheckpointError when ``directory`` holds Lightning ``.ckpt`` files of ``torch.save``.

    Called when a resume found no checkpoint of this format there: training would start from step 0
    next to someone's checkpoints. Markers written by :class:`FsspecCheckpointIO` are this format and
    do not count. Only names and 64-byte heads are read; the files are never modified or deleted.
    """
    storage = _storage.Storage(directory, storage_options)
    names = sorted(
        (n for n in storage.list_names() if n.endswith(".ckpt")), key=lambda n: (n != "last.ckpt", n)
    )
    found = [n for n in names if not storage.read_bytes(n, max_bytes=64).startswith(b'{"format":')]
    if not found:
        return
    listed = ", ".join(found[:shown]) + (f", ... ({len(found)} in all)" if len(found) > shown else "")
    newest = _join(directory, found[0])
    raise IncompatibleCheckpointError(
        f"{storage.url!r} holds Lightning checkpoint files written by torch.save ({listed}) and no checkpoint "
        "of ckpt_callbacks, so resume=True has nothing to resume from and training would start from step 0 "
        "next to them. Expected a new directory or one written by ckpt_callbacks. Received: "
        f"directory={storage.url!r}. To continue from one of them, pass it once: "
        f"trainer.fit(model, ckpt_path={newest!r}) with CheckpointCallback(..., allow_pickle=True) (it is "
        "unpickled: only if you trust it); the saves that follow are in this library's format and resume "
        "from here. To start from scratch, use another directory or resume=False. Their files are left "
        "untouched."
    )


def _read_marker_quietly(storage: _storage.Storage, name: str) -> str | None:
    try:
        return _read_marker(storage, name)
    except CorruptCheckpointError:
        return None


def _remove_unreferenced(
    storage: _storage.Storage, marker: str | None, keep: str | None, also: str | None
) -> None:
    """Remove checkpoint files of ``also`` and unreferenced ``<marker>.<token>.*`` files (index first)."""
    patterns = []
    if marker is not None:
        m = re.escape(side_name(marker))
        patterns.append(re.compile(rf"(?P<ckpt>{m}\.{_TOKEN_RE}){_FILE_KINDS}\Z"))
        patterns.append(
            re.compile(
                rf"\.(?P<ckpt>{m}\.{_TOKEN_RE}){_FILE_KINDS}{re.escape(_storage.TEMP_MARK)}{_TOKEN_RE}\Z"
            )
        )
    if also is not None:
        a = re.escape(also)
        patterns.append(re.compile(rf"(?P<ckpt>{a}){_FILE_KINDS}\Z"))
    doomed = []
    for fname in storage.list_names():
        for pat in patterns:
            match = pat.match(fname)
            if match and match.group("ckpt") != keep:
                doomed.append(fname)
                break
    doomed.sort(key=lambda n: not n.endswith(INDEX_SUFFIX))
    storage.remove(doomed)


class _DispatchingCheckpointIO(_compat.Bound):
    """Installed by ``CheckpointCallback`` so that Lightning can load our checkpoints with any plugin.

    Loads of this library's checkpoints (``ckpt_path="last"`` resolved by the callback, a checkpoint
    path, a marker) go to :class:`FsspecCheckpointIO`; everything else — saving, removing, loading
    other files — goes to the strategy's own checkpoint IO, unchanged.
    """

    _role = "checkpoint_io"

    def __init__(self, inner: Any, storage_options: dict | None, allow_pickle: bool) -> None:
        self.inner = inner
        self.ours = _compat.bound_class(FsspecCheckpointIO, self._role, self._namespaces)(
            storage_options, allow_pickle
        )

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if is_http(path):
            return self.ours.load_checkpoint(path, map_location=map_location)
        try:
            target = resolve_ours(path, self.ours._options())
        except (CheckpointNotFoundError, ValueError):
            target = None
        if target is None:
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return load_lightning_checkpoint(target, self.ours._options(), self.ours.allow_pickle, map_location)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
