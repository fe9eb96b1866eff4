"""Capture and restore the global random number generators (torch, CUDA, numpy, python).

Lightning's own checkpoints do not carry them, so dropout masks and the order a shuffled
``DataLoader`` draws after a resume differ from an uninterrupted run. The states are plain tree
leaves (torch tensors, strings and numbers), so they are stored without pickle; being torch
tensors they also pass ``torch.load(weights_only=True)`` when Lightning's own ``ModelCheckpoint``
writes this callback's state with ``torch.save``.
"""

from __future__ import annotations

from typing import Any

import torch

from .._callbacks import _rng as _core_rng


def capture() -> dict[str, Any]:
    """The current global RNG states as a tree the core can store.

    Example:
        >>> state = capture()
        >>> a = torch.rand(3)
        >>> restore(state)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    core = _core_rng.capture_python_numpy()
    # Array leaves as torch tensors: they then also pass torch.load(weights_only=True) (module doc).
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {**core["numpy"], "keys": torch.from_numpy(core["numpy"]["keys"])},
        "python": {**core["python"], "state": torch.from_numpy(core["python"]["state"])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore(state: dict[str, Any]) -> None:
    """Set the global RNGs from :func:`capture`'s output (missing entries are left alone).

    Python / NumPy entries of either key layout (this one's, or ``internal`` / ``kind`` / ``cached``
    of checkpoints written before the core helper) are read by the core.
    """
    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    _core_rng.restore_python_numpy(
        {k: {n: _numpy(v) for n, v in state[k].items()} for k in ("python", "numpy") if state.get(k)}
    )
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda_states])


def _numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
