"""Warnings attributed to the user's line: the first frame outside this library and the frameworks.

``warnings.warn(stacklevel=N)`` with a fixed N points into whichever framework called the hook that
warns (``keras/src/trainers/...``, ``lightning/pytorch/trainer/call.py``); the user's ``model.fit(...)``
or ``trainer.fit(...)`` line is a varying number of frames further out. The level is counted here by
walking the stack (``skip_file_prefixes`` does this from Python 3.12 only).
"""

from __future__ import annotations

import sys
import warnings

# Top-level packages whose frames are never the user's line (Python's own threading / contextlib
# frames are the plumbing between a hook and its caller).
_SKIPPED = frozenset(
    {
        "ckpt_callbacks",
        "keras",
        "lightning",
        "lightning_fabric",
        "pytorch_lightning",
        "tensorflow",
        "torch",
        "jax",
        "jaxlib",
        "threading",
        "contextlib",
    }
)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first caller outside the library and frameworks;
    at the direct caller when every frame is theirs (a background thread's)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The ``stacklevel`` that, passed by :func:`warn`'s caller's ``warnings.warn``, names the user's frame."""
    frame = sys._getframe(1)  # warn()'s frame: level 1 of the warnings.warn it makes
    level = 1
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if module.partition(".")[0] not in _SKIPPED:
            return level
        frame = frame.f_back
        level += 1
    return 2  # no frame outside: warn()'s caller
