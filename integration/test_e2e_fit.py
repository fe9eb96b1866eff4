"""Keras ``model.fit`` and Lightning ``Trainer.fit`` save to and resume from s3:// and gs://.

Each case trains in a fresh process against the real local S3 server or GCS emulator, SIGKILLs it
(from this parent) after a mid-epoch checkpoint committed, reruns the same command, and compares the
final weights (and optimizer state) bit for bit with an uninterrupted run into another directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cloud_helpers import GCS_BUCKET, ROOT, S3_BUCKET, gcs_options, s3_options

from ckpt_callbacks import latest_checkpoint

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


@pytest.fixture(params=["s3", "gs"])
def store(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """(URL prefix, storage_options) of one object store; the fixture of the other is never started."""
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        return f"s3://{S3_BUCKET}", s3_options(endpoint)
    request.getfixturevalue("gcs_endpoint")
    return f"gs://{GCS_BUCKET}", gcs_options()


def _env(storage_options: dict[str, Any], **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CKPT_STORAGE_OPTIONS=json.dumps(storage_options),
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "lightning"), env.get("PYTHONPATH", "")]),
        PYTHONHASHSEED="0",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONWARNINGS="ignore",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",
        **extra,
    )
    env.pop("LOCAL_RANK", None)
    return env


def _run(script: str, args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(
        [sys.executable, str(HERE / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _run_and_kill(script: str, args: list[str], env: dict[str, str]) -> None:
    """Start the run, wait for READY (it then blocks), SIGKILL it from here."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("READY"), (
            f"{line!r}\n{proc.stderr.read()[-4000:] if proc.poll() is not None else ''}"
        )
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("keras_backend", ["tensorflow", "torch"])
def test_keras_fit_sigkill_resume_on_object_store(
    store: tuple[str, dict[str, Any]], keras_backend: str, tmp_path: Path
) -> None:
    pytest.importorskip("keras")
    pytest.importorskip(keras_backend)
    base, so = store
    env = _env(so, KERAS_BACKEND=keras_backend)
    run = uuid.uuid4().hex[:10]
    # Uninterrupted reference run.
    _run("e2e_keras_script.py", [f"{base}/keras-ref-{run}", str(tmp_path / "ref.npz")], env)
    # Killed after global step 10 (5 batches per epoch; the last checkpoint is ckpt-8, mid-epoch 1).
    directory = f"{base}/keras-{run}"
    _run_and_kill("e2e_keras_script.py", [directory, str(tmp_path / "got.npz"), "10"], env)
    assert latest_checkpoint(directory, storage_options=so).endswith("/ckpt-8")
    _run("e2e_keras_script.py", [directory, str(tmp_path / "got.npz")], env)
    ref, got = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "got.npz")
    assert str(got["resumed"]).endswith("ckpt-8")
    names = [k for k in ref.files if k != "resumed"]
    assert names == [k for k in got.files if k != "resumed"]
    for k in names:
        assert np.array_equal(ref[k], got[k]), f"variable {k} differs after resume"


def test_lightning_fit_sigkill_resume_on_object_store(
    store: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("lightning")
    base, so = store
    env = _env(so)
    run = uuid.uuid4().hex[:10]
    _run("e2e_lightning_script.py", [f"{base}/pl-ref-{run}", str(tmp_path / "ref.pt")], env)
    # Blocked before optimizer step 10 (6 batches per epoch): the last checkpoint is ckpt-8, mid-epoch 1.
    directory = f"{base}/pl-{run}"
    _run_and_kill("e2e_lightning_script.py", [directory, str(tmp_path / "got.pt"), "10"], env)
    assert latest_checkpoint(directory, storage_options=so).endswith("/ckpt-8")
    _run("e2e_lightning_script.py", [directory, str(tmp_path / "got.pt")], env)
    ref, got = torch.load(tmp_path / "ref.pt"), torch.load(tmp_path / "got.pt")
    assert got["global_step"] == ref["global_step"] == 18
    assert str(got["resumed_from"]).endswith("ckpt-8")
    assert ref["weights"].keys() == got["weights"].keys()
    for k in ref["weights"]:
        assert torch.equal(ref["weights"][k], got["weights"][k]), f"weight {k} differs after resume"
