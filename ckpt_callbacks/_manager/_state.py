"""The ``checkpoint`` state file, in TensorFlow's ``CheckpointState`` text format.

One reader (:func:`read_state`) and one writer (:func:`write_state`) for the whole package.
Only the four TF field names appear as fields, so ``tf.train.get_checkpoint_state`` parses it. The
retention bookkeeping TensorFlow keeps in memory (which checkpoints are preserved hourly or as best,
their metrics and shard counts) rides along in one ``#`` comment line, which text-format parsers
skip. Writing this file is the commit point of a save.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .._checkpoint._checkpoint_read import read_bounded
from .._format._format import is_plain_name
from .._format._names import STATE_FILE_NAME, step_of
from .._storage import Storage
from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from ._retention import Record

MAX_STATE_FILE_BYTES = 16 * 1024 * 1024
_COMMENT_KEY = "# ckpt_callbacks: "
logger = logging.getLogger("ckpt_callbacks")
_FIELD = re.compile(r'\s*([a-z_]+)\s*:\s*(".*"|[-+0-9.eEinfINFa]+)\s*\Z')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}


@dataclass
class CheckpointState:
    """The parsed ``checkpoint`` state file (TensorFlow's field names).

    Paths are as written in the file, relative to the directory, unless a reader such as
    ``get_checkpoint_state`` joined them with it.
    """

    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: list[str] = field(default_factory=list)
    all_model_checkpoint_timestamps: list[float] = field(default_factory=list)
    last_preserved_timestamp: float = 0.0


def _unquote(s: str) -> str:
    body = s[1:-1]
    out, i = [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt in _ESCAPES:
                out.append(_ESCAPES[nxt])
                i += 2
                continue
            m = re.match(r"[0-7]{1,3}", body[i + 1 :])
            if m:
                out.append(chr(int(m.group(0), 8)))
                i += 1 + len(m.group(0))
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _float(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        raise CorruptCheckpointError(f"Invalid number {s!r} in checkpoint state file.") from None


def parse_state(text: bytes | str) -> tuple[CheckpointState, list[Record] | None]:
    """Parse a state file; also returns this library's retention records when the file has them."""
    if isinstance(text, bytes):
        if len(text) > MAX_STATE_FILE_BYTES:
            raise CorruptCheckpointError("Checkpoint state file is larger than any this library writes.")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptCheckpointError("Checkpoint state file is not UTF-8 text.") from None
    state = CheckpointState()
    extra = None
    for line in text.splitlines():
        if line.startswith(_COMMENT_KEY):
            extra = line[len(_COMMENT_KEY) :]
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _FIELD.match(line)
        if m is None:
            raise CorruptCheckpointError(f"Cannot parse checkpoint state file line {line[:120]!r}.")
        key, value = m.groups()
        if key in ("model_checkpoint_path", "all_model_checkpoint_paths"):
            if not value.startswith('"'):
                raise CorruptCheckpointError(
                    f"Expected a quoted path in checkpoint state file: {line[:120]!r}."
                )
            path = _unquote(value)
            if key == "model_checkpoint_path":
                state.model_checkpoint_path = path
            else:
                state.all_model_checkpoint_paths.append(path)
        elif key == "all_model_checkpoint_timestamps":
            state.all_model_checkpoint_timestamps.append(_float(value))
        elif key == "last_preserved_timestamp":
            state.last_preserved_timestamp = _float(value)
        else:
            raise CorruptCheckpointError(f"Unknown field {key!r} in checkpoint state file.")
    return state, (_parse_records(extra, state) if extra is not None else None)


def _parse_records(extra: str, state: CheckpointState) -> list[Record] | None:
    try:
        data = json.loads(extra)
        records = [
            Record(
                name=str(r["name"]),
                step=int(r["step"]),
                timestamp=float(r["timestamp"]),
                status=str(r["status"]),
                metric=None if r.get("metric") is None else float(r["metric"]),
                shards=None if r.get("shards") is None else int(r["shards"]),
                refs=tuple(checked_name(str(f)) for f in r.get("refs", ())),
            )
            for r in data["checkpoints"]
        ]
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, CorruptCheckpointError):
        return None  # fall back to the TF fields, which are authoritative
    # The comment is only trusted when it agrees with the fields TensorFlow reads.
    if [r.name for r in records] != state.all_model_checkpoint_paths or any(
        r.status not in ("active", "hourly", "best") for r in records
    ):
        return None
    return records


def restart_records(
    state: CheckpointState, records: list[Record] | None, now: float, last_preserved: float
) -> list[Record]:
    """The records a manager starts from. Timestamps in the future are clamped to ``now``. A state
    file TensorFlow (or an older writer) wrote has no records: TF's restart rule then makes
    checkpoints newer than ``last_preserved`` "active" and older ones preserved ("hourly")."""
    if records is not None:
        return [replace(r, timestamp=min(r.timestamp, now)) for r in records]
    stamps = state.all_model_checkpoint_timestamps or [last_preserved] * len(state.all_model_checkpoint_paths)
    return [
        Record(
            n, step_of(n), min(ts, now), "active" if min(ts, now) > last_preserved else "hourly", refs=None
        )
        for n, ts in zip(state.all_model_checkpoint_paths, stamps)
    ]


