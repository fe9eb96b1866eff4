"""What crash-test children save, and what must be on storage afterwards.

Shared by the tests and by ``_crash_child.py`` (which imports it from this directory). Everything is a
pure function of the step, so the parent can recompute exactly what any committed checkpoint holds.
"""

from __future__ import annotations

import collections
import hashlib
import os

import ml_dtypes
import numpy as np

PREFIX = "ckpt"
MAX_TO_KEEP = 3
HOURS = 1.0
SECONDS_PER_STEP = 60.0  # the children's fake clock: step s is saved at 60*s seconds

# Files no checkpoint of this library owns: every one must survive every crash and every cleanup.
FOREIGN_FILES = {
    "notes.txt": b"user notes\n",
    "ckpt-999999.meta": b"not written by ckpt_callbacks\n",  # our name pattern, foreign content
    "ckpt-999998.index": b"{}\n",
    "other-3.index": b"another prefix\n",
    ".ckpt-5.index.tmp-deadbeef.keep": b"hidden, not our temp-name shape\n",
}


def clock_for(step: int) -> float:
    return SECONDS_PER_STEP * step


def state_for(step: int) -> dict:
    """A small state exercising every leaf kind; bit patterns depend on the step."""
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal(256).astype(np.float32),
        "m": {
            "b16": (np.arange(64, dtype=np.float32) * step).astype(ml_dtypes.bfloat16),
            "i": np.int64(step),
        },
        "opt": [np.full((4, 8), step, dtype=np.int32), (step, "adam", None), {"lr": 0.1 * step}],
        "bytes": hashlib.sha256(str(step).encode()).digest(),
        "nan": float("nan"),
        "step": step,
        # the same bytes at every step: incremental saves point into the first data file holding them
        "frozen": np.arange(512, dtype=np.float32),
    }


def assert_same_tree(a, b, path="state"):
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{path}: bytes differ"
    elif isinstance(a, float):
        assert np.float64(a).tobytes() == np.float64(b).tobytes(), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def reference_survivors(
    last_step: int, max_to_keep: int = MAX_TO_KEEP, hours: float | None = HOURS
) -> set[int]:
    """Steps on storage after steps 1..last_step were committed, by TensorFlow's CheckpointManager rules.

    Written independently of ckpt_callbacks._manager._retention: an ordered "maybe delete" queue swept oldest
    first, preserving one per ``hours`` measured from ``last_preserved`` (initially the first
    manager's clock minus one second, like TF).
    """
    maybe: collections.OrderedDict[int, float] = collections.OrderedDict()
    preserved: set[int] = set()
    last_preserved = clock_for(1) - 1.0
    for s in range(1, last_step + 1):
        maybe[s] = clock_for(s)
        while max_to_keep is not None and len(maybe) > max_to_keep:
            old, ts = maybe.popitem(last=False)
            if hours and ts - hours * 3600.0 >= last_preserved:
                last_preserved = ts
                preserved.add(old)
    return preserved | set(maybe)


def checkpoint_files(directory: str, name: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.startswith(name + ".") and not f.startswith("."))


def write_foreign_files(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for fname, data in FOREIGN_FILES.items():
        with open(os.path.join(directory, fname), "wb") as f:
            f.write(data)


def assert_foreign_files_intact(directory: str) -> None:
    for fname, data in FOREIGN_FILES.items():
        with open(os.path.join(directory, fname), "rb") as f:
            assert f.read() == data, f"foreign file {fname} was changed"
