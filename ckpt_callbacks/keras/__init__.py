"""Keras 3 integration: ``CheckpointCallback`` for ``model.fit``, ``BackupAndRestore`` (a drop-in for
Keras' own), ``restore``, ``load_model``.

Works on every Keras 3 backend (TensorFlow, PyTorch, JAX). ``ResumableDataset`` is the data-position
mechanism for an exact mid-epoch resume (see docs/keras.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys

# Which pip package provides each Keras backend, and the extra of this package that installs it.
_BACKENDS = {
    "tensorflow": ("tensorflow-cpu", "tensorflow"),
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
}
_INSTALL_HINT = (
    "Install Keras with one backend, e.g. pip install 'ckpt-callbacks[keras,tensorflow]' (TensorFlow, "
    "package tensorflow-cpu), 'ckpt-callbacks[keras,torch]' (PyTorch) or 'ckpt-callbacks[keras,jax]' (JAX); "
    "from a source checkout: pip install -e '.[keras,tensorflow]'."
)


def _missing_backend() -> str | None:
    """A message naming the missing piece when Keras' backend cannot be imported, else None."""
    wanted = os.environ.get("KERAS_BACKEND")
    if wanted and wanted in _BACKENDS:
        if not _importable(wanted):
            package, extra = _BACKENDS[wanted]
            return (
                f"ckpt_callbacks.keras: KERAS_BACKEND={wanted!r} but {wanted!r} is not installed. Install it "
                f"with pip install {package!r} (or pip install 'ckpt-callbacks[keras,{extra}]'), or set "
                f"KERAS_BACKEND to an installed backend ({', '.join(_installed()) or 'none installed'})."
                + ("" if _installed() else f" {_INSTALL_HINT}")
            )
        return None
    if not wanted and not _installed():
        return (
            "ckpt_callbacks.keras needs Keras 3 and one of its backends, and no backend is installed "
            f"(none of tensorflow, torch, jax). {_INSTALL_HINT}"
        )
    default = _configured_backend()
    if not wanted and default in _BACKENDS and not _importable(default):
        package, extra = _BACKENDS[default]
        return (
            f"ckpt_callbacks.keras: Keras' configured backend is {default!r} (KERAS_BACKEND is not set), "
            f"which is not installed. Set KERAS_BACKEND to an installed one ({', '.join(_installed())}), "
            f"e.g. KERAS_BACKEND={_installed()[0]}, or install it: pip install {package!r} (extra "
            f"'ckpt-callbacks[keras,{extra}]')."
        )
    return None


def _configured_backend() -> str:
    """The backend Keras picks without KERAS_BACKEND: its keras.json, else TensorFlow."""
    import json

    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    return backend if isinstance(backend, str) else "tensorflow"


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None  # None: imports of it are blocked
    return importlib.util.find_spec(name) is not None


def _installed() -> list[str]:
    return [name for name in _BACKENDS if _importable(name)]


if not _importable("keras"):
    raise ModuleNotFoundError(
        f"ckpt_callbacks.keras needs Keras 3 (pip package 'keras'), which is not installed. {_INSTALL_HINT}",
        name="keras",
    )
_problem = _missing_backend()
if _problem is not None:
    raise ModuleNotFoundError(_problem, name="keras")

import keras  # noqa: E402

if not keras.__version__.startswith("3."):  # pragma: no cover - depends on the environment
    raise ImportError(
        f"ckpt_callbacks.keras needs Keras 3; found keras {keras.__version__}. Upgrade with pip install -U "
        "'keras>=3'."
    )

from ._backup import BackupAndRestore  # noqa: E402
from ._callback import CheckpointCallback  # noqa: E402
from ._data import ResumableDataset  # noqa: E402
from ._restore import load_model, restore  # noqa: E402

__all__ = ["BackupAndRestore", "CheckpointCallback", "ResumableDataset", "load_model", "restore"]
