"""Python's and NumPy's global RNG states as a tree the core can store: framework-free.

Each framework adapter adds its own generators (torch, CUDA, Keras' global seed generator) to this
dict. :func:`restore_python_numpy` also reads the key names that checkpoints written before this
module existed use (the Keras adapter's ``python.state`` / ``numpy.algo`` / ``numpy.cached_gaussian``,
the Lightning adapter's ``python.internal`` / ``numpy.kind`` / ``numpy.cached``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np


def capture_python_numpy() -> dict[str, Any]:
    """``{"python": ..., "numpy": ...}``: the global states, arrays as int64 (every value fits)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "state": np.asarray(internal, dtype=np.int64), "gauss": gauss},
        "numpy": {
            "algo": str(kind),
            "keys": np.asarray(keys, dtype=np.int64),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def restore_python_numpy(state: Any) -> None:
    """Set Python's and NumPy's global RNGs from ``state`` (any key layout above; missing: left alone).

    Array leaves may be NumPy arrays or anything ``np.asarray`` reads (a CPU torch tensor).
    """
    if not isinstance(state, dict):
        return
    py = state.get("python")
    if py:
        internal = py["state"] if "state" in py else py["internal"]
        random.setstate((int(py["version"]), tuple(int(x) for x in np.asarray(internal)), py["gauss"]))
    n = state.get("numpy")
    if n:
        np.random.set_state(
            (
                n["algo"] if "algo" in n else n["kind"],
                np.asarray(n["keys"]).astype(np.uint32),
                int(n["pos"]),
                int(n["has_gauss"]),
                float(n["cached_gaussian"] if "cached_gaussian" in n else n["cached"]),
            )
        )
