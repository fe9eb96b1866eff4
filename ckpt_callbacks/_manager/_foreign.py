"""Another tool's checkpoints, recognised; and the checks before anything is written.

Files this library did not write are never modified, replaced or deleted. TensorFlow's
``tf.train.CheckpointManager`` writes the very names this library writes (``checkpoint``,
``ckpt-N.index``, ``ckpt-N.data-00000-of-00001``); opening a manager on such a directory would
overwrite its ``checkpoint`` state file at the first save. :func:`check_not_foreign` refuses it at
construction instead. :func:`identify` names what another tool's file or directory is and what reads
it (TensorFlow, ``torch.save`` / Lightning ``.ckpt``, Keras ``.keras`` / ``.weights.h5``, safetensors,
Orbax, ``torch.distributed.checkpoint``): the command line and the loaders say so instead of "corrupt"
or "not found". :func:`check_writable` lets a callback fail before training starts rather than at its
first save.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from collections.abc import Callable

from .._checkpoint._checkpoint_read import written_by_us as _written_by_us
from .._format._names import INDEX_SUFFIX, split_url
from .._storage import Storage
from ..errors import CheckpointError, CheckpointWriteError, IncompatibleCheckpointError
from ._state import _COMMENT_KEY, MAX_STATE_FILE_BYTES, STATE_FILE_NAME, parse_state

_INDEX_SUFFIX = INDEX_SUFFIX
_LISTED = 5
_HEAD_BYTES = 512
# The last 8 bytes of a TensorFlow bundle's .index (a LevelDB table's magic number).
_TF_INDEX_MAGIC = bytes.fromhex("57fb808b247547db")
# Files a foreign directory is recognised by, looked at by content (a few heads read, at most).
_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".keras", ".h5", ".hdf5", ".safetensors")
_MAX_HEADS = 8
_ORBAX_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
_OUR_HEAD = b'{"format":"ckpt_callbacks'  # index, .meta and pointer files (data files: _written_by_us)


@dataclasses.dataclass(frozen=True)
class Foreign:
    """What another tool's file or directory is, and what reads it."""

    what: str
    reader: str

    def message(self, url: str, found: list[str] | None = None) -> str:
        """What ``url`` is and what reads it; ``found``: the files that show it, for a directory."""
        if found:
            return (
                f"{url!r} holds another tool's checkpoints, not ckpt_callbacks ones ({self.what}: "
                f"{_shown(found)}). This library never modifies or deletes files it did not write. Read them "
                f"with {self.reader}."
            )
        return (
            f"{url!r} is {self.what}, not a ckpt_callbacks checkpoint: another tool wrote it, and this library "
            f"never modifies or deletes it. Read it with {self.reader}."
        )


TORCH = Foreign(
    "a torch.save file, as PyTorch and Lightning's ModelCheckpoint write .ckpt files",
    "Lightning (MyModule.load_from_checkpoint(path), or Trainer.fit(model, ckpt_path=path)) or "
    "torch.load(path)",
)
PICKLE = Foreign(
    "a pickle file, e.g. a torch.save file in PyTorch's legacy format",
    "torch.load(path, weights_only=False) or pickle.load, only if you trust its origin (unpickling runs code)",
)
KERAS_ARCHIVE = Foreign(
    "a Keras model archive, as model.save writes .keras files", "keras.models.load_model(path)"
)
HDF5 = Foreign(
    "an HDF5 file, e.g. Keras' model.save_weights .weights.h5 or a legacy .h5 model",
    "model.load_weights(path) for weights, keras.models.load_model(path) for a whole model",
)
SAFETENSORS = Foreign(
    "a safetensors file", "safetensors.safe_open(path, 'numpy') or safetensors.torch.load_file(path)"
)
TENSORFLOW = Foreign(
    "a TensorFlow checkpoint of tf.train.Checkpoint / tf.train.CheckpointManager",
    "TensorFlow: tf.train.Checkpoint(...).restore(tf.train.latest_checkpoint(directory)), or "
    "tf.train.load_checkpoint(prefix) for its variables",
)
SAVED_MODEL = Foreign("a TensorFlow SavedModel", "tf.saved_model.load(directory)")
ORBAX = Foreign(
    "an Orbax checkpoint of orbax.checkpoint, JAX's checkpointer",
    "orbax.checkpoint: CheckpointManager(directory).restore(step), or StandardCheckpointer().restore(path)",
)
DCP = Foreign(
    "a torch.distributed.checkpoint directory of its own FileSystemWriter",
    "torch.distributed.checkpoint.load(state, checkpoint_id=directory)",
)


def _shown(found: list[str]) -> str:
    return ", ".join(found[:_LISTED]) + (f", ... ({len(found)} in all)" if len(found) > _LISTED else "")


# ---------------------------------------------------------------- recognising another tool's files


