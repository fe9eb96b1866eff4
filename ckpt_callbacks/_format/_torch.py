"""The torch tensor kind (see :mod:`._kinds`): torch tensor <-> numpy, imported only once a torch
tensor is saved or a checkpoint recording one is loaded with torch importable.

numpy has no bfloat16 / float8, so those travel as same-width integer views and are reinterpreted
as their ml_dtypes twins: no copy, bit-identical. ml_dtypes is imported only for those dtypes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

# torch dtype -> (same-width integer view, ml_dtypes name)
_VIEWED = {
    torch.bfloat16: (torch.int16, "bfloat16"),
    torch.float8_e4m3fn: (torch.uint8, "float8_e4m3fn"),
    torch.float8_e5m2: (torch.uint8, "float8_e5m2"),
    torch.float8_e4m3fnuz: (torch.uint8, "float8_e4m3fnuz"),
    torch.float8_e5m2fnuz: (torch.uint8, "float8_e5m2fnuz"),
}
if hasattr(torch, "float8_e8m0fnu"):
    _VIEWED[torch.float8_e8m0fnu] = (torch.uint8, "float8_e8m0fnu")


@functools.cache
def _via_view() -> dict:
    """torch dtype -> (integer view, numpy dtype) for the dtypes numpy lacks (imports ml_dtypes)."""
    import ml_dtypes

    return {
        tdtype: (view, np.dtype(getattr(ml_dtypes, name)))
        for tdtype, (view, name) in _VIEWED.items()
        if hasattr(ml_dtypes, name)
    }


@functools.cache
def _back() -> dict:
    return {np_dtype: (view, tdtype) for tdtype, (view, np_dtype) in _via_view().items()}


def numpy_dtype(t: torch.Tensor) -> np.dtype:
    if type(t).__name__ == "DTensor":
        # Its bytes live on every rank: one process cannot save it (``.numpy()`` refuses subclasses).
        raise TypeError(
            "it is a DTensor, sharded across ranks, which one process cannot save. Expected a plain "
            "tensor. Save sharded state on every rank with CheckpointManager.save (a collective for "
            "a state with DTensor leaves) or ckpt_callbacks.distributed, or call .full_tensor() first."
        )
    if t.dtype in _VIEWED and t.dtype in _via_view():
        return _via_view()[t.dtype][1]
    try:
        return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)
    except TypeError:
        raise TypeError(f"torch dtype {t.dtype} has no numpy equivalent") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous CPU numpy view of the tensor (a copy only when it lives elsewhere or is strided)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    t = t.contiguous()
    if t.dtype in _VIEWED and t.dtype in _via_view():
        view, np_dtype = _via_view()[t.dtype]
        return t.view(view).numpy().view(np_dtype)
    return t.numpy()


def from_numpy(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype.type.__module__.startswith("ml_dtypes") and arr.dtype in _back():
        view, tdtype = _back()[arr.dtype]
        return torch.from_numpy(arr.view(np.int16 if view is torch.int16 else np.uint8)).view(tdtype)
    return torch.from_numpy(arr)


class TorchKind:
    """torch tensors as a tensor kind of the format (registered in :data:`._kinds.KINDS`)."""

    name = "torch"
    tensor_type = torch.Tensor

    numpy_dtype = staticmethod(numpy_dtype)
    to_numpy = staticmethod(to_numpy)
    from_numpy = staticmethod(from_numpy)

    @staticmethod
    def version(t: torch.Tensor) -> int | None:
        """torch's in-place-modification counter of ``t``: a new value proves ``t`` changed (the
        same value proves nothing: ``.data`` writes do not count), so incremental saves skip hashing it."""
        try:
            return int(t._version)
        except (AttributeError, RuntimeError):  # inference tensors keep no counter
            return None

    @staticmethod
    def copy_into(buf: np.ndarray, t: torch.Tensor) -> bool:
        """Copy ``t`` straight into the host buffer ``buf`` (any device, any strides); False for a
        tensor with a lazy conjugate / negation bit, which :func:`to_numpy` resolves instead."""
        if t.is_conj() or t.is_neg():
            return False
        # One copy straight from the tensor into the host buffer: to_numpy() would first make a
        # CPU / contiguous copy of its own. torch also copies with all its threads, np.copyto with one.
        from_numpy(buf).copy_(t.detach())
        return True

    @staticmethod
    def host_view(t: torch.Tensor) -> np.ndarray | None:
        """A numpy view of ``t``'s own memory when writing the saved bytes there restores it (a
        contiguous, plain CPU tensor); None when restoring in place must stage and :meth:`copy_from`."""
        if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous():
            return None
        if t.is_conj() or t.is_neg():
            return None
        return to_numpy(t)

    @staticmethod
    def copy_from(t: torch.Tensor, arr: np.ndarray) -> None:
        """Copy the host array ``arr`` (same shape and dtype) into ``t`` (any device, any strides)."""
        with torch.no_grad():
            t.copy_(from_numpy(arr))