def restart(state: CheckpointState, records: list[Record] | None, now: float) -> tuple[list[Record], float]:
    """``(records, last_preserved)`` a manager starts from (:func:`restart_records`). A clock before
    the last preserved time restarts preservation from now, and nothing is deleted because of it."""
    last_preserved = state.last_preserved_timestamp
    if now < last_preserved:
        logger.warning(
            "The clock (%s) is before the last preserved checkpoint time (%s); time went backwards. "
            "Preservation restarts from now and nothing is deleted because of it.",
            now,
            last_preserved,
        )
        last_preserved = now
    return restart_records(state, records, now, last_preserved), last_preserved


def dump_state(latest: str, records: list[Record], last_preserved: float, best: str | None = None) -> bytes:
    """The state file's bytes; ``best`` (the best kept checkpoint by ``keep_best``) rides in the comment."""
    lines = [f"model_checkpoint_path: {_quote(latest)}"]
    lines += [f"all_model_checkpoint_paths: {_quote(r.name)}" for r in records]
    lines += [f"all_model_checkpoint_timestamps: {_fmt(r.timestamp)}" for r in records]
    lines.append(f"last_preserved_timestamp: {_fmt(last_preserved)}")
    extra = {
        "v": 1,
        "checkpoints": [
            {
                "name": r.name,
                "step": r.step,
                "timestamp": r.timestamp,
                "status": r.status,
                "metric": r.metric if r.metric is not None and math.isfinite(r.metric) else None,
                "shards": r.shards,
                **({"refs": list(r.refs)} if r.refs else {}),
            }
            for r in records
        ],
    }
    if best is not None:
        extra["best"] = best
    lines.append(_COMMENT_KEY + json.dumps(extra, separators=(",", ":")))
    return ("\n".join(lines) + "\n").encode("utf-8")


def best_of(data: bytes) -> str | None:
    """The best checkpoint a state file records (written by managers with ``keep_best``), or None.

    Trusted only when it is one of the checkpoints the TensorFlow fields list.
    """
    state, _ = parse_state(data)
    for line in data.decode("utf-8").splitlines():
        if line.startswith(_COMMENT_KEY):
            try:
                best = json.loads(line[len(_COMMENT_KEY) :]).get("best")
            except (ValueError, AttributeError, RecursionError):
                return None
            return best if isinstance(best, str) and best in state.all_model_checkpoint_paths else None
    return None


def no_best_error(directory: str, ranked: bool) -> CheckpointNotFoundError:
    """Asked for the best checkpoint of a directory that has none."""
    why = (
        "no kept checkpoint carries the monitored metric yet"
        if ranked
        else "its checkpoints are not ranked (saved without keep_best)"
    )
    return CheckpointNotFoundError(
        f"No best checkpoint in {directory!r}: {why}. Save with keep_best=1 and monitor=<metric name> "
        "to keep and name the best one, or ask for checkpoint='latest'."
    )


def _fmt(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else "0.0"


def checked_name(path: str) -> str:
    """A state-file path as a plain name inside the directory, or CorruptCheckpointError.

    Absolute paths, ``..``, separators and other schemes are refused (a hostile state file).
    """
    if not is_plain_name(path):
        raise CorruptCheckpointError(
            f"Checkpoint state file names {path!r:.200}, which is not a checkpoint inside its directory."
        )
    return path


def read_state_bytes(storage: Storage) -> bytes | None:
    """The directory's state file as stored; None when there is none."""
    try:
        return read_bounded(storage, STATE_FILE_NAME, MAX_STATE_FILE_BYTES)
    except CheckpointNotFoundError:
        return None


def read_state(storage: Storage) -> tuple[CheckpointState, list[Record] | None, bytes] | None:
    """The parsed state file of a directory (its fields, this library's records, its bytes), or None
    when there is none. Raises CorruptCheckpointError for one that does not parse."""
    data = read_state_bytes(storage)
    if data is None:
        return None
    state, records = parse_state(data)
    return state, records, data


def write_state(storage: Storage, data: bytes) -> None:
    """Write the state file: the commit point of a save."""
    storage.write_bytes(STATE_FILE_NAME, data)
    storage.sync_dir()


def commit_state(
    storage: Storage,
    data: bytes,
    remove_new_files: Callable[[], None],
    write: Callable[[bytes], None] | None = None,
) -> BaseException | None:
    """Write the state file ``data``, the commit point of a save (``write``: how, default
    :func:`write_state`), settling a failure whose outcome is unknown.

    The store may have committed it although the write reported an error (a reply lost after the
    retries, an interrupt after the rename), so on failure the state file is read back: when it is
    ``data`` the save did commit and that error is returned (the caller says so); when it surely is
    not, ``remove_new_files()`` (the new checkpoint's files go, or a replaced copy is put back) and
    the error is raised; when it cannot be read, the error is raised and the files stay (a next
    start removes them if the state file does not name them). None: committed without an error.
    """
    try:
        (write or (lambda d: write_state(storage, d)))(data)
    except BaseException as error:
        try:
            committed: bool | None = read_state_bytes(storage) == data
        except Exception:  # noqa: BLE001 - unreadable now: unknown
            committed = None
        if committed:
            return error
        if committed is False:
            remove_new_files()
        raise
    return None
