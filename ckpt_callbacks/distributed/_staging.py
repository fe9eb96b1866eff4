"""The staging copy of an async sharded save: the only work the training thread blocks on.

Each rank copies its own local shards (a DTensor's local tensor, a plain tensor as it is) into CPU
tensors kept between saves, and rebuilds the state around them: DTensors again (same mesh,
placements, global shape and stride; no communication), every other leaf copied. The background
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
        buf = _copy(buffers, used, path, node.to_local())
        return DTensor.from_local(
            buf, node.device_mesh, node.placements, run_check=False, shape=node.shape, stride=node.stride()
        )
    if isinstance(node, torch.Tensor):
        return _copy(buffers, used, path, node)
    if isinstance(node, dict):
        return {k: _stage(buffers, used, v, (*path, k)) for k, v in node.items()}
    if isinstance(node, (list, tuple)) and type(node) in (list, tuple):
        return type(node)(_stage(buffers, used, v, (*path, i)) for i, v in enumerate(node))
    if callable(getattr(node, "state_dict", None)):  # a Stateful, as dcp.save would ask it
        return _stage(buffers, used, node.state_dict(), path)
    return copy.deepcopy(node)


def _copy(buffers: dict, used: set, path: tuple, src: torch.Tensor) -> torch.Tensor:
    src = src.detach()
    buf = buffers.get(path)
    if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
        # Pinned host memory makes the device-to-host copy of a GPU shard asynchronous-capable and fast.
        pin = src.is_cuda and torch.cuda.is_available()
        buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pin)
        buffers[path] = buf
    used.add(path)
    buf.copy_(src)
    return buf
