"""The staging copy of an async sharded save: the only work the training thread blocks on.

Each rank copies its own local shards (a DTensor's local tensor, a plain tensor as it is) into CPU
tensors kept between saves, and rebuilds the state around them: DTensors again (same mesh,
placements, global shape and stride; no communication; the same DTensor objects from save to save
while the layout stays), every other leaf copied. The background
``dcp.save`` then reads only these copies, so training may change the model at once. Buffers are
reused by position in the state while their shape and dtype stay the same; the caller frees them
for the next save by waiting for the previous one first.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.distributed.tensor import DTensor


def stage(buffers: dict, state: Any) -> Any:
    """A copy of ``state`` whose tensors live in ``buffers`` (by position in the state; created on
    first use, reused after). Buffers of tensors the state no longer has are dropped."""
    used: set = set()
    out = _stage(buffers, used, state, ())
    for stale in set(buffers) - used:
        del buffers[stale]
    return out


def _stage(buffers: dict, used: set, node: Any, path: tuple) -> Any:
    if isinstance(node, DTensor):
        return _copy(buffers, used, path, node.to_local(), node)
    if isinstance(node, torch.Tensor):
        return _copy(buffers, used, path, node, None)
    if isinstance(node, dict):
        return {k: _stage(buffers, used, v, (*path, k)) for k, v in node.items()}
    if isinstance(node, (list, tuple)) and type(node) in (list, tuple):
        return type(node)(_stage(buffers, used, v, (*path, i)) for i, v in enumerate(node))
    if callable(getattr(node, "state_dict", None)):  # a Stateful, as dcp.save would ask it
        return _stage(buffers, used, node.state_dict(), path)
    return copy.deepcopy(node)


def _copy(buffers: dict, used: set, path: tuple, src: torch.Tensor, dt: DTensor | None) -> torch.Tensor:
    """``src`` copied into the buffer at ``path``; as a DTensor like ``dt`` when one is given. The
    DTensor around a buffer is kept with it while its layout stays the same (building one costs
    more than copying a small tensor)."""
    src = src.detach()
    layout = None if dt is None else (dt.device_mesh, tuple(dt.placements), dt.shape, dt.stride())
    entry = buffers.get(path)
    if entry is None or entry[0].shape != src.shape or entry[0].dtype != src.dtype or entry[2] != layout:
        # Pinned host memory makes the device-to-host copy of a GPU shard asynchronous-capable and fast.
        pin = src.is_cuda and torch.cuda.is_available()
        buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
        staged = buf
        if dt is not None:
            staged = DTensor.from_local(
                buf, dt.device_mesh, dt.placements, run_check=False, shape=dt.shape, stride=dt.stride()
            )
        entry = buffers[path] = (buf, staged, layout)
    used.add(path)
    entry[0].copy_(src)
    return entry[1]
