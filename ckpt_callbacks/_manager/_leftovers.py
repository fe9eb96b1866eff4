"""The startup sweep: files of interrupted saves, removed when a manager opens its directory; and
after each commit, the files of the checkpoints retention dropped (:func:`remove_dropped`).

Only files of this format are touched (by name and by content), and only those no state file
names (a data file an incremental checkpoint the state file lists points into is named too): temp files of unfinished writes, checkpoints whose save died before its commit, data files
an interrupted re-save left next to a listed checkpoint, and pending S3 multipart uploads.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

from .._checkpoint._checkpoint_io import crash_point, remove_quietly
from .._checkpoint._checkpoint_read import read_index, written_by_us
from .._checkpoint._incremental import files_to_delete, held_files
from .._format._names import INDEX_SUFFIX, STATE_FILE_NAME, data_file_name, own_file_re, step_of
from .._storage import TEMP_MARK, Storage
from ..errors import CheckpointError
from ._retention import Record

logger = logging.getLogger("ckpt_callbacks")

# The exact temp-name shape Storage writes: a user's ".ckpt-5.index.tmp-x.keep" stays.
_TEMP_RE = re.compile(r"\.(?P<base>.+)" + re.escape(TEMP_MARK) + r"[0-9a-f]{8,32}\Z")


@dataclass
class Sweep:
    removed: list[str] = field(default_factory=list)
    aborted_uploads: list[str] = field(default_factory=list)  # names whose pending upload was aborted


def sweep(
    storage: Storage, records: list[Record], latest: str | None, prefix: str, state_found: bool
) -> Sweep:
    """Delete files of interrupted saves: ours (by name and content), named by no state file.

    ``records`` (the state file's) are updated in place where the index on storage shows another
    shard count than recorded (an interrupted re-save).
    """
    names = storage.list_names()
    keep = {r.name for r in records}
    if latest:
        keep.add(latest)
    own = own_file_re(prefix)
    doomed, kept_data = _classify(storage, names, keep, own)
    doomed += _stale_data_files(storage, records, kept_data)
    if any(".data-" in f for f in doomed):  # never the bytes a kept (incremental) checkpoint points into
        held = held_files(storage, records)
        doomed = [f for f in doomed if f not in held]
    if not state_found:
        doomed = _spare_complete_checkpoints(storage, doomed, set(names), own)
    # Index first: once it is gone the checkpoint no longer exists for any reader.
    doomed.sort(key=lambda n: not n.endswith(INDEX_SUFFIX))
    if doomed:
        logger.info("Removing %d leftover file(s) of interrupted saves in %s", len(doomed), storage.url)
        remove_quietly(storage, doomed)
    # A save killed mid-upload on S3 also leaves its multipart upload pending (invisible, stored).
    aborted = storage.abort_pending_uploads(lambda n: n == STATE_FILE_NAME or own.match(n) is not None)
    return Sweep(doomed, aborted)


def _classify(
    storage: Storage, names: list[str], keep: set[str], own: re.Pattern
) -> tuple[list[str], dict[str, list[str]]]:
    """(leftover files, data files of listed checkpoints by checkpoint)."""
    doomed = []
    kept_data: dict[str, list[str]] = {}
    for fname in names:
        tmp = _TEMP_RE.match(fname)
        base = tmp.group("base") if tmp else fname
        if tmp and base == STATE_FILE_NAME:  # a state-file rewrite that never reached os.replace
            doomed.append(fname)
            continue
        m = own.match(base)
        if m is not None and not tmp and m.group("ckpt") in keep:
            if ".data-" in fname:
                kept_data.setdefault(m.group("ckpt"), []).append(fname)
            continue
        # A temp file is never part of a committed checkpoint, listed or not.
        if m is None:
            continue
        if tmp or written_by_us(storage, fname):
            doomed.append(fname)
    return doomed, kept_data


def _spare_complete_checkpoints(
    storage: Storage, doomed: list[str], names: set[str], own: re.Pattern
) -> list[str]:
    """Without any state file, several complete checkpoints are kept: the ``checkpoint`` file was
    lost or not copied, and deleting every checkpoint of the directory for that would be the worst
    possible answer. One complete checkpoint is what a first save interrupted before its state file
    leaves (a leftover, removed); temp files and incomplete checkpoints always are."""
    complete = set()
    for fname in doomed:
        m = own.match(fname)
        if m is not None and m.group("ckpt") + INDEX_SUFFIX in names:
            complete.add(m.group("ckpt"))
    spared = complete if len(complete) > 1 else set()
    if spared:
        logger.warning(
            "%s has no 'checkpoint' state file but %d complete checkpoint(s) (%s); they are left in "
            "place and not managed by this manager (never restored by restore(), never deleted). "
            "Load one explicitly with load_checkpoint(path), or delete them by hand.",
            storage.url,
            len(spared),
            ", ".join(sorted(spared, key=step_of)[:5]),
        )
    return [f for f in doomed if (m := own.match(f)) is None or m.group("ckpt") not in spared]


def _stale_data_files(storage: Storage, records: list[Record], kept_data: dict[str, list[str]]) -> list[str]:
    """Data files of listed checkpoints that their index does not name: an interrupted re-save's.

    The index on storage is the truth (a re-save that wrote its new .index and then died before
    the state file still has the old shard count in its record), so it is read whenever the files
    differ from what the record expects; an unreadable index deletes nothing.
    """
    stale = []
    for i, r in enumerate(records):
        files = kept_data.get(r.name, [])
        n = r.shards or 0
        if r.shards and set(files) == {data_file_name(r.name, k, n) for k in range(n)}:
            continue
        try:
            index = read_index(storage, r.name)
        except CheckpointError:
            continue
        named = [f["name"] for f in index["files"] if f.get("kind") != "meta"]
        stale += [f for f in files if f not in named and written_by_us(storage, f)]
        own = [f for f in named if f.startswith(r.name + ".")]  # not those it points into (incremental)
        records[i] = replace(r, shards=len(own), refs=tuple(sorted(set(named) - set(own))))
    return stale


def remove_dropped(storage: Storage, dropped: list[Record], kept: list[Record], replaced: list[str]) -> None:
    """After a commit: remove the files of the checkpoints retention ``dropped`` and the ``replaced``
    data files of a re-saved step, except data files a ``kept`` checkpoint still points into."""
    held = held_files(storage, kept) if dropped or replaced else set()
    if replaced:
        remove_quietly(storage, [n for n in replaced if n not in held])
    for r in dropped:
        if r.shards is None and not written_by_us(storage, r.name + INDEX_SUFFIX):
            # Listed by a state file another writer (TensorFlow) wrote, in another format: only
            # files of this format are ever deleted. It just stops being listed.
            logger.info("Not deleting %s: not a ckpt_callbacks checkpoint", storage.url_of(r.name))
            continue
        crash_point("before_delete")
        remove_quietly(storage, files_to_delete(storage, r, held))
        crash_point("after_delete")
