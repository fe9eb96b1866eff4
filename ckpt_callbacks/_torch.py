"""torch tensor <-> numpy conversion for the format, imported only once a torch tensor is seen.

numpy has no bfloat16 / float8, so those travel as same-width integer views and are reinterpreted
as their ml_dtypes twins: no copy, bit-identical.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

_VIA_VIEW = {
    torch.bfloat16: (torch.int16, np.dtype(ml_dtypes.bfloat16)),
    torch.float8_e4m3fn: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fn)),
    torch.float8_e5m2: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2)),
    torch.float8_e4m3fnuz: (torch.uint8, np.dtype(ml_dtypes.float8_e4m3fnuz)),
    torch.float8_e5m2fnuz: (torch.uint8, np.dtype(ml_dtypes.float8_e5m2fnuz)),
}
if hasattr(torch, "float8_e8m0fnu") and hasattr(ml_dtypes, "float8_e8m0fnu"):
    _VIA_VIEW[torch.float8_e8m0fnu] = (torch.uint8, np.dtype(ml_dtypes.float8_e8m0fnu))
_BACK = {np_dtype: (view, tdtype) for tdtype, (view, np_dtype) in _VIA_VIEW.items()}


def numpy_dtype(t: torch.Tensor) -> np.dtype:
    if t.dtype in _VIA_VIEW:
        return _VIA_VIEW[t.dtype][1]
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
    if t.dtype in _VIA_VIEW:
        view, np_dtype = _VIA_VIEW[t.dtype]
        return t.view(view).numpy().view(np_dtype)
    return t.numpy()


def from_numpy(arr: np.ndarray) -> torch.Tensor:
    if arr.dtype in _BACK:
        view, tdtype = _BACK[arr.dtype]
        return torch.from_numpy(arr.view(np.int16 if view is torch.int16 else np.uint8)).view(tdtype)
    return torch.from_numpy(arr)