def identify_file(storage: Storage, name: str) -> Foreign | None:
    """What another tool's file ``name`` is, from its first bytes (a TF index also by its last 8);
    None for a file of this library, a missing file, or one not recognised."""
    try:
        head = storage.read_bytes(name, max_bytes=_HEAD_BYTES)[:_HEAD_BYTES]
    except CheckpointError:
        return None
    if head.startswith(_OUR_HEAD) or _written_by_us(storage, name):
        return None
    if head.startswith(b"PK\x03\x04"):  # a zip: torch.save's archive or a Keras .keras
        member = head[30 : 30 + int.from_bytes(head[26:28], "little")]
        if member.endswith((b"data.pkl", b".format_version", b"byteorder")):
            return TORCH
        if member in (b"metadata.json", b"config.json", b"model.weights.h5") or name.endswith(".keras"):
            return KERAS_ARCHIVE
        return None
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return HDF5
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return PICKLE
    if head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < (storage.size(name) or 0):
        return SAFETENSORS
    index = name.split(".data-")[0] + INDEX_SUFFIX if ".data-" in name else name
    if index.endswith(INDEX_SUFFIX) and _tail(storage, index) == _TF_INDEX_MAGIC:
        return TENSORFLOW
    return None


def _tail(storage: Storage, name: str) -> bytes:
    size = storage.size(name)
    if size is None or size < len(_TF_INDEX_MAGIC):
        return b""
    try:
        with storage.open_read(name) as f:
            f.seek(size - len(_TF_INDEX_MAGIC))
            return f.read(len(_TF_INDEX_MAGIC))
    except (CheckpointError, OSError):
        return b""


def identify_directory(storage: Storage, names: list[str]) -> tuple[Foreign, list[str]] | None:
    """What another tool's checkpoint directory is and the files that show it; None for a directory
    of this library (its state file, or a marker file), an empty one, or one not recognised."""
    tf = _tensorflow_files(storage, set(names), lambda n: _written_by_us(storage, n))
    if tf is None:
        return None
    if tf:
        return TENSORFLOW, tf
    if "saved_model.pb" in names:
        return SAVED_MODEL, ["saved_model.pb"]
    orbax = [n for n in names if n in _ORBAX_FILES]
    steps = sorted((n for n in names if n.isdigit()), key=int)[-3:]  # a CheckpointManager's step folders
    orbax += [f"{n}/{_ORBAX_FILES[0]}" for n in steps if storage.exists(f"{n}/{_ORBAX_FILES[0]}")]
    if orbax:
        return ORBAX, orbax
    if ".metadata" in names and any(n.endswith(".distcp") for n in names):
        return DCP, [".metadata", *sorted(n for n in names if n.endswith(".distcp"))]
    kinds: dict[Foreign, list[str]] = {}
    for n in sorted(n for n in names if n.endswith(_FILE_SUFFIXES))[:_MAX_HEADS]:
        kind = identify_file(storage, n)
        if kind is None and storage.read_bytes(n, max_bytes=len(_OUR_HEAD)).startswith(_OUR_HEAD):
            return None  # a marker file of this library (FsspecCheckpointIO's last.ckpt)
        if kind is not None:
            kinds.setdefault(kind, []).append(n)
    if not kinds:
        return None
    kind, found = max(kinds.items(), key=lambda item: len(item[1]))
    return kind, found


def identify(path: str | os.PathLike, storage_options: dict | None = None) -> str | None:
    """One message for another tool's file or directory at ``path``: what it is, that this library did
    not write it, and what reads it. None when ``path`` is this library's, missing, or not recognised.

    Accepted as for reading: a file, a checkpoint prefix (``.../ckpt-1``, by its ``.index``), a directory.
    """
    p = os.fspath(path)
    parent_dir, name = split_url(p)
    if name:
        parent = Storage(parent_dir, storage_options)
        for candidate in (name, name + INDEX_SUFFIX):
            if _is_file(parent, candidate):
                kind = identify_file(parent, candidate)
                return kind.message(parent.url_of(name)) if kind is not None else None
    storage = Storage(p, storage_options)
    found = identify_directory(storage, storage.list_names())
    return found[0].message(storage.url, found[1]) if found is not None else None


def refuse_foreign(path: str | os.PathLike, storage_options: dict | None = None) -> None:
    """Raise IncompatibleCheckpointError with :func:`identify`'s message for another tool's files."""
    message = identify(path, storage_options)
    if message is not None:
        raise IncompatibleCheckpointError(message)


def split_file(path: str) -> tuple[Storage, str]:
    """``(storage of its directory, name)`` of a local file path, for :func:`identify_file`."""
    directory, name = split_url(path)
    return Storage(directory), name


def _is_file(storage: Storage, name: str) -> bool:
    if storage.is_local:
        return os.path.isfile(storage.path(name))
    try:
        return bool(storage.fs.isfile(storage.path(name)))
    except OSError:
        return False


# ---------------------------------------------------------------- before a manager writes


