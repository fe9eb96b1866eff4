"""The parts of ``ModelCheckpoint`` (``_model_checkpoint.py``) that are not its hooks: the checkpoint IO it
installs, the ``filename`` check, and Lightning's ``_link_checkpoint`` kept callable on the class."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from ._io import _DispatchingCheckpointIO


class LinkCheckpoint:
    """``_link_checkpoint``: a pointer when called on an instance (``save_last="link"``); Lightning's own
    static helper (a symlink between two local files) when called on the class, as Lightning's tests do."""

    def __get__(self, obj: Any, owner: type) -> Callable[..., None]:
        if obj is None:
            for base in owner.__mro__[1:]:
                if "_link_checkpoint" in vars(base) and not isinstance(
                    vars(base)["_link_checkpoint"], LinkCheckpoint
                ):
                    return vars(base)["_link_checkpoint"].__get__(None, owner)
        return obj._link_pointer


@contextlib.contextmanager
def quiet_replace(expected: bool) -> Iterator[None]:
    """Without the manager's "Replacing existing checkpoint" warning where replacing is the plan."""
    if not expected:
        yield
        return
    log = logging.getLogger("ckpt_callbacks")

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Replacing existing checkpoint")

    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)


def check_filename(filename: Any, auto_insert_metric_name: bool) -> None:
    """Refuse a template whose names would have a directory part (Lightning would make subdirectories)."""
    if filename is None:
        return
    if not isinstance(filename, str):
        raise TypeError(f"filename must be a str or None. Received: filename={filename!r}.")
    # Outside braces a "/" is a directory; inside, Lightning inserts the metric name ("val/loss=0.31").
    outside = re.sub(r"\{[^}]*\}", "", filename)
    inserted = auto_insert_metric_name and any(
        "/" in g or os.sep in g for g in re.findall(r"\{([^}:]*)", filename)
    )
    if "/" in outside or os.sep in outside or inserted:
        raise ValueError(
            "filename must name a file in dirpath: its pointer and the checkpoint it names live side by side "
            f"there, so a name cannot have a directory part. Received: filename={filename!r}, "
            f"auto_insert_metric_name={auto_insert_metric_name!r}. Put a directory part in dirpath instead; for "
            "a metric logged as 'val/loss' pass auto_insert_metric_name=False (e.g. filename='{epoch}-{val/loss:.2f}')."
        )


class ManagedIO(_DispatchingCheckpointIO):
    """Installed by :class:`ModelCheckpoint`: the save it asked for goes to its manager; anything else
    (another callback's, ``trainer.save_checkpoint`` by the user) to the strategy's own IO."""

    def __init__(self, inner: Any, storage_options: dict | None, allow_pickle: bool, owner: Any) -> None:
        super().__init__(inner, storage_options, allow_pickle)
        self.owner = owner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        pending = self.owner._pending
        if pending is not None and os.fspath(path) == pending[0]:
            self.owner._write(checkpoint, pending[0], pending[1])
            return
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
