"""``BackupAndRestore``: Keras' fault-tolerance callback on this library's format and any fsspec URL."""

from __future__ import annotations

import os
from typing import Any

from .._api._resolve import get_checkpoint_state
from .._format._names import STATE_FILE_NAME, data_file_name, own_file_re
from .._storage import Storage
from . import _keras_args
from ._callback import CheckpointCallback

_PREFIX = "ckpt"


class BackupAndRestore(CheckpointCallback):
    """Drop-in for ``keras.callbacks.BackupAndRestore``: back up the training state during ``fit`` and,
    when a ``fit`` is interrupted, resume the next one from the last backup.

    The arguments and their meanings are Keras' (change the import, keep the call). A backup is a
    checkpoint of this library (crash-safe: a save interrupted half-way leaves the previous backup
    intact), written to a local path or any fsspec URL (``"s3://bucket/run/backup"``, ``"gs://..."``).
    It holds the weights, the optimizer variables (``iterations`` included), the epoch and the RNG
    states; the next ``fit`` with this callback restores them and continues at the saved epoch.

    As in Keras, a backup made inside an epoch resumes at the start of that epoch (its batches are
    trained again, from the saved weights); link a :class:`ResumableDataset` to continue at the saved
    batch instead. An int ``save_freq`` counts global optimizer steps (``optimizer.iterations``), which
    is Keras' count of batches, kept across a resume.

    Args:
        backup_dir: local path or fsspec URL of the directory that holds the backups; used by this
            callback alone.
        save_freq: ``"epoch"`` (back up at the end of every epoch) or an int N (every N batches).
        double_checkpoint: keep the previous backup too; a newest backup that cannot be read (corrupt,
            half-deleted) is then skipped, with a warning, for the previous one.
        delete_checkpoint: when ``fit`` completes, delete the backups (and ``backup_dir`` itself, when
            it is a local directory left empty). A ``fit`` that raised keeps them.
        storage_options: passed to fsspec (credentials, endpoint, ...).
        async_save: write backups in the background (``fit`` waits only for an in-memory copy).

    Example:
        >>> backup = BackupAndRestore("gs://bucket/run/backup", save_freq=500)
        >>> model.fit(x, y, epochs=10, callbacks=[backup])   # rerun after a crash: continues
    """

    _repeats_epoch_silently = True  # resuming at the start of the saved epoch is Keras' own semantics

    def __init__(
        self,
        backup_dir: str | os.PathLike,
        save_freq: str | int = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        *,
        storage_options: dict | None = None,
        async_save: bool = False,
    ) -> None:
        if not backup_dir:
            # Keras' words, which code written for Keras may match.
            raise ValueError(
                f"Empty `backup_dir` argument passed: BackupAndRestore needs the directory to write its "
                f"backups to. Received: backup_dir={backup_dir!r}. Pass e.g. backup_dir='runs/exp1/backup'."
            )
        _keras_args.check_save_freq(save_freq, owner="BackupAndRestore")
        for name, flag in (
            ("double_checkpoint", double_checkpoint),
            ("delete_checkpoint", delete_checkpoint),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False. Received: {name}={flag!r}.")
        super().__init__(
            backup_dir,
            save_freq=save_freq,
            save_on_train_end=False,
            max_to_keep=2 if double_checkpoint else 1,
            resume=True,
            storage_options=storage_options,
            async_save=async_save,
            prefix=_PREFIX,
        )
        self.backup_dir = self.directory
        self.double_checkpoint = double_checkpoint
        self.delete_checkpoint = delete_checkpoint
        # Keras' own progress attributes, which code written for its callback reads.
        self._current_epoch = 0
        self._last_batch_seen = 0

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.save_freq != "epoch":  # Keras counts batches only for a batch frequency
            self._last_batch_seen = int(batch)
        super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._current_epoch, self._last_batch_seen = epoch + 1, 0
        super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        super().on_train_end(logs)  # no save at the end (Keras makes none); waits for background saves
        if self.delete_checkpoint:
            _delete_backups(self.backup_dir, self.storage_options)

    # Where the newest / previous backup's files are (Keras' callback has these as fixed file names;
    # tests written for it read them). Local directories only; None when there is no such backup.

    @property
    def _weights_path(self) -> str | None:
        return self._backup_file(-1, lambda name: data_file_name(name, 0, 1))

    @property
    def _training_metadata_path(self) -> str | None:
        return self._backup_file(-1, lambda name: name + ".meta")

    @property
    def _prev_weights_path(self) -> str | None:
        return self._backup_file(-2, lambda name: data_file_name(name, 0, 1))

    @property
    def _prev_training_metadata_path(self) -> str | None:
        return self._backup_file(-2, lambda name: name + ".meta")

    def _backup_file(self, which: int, file_of: Any) -> str | None:
        state = get_checkpoint_state(self.backup_dir, self.storage_options)
        paths = state.all_model_checkpoint_paths if state is not None else []
        return file_of(paths[which]) if len(paths) >= -which else None


def _delete_backups(directory: str, storage_options: dict | None) -> None:
    """Remove every file of this callback's backups (the state file first, so that nothing names a
    half-deleted checkpoint), then the directory when it is local and empty."""
    storage = Storage(directory, storage_options)
    ours = own_file_re(_PREFIX)
    names = storage.list_names()
    storage.remove([n for n in names if n == STATE_FILE_NAME])
    storage.remove([n for n in names if ours.match(n)])
    if storage.is_local and not storage.list_names():
        try:
            os.rmdir(storage.root)
        except OSError:  # something else appeared there meanwhile: leave it
            pass
