"""A Python environment with only the core installed (fsspec, numpy, xxhash, ml_dtypes: no torch, no
TensorFlow, no Lightning) reads, verifies and exports what a real ``Trainer.fit`` wrote.

The environment is a real venv made with ``python -m venv --without-pip``: its ``sys.path`` holds the
standard library, a folder that links exactly the core's dependencies, and this repository. Nothing is
downloaded, and ``import torch`` fails there as it does on a machine that never installed it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import venv

import numpy as np
import pytest
import torch
from lightning_helpers import ROOT, make_loader, make_trainer, model_class

from ckpt_callbacks.lightning import CheckpointCallback, FsspecCheckpointIO

CORE_DISTRIBUTIONS = ("fsspec", "numpy", "xxhash", "ml_dtypes")


def _link_distribution(name: str, site: str) -> None:
    """Link every top-level file or folder that distribution ``name`` installed into ``site``."""
    dist = importlib.metadata.distribution(name)
    tops = {f.parts[0] for f in dist.files or () if f.parts and f.parts[0] != ".."}  # not bin/ scripts
    for top in sorted(tops):
        src = os.path.join(str(dist.locate_file("")), top)
        if os.path.exists(src) and not top.startswith("__pycache__") and not top.endswith(".pth"):
            os.symlink(src, os.path.join(site, top))


@pytest.fixture(scope="module")
def core_python(tmp_path_factory) -> str:
    """The interpreter of a venv that holds only the core's dependencies and this repository."""
    root = tmp_path_factory.mktemp("core-only")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    linked = root / "core-deps"
    linked.mkdir()
    for name in CORE_DISTRIBUTIONS:
        _link_distribution(name, str(linked))
    with open(os.path.join(site, "core.pth"), "w") as f:
        f.write(f"{linked}\n{ROOT}\n")
    probe = subprocess.run(
        [
            python,
            "-c",
            "import ckpt_callbacks, importlib.util as u;"
            "print([m for m in ('torch', 'tensorflow', 'lightning', 'keras') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]", f"the core-only venv can import frameworks: {probe.stdout}"
    return python


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([python, *args], capture_output=True, text=True, env=_clean_env(), timeout=300)


def test_core_only_environment_reads_verifies_and_exports_a_lightning_run(core_python, tmp_path, pl):
    directory = str(tmp_path / "run")
    markers = str(tmp_path / "markers")
    model = model_class(pl)()
    cb = CheckpointCallback(directory, save_every_n_steps=4, max_to_keep=2)
    mc = pl.callbacks.ModelCheckpoint(dirpath=markers, save_last=True)
    trainer = make_trainer(str(tmp_path), [cb, mc], pl=pl, max_epochs=2, plugins=[FsspecCheckpointIO()])
    trainer.fit(model, make_loader(), make_loader())
    want = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    # The library's own directory: verify, list, load as numpy, export.
    out = _run(core_python, "-m", "ckpt_callbacks", "verify", directory)
    assert out.returncode == 0, out.stdout + out.stderr
    code = (
        "import json, sys, numpy as np\n"
        "from ckpt_callbacks import load_checkpoint, list_variables\n"
        "state = load_checkpoint(sys.argv[1])\n"
        "sd = state['state_dict']\n"
        "print(json.dumps({'types': sorted({type(v).__module__ for v in sd.values()}),\n"
        "  'values': {k: v.tolist() for k, v in sd.items()},\n"
        "  'vars': len(list_variables(sys.argv[1])),\n"
        "  'torch': 'torch' in sys.modules}))\n"
    )
    out = _run(core_python, "-c", code, directory)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["types"] == ["numpy"] and got["torch"] is False
    assert got["vars"] > len(want)  # the optimizer's tensors are listed too
    assert set(got["values"]) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(np.asarray(got["values"][k], dtype=v.dtype), v)

    npz = str(tmp_path / "weights.npz")
    out = _run(
        core_python,
        "-m",
        "ckpt_callbacks",
        "export",
        directory,
        "--to",
        "npz",
        "--strip-prefix",
        "state_dict/",
        npz,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    exported = np.load(npz)
    assert set(exported.files) == set(want)
    fresh = model_class(pl)()
    fresh.load_state_dict({k: torch.from_numpy(exported[k]) for k in exported.files})
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), want[k])

    # Lightning's own ModelCheckpoint through FsspecCheckpointIO: the marker directory reads too.
    out = _run(core_python, "-m", "ckpt_callbacks", "ls", markers)
    assert out.returncode == 0 and "last.ckpt" in out.stdout, out.stdout + out.stderr
    out = _run(core_python, "-m", "ckpt_callbacks", "verify", os.path.join(markers, "last.ckpt"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_only_environment_has_no_torch(core_python):
    out = _run(core_python, "-c", "import torch")
    assert out.returncode != 0 and "No module named 'torch'" in out.stderr
    assert sys.executable != core_python
