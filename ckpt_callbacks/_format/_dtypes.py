"""Dtypes by name: the numeric numpy and ml_dtypes dtypes the format stores, and their names.

ml_dtypes (bfloat16, float8, ...) is imported only when one of its dtypes is named or converted:
most saves never need it, and importing it costs more than the rest of the package.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import CorruptCheckpointError

# ml_dtypes' dtypes by name. ml_dtypes itself is imported only when one of them is used (a state
# or checkpoint holding bfloat16 / float8 ...): most saves never need it, and it is slow to import.
_ML_DTYPE_NAMES = frozenset(
    (
        "bfloat16",
        "float8_e3m4",
        "float8_e4m3",
        "float8_e4m3b11fnuz",
        "float8_e4m3fn",
        "float8_e4m3fnuz",
        "float8_e5m2",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float6_e2m3fn",
        "float6_e3m2fn",
        "float4_e2m1fn",
        "int2",
        "int4",
        "uint2",
        "uint4",
    )
)


def _ml_dtype(name: str) -> np.dtype | None:
    """ml_dtypes' dtype ``name`` (importing ml_dtypes), or None when this ml_dtypes lacks it."""
    import ml_dtypes

    t = getattr(ml_dtypes, name, None)
    return None if t is None else np.dtype(t)


_NUMERIC_KINDS = frozenset("biufc")


def dtype_from_name(name: object) -> np.dtype:
    """The numpy dtype for a stored dtype name; only numeric dtypes are accepted."""
    if not isinstance(name, str) or len(name) > 32:
        raise CorruptCheckpointError(f"Invalid dtype in checkpoint index: {name!r:.80}.")
    return _dtype_from_str(name)


@functools.lru_cache(maxsize=256)  # only valid names are cached: a failure raises
def _dtype_from_str(name: str) -> np.dtype:
    if name in _ML_DTYPE_NAMES and (ml := _ml_dtype(name)) is not None:
        return ml
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise CorruptCheckpointError(
            f"Unknown dtype {name!r} in checkpoint index. Expected a numeric numpy or ml_dtypes dtype."
        ) from None
    if dtype.kind not in _NUMERIC_KINDS or dtype.name != name:
        raise CorruptCheckpointError(
            f"Non-numeric dtype {name!r} in checkpoint index. Expected a numeric numpy or ml_dtypes dtype."
        )
    return dtype


@functools.lru_cache(maxsize=1024)
def dtype_str(dtype: np.dtype) -> str:
    """``dtype.name``, cached: numpy computes it in Python (~5 us), once per tensor per use adds up
    for states of thousands of small tensors."""
    return str(dtype.name)


def dtype_name(dtype: np.dtype) -> str:
    """The stored name of a numeric dtype; raises TypeError for anything else."""
    name = dtype_str(dtype)
    if name in _ML_DTYPE_NAMES or (dtype.kind in _NUMERIC_KINDS and dtype.fields is None):
        return name
    raise TypeError(f"dtype {dtype!r} is not numeric")


def _parse_dtype(name: str) -> np.dtype:
    if name in _ML_DTYPE_NAMES and (ml := _ml_dtype(name)) is not None:
        return ml
    return np.dtype(name)
