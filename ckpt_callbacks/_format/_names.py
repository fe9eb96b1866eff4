"""Every name this library gives a file on storage, and the one way to split or join a checkpoint URL.

A checkpoint ``<prefix>-<step>`` in a directory is the files ``<prefix>-<step>.data-SSSSS-of-NNNNN``,
``<prefix>-<step>.meta`` and ``<prefix>-<step>.index``; the directory's ``checkpoint`` state file
names the committed ones. Nothing else in the package spells these names.
"""

from __future__ import annotations

import os
import re

INDEX_SUFFIX = ".index"
META_SUFFIX = ".meta"
STATE_FILE_NAME = "checkpoint"
_STEP = re.compile(r"-(\d+)\Z")


def checkpoint_name(prefix: str, step: int) -> str:
    """``f"{prefix}-{step}"``: the name a manager gives the checkpoint of ``step``."""
    return f"{prefix}-{step}"


def data_file_name(prefix_step: str, shard: int, num_shards: int) -> str:
    """``ckpt-1000.data-00000-of-00001``: data shard ``shard`` of ``num_shards``."""
    return f"{prefix_step}.data-{shard:05d}-of-{num_shards:05d}"


def step_of(name: str) -> int:
    """The trailing step number of a checkpoint name (``ckpt-1000`` -> 1000); 0 when it has none."""
    m = _STEP.search(name)
    return int(m.group(1)) if m else 0


def own_file_re(prefix: str) -> re.Pattern[str]:
    """Matches a file of a ``<prefix>-<step>`` checkpoint; group ``ckpt`` is the checkpoint name."""
    p = re.escape(prefix)
    return re.compile(rf"(?P<ckpt>{p}-\d+)(?:\.data-\d{{5}}-of-\d{{5}}|\.index|\.meta)\Z")


def may_reference(name: str, fname: str) -> bool:
    """Whether checkpoint ``name``'s index may name ``fname`` as a data file: its own files, or (an
    incremental checkpoint) a data file of an earlier ``<prefix>-<step>`` checkpoint (a lower step)."""
    if fname.startswith(name + "."):
        return True
    m = _STEP.search(name)
    if m is None:
        return False
    other = re.fullmatch(rf"{re.escape(name[: m.start()])}-(\d+)\.data-\d{{5}}-of-\d{{5}}", fname)
    return other is not None and int(other.group(1)) < int(m.group(1))


def split_url(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(directory, name)`` of a checkpoint path or fsspec URL: ``"s3://b/run/ckpt-1"`` ->
    ``("s3://b/run", "ckpt-1")``, ``"memory://ckpt-1"`` -> ``("memory://", "ckpt-1")``, ``"ckpt-1"`` ->
    ``(".", "ckpt-1")``. :func:`join_url` puts them back together."""
    path = os.fspath(path).rstrip("/")
    cut = max(path.rfind("/"), path.rfind(os.sep) if os.sep != "/" else -1)
    if cut < 0:
        return ".", path
    if path[:cut].endswith(":/"):  # "memory://ckpt-1"
        return path[: cut + 1], path[cut + 1 :]
    return path[:cut] or "/", path[cut + 1 :]


def join_url(directory: str, name: str) -> str:
    """``name`` inside ``directory`` (a local path or fsspec URL)."""
    if "://" in directory:
        return directory + name if directory.endswith("/") else directory + "/" + name
    return os.path.join(directory, name)
