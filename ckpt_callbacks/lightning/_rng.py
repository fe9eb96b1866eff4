"""Capture and restore the global random number generators (torch, CUDA, numpy, python).

Lightning's own checkpoints do not carry them, so dropout masks and the order a shuffled
``DataLoader`` draws after a resume differ from an uninterrupted run. The states are plain tree
leaves (torch tensors, strings and numbers), so they are stored without pickle; being torch
tensors they also pass ``torch.load(weights_only=True)`` when Lightning's own ``ModelCheckpoint``
writes this callback's state with ``torch.save``.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture() -> dict[str, Any]:
    """The current global RNG states as a tree the core can store.

    Example:
        >>> state = capture()
        >>> a = torch.rand(3)
        >>> restore(state)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture`'s output (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(
            (n["kind"], np.asarray(_numpy(n["keys"]), dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"])
        )
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(int(x) for x in _numpy(p["internal"])), p["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda_states])


def _numpy(x: Any) -> Any:
    return x.numpy() if isinstance(x, torch.Tensor) else x
