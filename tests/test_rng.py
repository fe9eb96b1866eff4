"""The core's Python / NumPy RNG capture, and its reading of the layouts older checkpoints hold."""

from __future__ import annotations

import random

import numpy as np
import pytest

from ckpt_callbacks._callbacks import _rng


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn())


def _old_keras_layout() -> dict:
    # What keras/_adapter.capture_rng stored before the core helper.
    version, internal, gauss = random.getstate()
    s = np.random.get_state()
    return {
        "python": {"version": version, "state": np.asarray(internal, dtype=np.uint64), "gauss": gauss},
        "numpy": {
            "algo": s[0],
            "keys": np.asarray(s[1], dtype=np.uint32),
            "pos": int(s[2]),
            "has_gauss": int(s[3]),
            "cached_gaussian": float(s[4]),
        },
        "keras_global_seed": None,
        "torch": None,
    }


def _old_lightning_layout() -> dict:
    # What lightning/_rng.capture stored before the core helper (its tensors read back as arrays).
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "numpy": {
            "kind": kind,
            "keys": keys.astype(np.int64),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": np.asarray(internal, dtype=np.int64), "gauss": gauss},
    }


@pytest.mark.parametrize("capture", [_rng.capture_python_numpy, _old_keras_layout, _old_lightning_layout])
def test_restore_reproduces_the_draws_of_every_layout(capture):
    random.seed(3)
    np.random.seed(4)
    random.gauss(0, 1)
    np.random.randn()  # a cached Gaussian in both generators
    state = capture()
    expected = _draws()
    random.seed(99)
    np.random.seed(99)
    _rng.restore_python_numpy(state)
    assert _draws() == expected


def test_capture_is_plain_arrays_and_numbers():
    state = _rng.capture_python_numpy()
    assert set(state) == {"python", "numpy"}
    assert state["python"]["state"].dtype == np.int64 and state["numpy"]["keys"].dtype == np.int64
    assert isinstance(state["numpy"]["algo"], str) and isinstance(state["numpy"]["pos"], int)


def test_restore_leaves_missing_entries_alone():
    random.seed(5)
    expected = random.random()
    random.seed(5)
    _rng.restore_python_numpy({"numpy": None})
    _rng.restore_python_numpy(None)
    assert random.random() == expected