def check_not_foreign(storage: Storage, prefix: str, written_by_us: Callable[[str], bool]) -> None:
    """Raise IncompatibleCheckpointError when ``storage`` holds checkpoint files another tool wrote.

    Foreign: a ``checkpoint`` state file without this library's records line that names a checkpoint
    whose ``.index`` is not this format (TensorFlow's state file, whatever its prefix); or, when the
    directory has no state file of this library, a ``<prefix>-<step>.index`` together with a
    ``<prefix>-<step>.data-*`` file, neither in this format (TensorFlow's checkpoint files, its state
    file gone). Under this library's own state file such files are a damaged checkpoint (see "Resume" in the README:
    reported and skipped by restore); a lone file with one of our names is a user's file. Neither
    is ever deleted. Only file heads are read (64 bytes each); nothing is written.
    """
    names = set(storage.list_names())
    if not names:
        return
    own = re.compile(rf"{re.escape(prefix)}-\d+(?:\.data-\d{{5}}-of-\d{{5}}|\.index|\.meta)\Z")
    found = _tensorflow_files(storage, names, written_by_us, own)
    if not found:
        return
    raise IncompatibleCheckpointError(
        f"{storage.url!r} holds checkpoint files this library did not write ({_shown(found)}); they look like "
        "another tool's checkpoints (TensorFlow's tf.train.CheckpointManager uses the same names; "
        f"{TENSORFLOW.reader} reads them). They are "
        "left untouched: this library never modifies or deletes files it did not write, and a save here "
        f"would replace their '{STATE_FILE_NAME}' state file. Expected a new directory or one written by "
        f"ckpt_callbacks. Received: directory={storage.url!r}, prefix={prefix!r}. Use another directory, or "
        "move the other tool's files away (another prefix is enough only when no 'checkpoint' file of the "
        "other tool is listed above)."
    )


# Any TensorFlow bundle's files: ``<name>.index`` and ``<name>.data-NNNNN-of-NNNNN``.
_ANY_BUNDLE = re.compile(r".+(?:\.data-\d{5}-of-\d{5}|\.index)\Z")


def _tensorflow_files(
    storage: Storage, names: set[str], written_by_us: Callable[[str], bool], own: re.Pattern | None = None
) -> list[str] | None:
    """None under this library's state file; else the files that show TensorFlow's checkpoints (maybe
    none): its state file, and each bundle's index and data files (of ``own`` names, default any)."""
    found: list[str] = []
    if STATE_FILE_NAME in names:
        evidence = _foreign_state_file(storage, names, written_by_us)
        if evidence is None:
            # This library's state file: a checkpoint file under it that is not this format is a
            # damaged checkpoint of ours (reported, and skipped, by restore), not another tool's.
            return None
        found += evidence
    # Another tool's checkpoint: an index and its data file(s), neither in this format. A lone file
    # with one of our names (a user's notes, a backup) is not one: it is left alone, as always.
    pattern = own or _ANY_BUNDLE
    theirs = [n for n in names if pattern.match(n) and not n.endswith(".meta") and not written_by_us(n)]
    indexed = {n[: -len(_INDEX_SUFFIX)] for n in theirs if n.endswith(_INDEX_SUFFIX)}
    with_data = {n.split(".data-")[0] for n in theirs if ".data-" in n}
    checkpoints = indexed & with_data
    # The state file first, then indexes: what a reader recognises another tool's checkpoints by.
    found += sorted(
        (n for n in theirs if n.split(".data-")[0].removesuffix(_INDEX_SUFFIX) in checkpoints),
        key=lambda n: (not n.endswith(_INDEX_SUFFIX), n),
    )
    return found


def _foreign_state_file(
    storage: Storage, names: set[str], written_by_us: Callable[[str], bool]
) -> list[str] | None:
    """None for this library's state file; else what marks it as another tool's (maybe nothing)."""
    try:
        data = storage.read_bytes(STATE_FILE_NAME, max_bytes=MAX_STATE_FILE_BYTES)
        if _COMMENT_KEY.encode() in data:
            return None  # this library's state file (its retention records line)
        state, _ = parse_state(data)
    except CheckpointError:
        return []  # unreadable or corrupt: the manager reports it with its own error
    listed = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
    for name in listed:
        index = os.path.basename(name or "") + _INDEX_SUFFIX
        if name and index in names and not written_by_us(index):
            return [f"{STATE_FILE_NAME} (names {os.path.basename(name)!r})"]
    return []


def check_writable(directory: str, storage_options: dict | None = None) -> None:
    """Raise CheckpointWriteError unless a file can be created in a local ``directory`` (made if missing).

    Object stores are not probed (a probe would cost a write and a delete per start); a save there
    fails with its own CheckpointWriteError.
    """
    storage = Storage(directory, storage_options)
    if not storage.is_local:
        return
    probe = os.path.join(storage.root, f".ckpt_callbacks-write-probe-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(storage.root, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointWriteError(
            e.errno,
            f"Cannot write checkpoints to {storage.url!r}: {e.strerror or e}. Checked before training starts so "
            "that no work is lost at the first save. Expected a directory this process can create files in. "
            "Fix its permissions, or pass another directory.",
        ) from e
