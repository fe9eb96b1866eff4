"""Helpers shared by the Keras tests: fresh-process runs per backend, a fake clock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
BACKENDS = ["tensorflow", "torch", "jax"]


def backend_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def run_python(
    code_or_script, *args, backend: str = "tensorflow", cwd=None, check=True, timeout=240, env=None
):
    """Run Python in a fresh process on the given Keras backend (KERAS_BACKEND is fixed per process)."""
    if not backend_available(backend):
        pytest.skip(f"Keras backend {backend!r} is not installed")
    extra_env, env = env, dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        TF_CPP_MIN_LOG_LEVEL="3",
        # HERE.parent: the helpers shared by every test directory (storage_reads)
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")]),
        PYTHONHASHSEED="0",
    )
    env.update(extra_env or {})
    if isinstance(code_or_script, Path):
        cmd = [sys.executable, str(code_or_script), *map(str, args)]
    else:
        cmd = [sys.executable, "-c", code_or_script, *map(str, args)]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"subprocess failed with {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc
