"""Crash tests: a Lightning run SIGKILLed mid-training and resumed ends with bit-identical weights.

Every run is a real process (tests/lightning/lightning_train_script.py); the killed one blocks at a
global step, the test sends SIGKILL, and the resumed runs start from what is on disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest
import torch
from lightning_helpers import HERE, PYTHON, same_weights, script_env

SCRIPT = os.path.join(HERE, "lightning_train_script.py")
TIMEOUT = 120


def train(tmp_path, name: str, *args: str) -> dict:
    out = str(tmp_path / f"{name}.pt")
    proc = subprocess.run(
        [PYTHON, SCRIPT, "--out", out, *args],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def train_and_kill(tmp_path, kill_at: int, *args: str) -> None:
    proc = subprocess.Popen(
        [PYTHON, SCRIPT, "--out", str(tmp_path / "killed.pt"), "--kill-at", str(kill_at), *args],
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        for line in proc.stdout:
            if line.startswith("READY"):
                break
        else:
            pytest.fail(f"the run ended before global step {kill_at} (exit status {proc.wait()})")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not (tmp_path / "killed.pt").exists()


def test_resume_after_sigkill_matches_uninterrupted_and_lightning_resume(tmp_path):
    """Deterministic model and data: ours (auto resume and ckpt_path="last") and Lightning's own
    resume (TorchCheckpointIO, epoch-end checkpoints: where Lightning is exact) all match."""
    ours, pl = str(tmp_path / "ours"), str(tmp_path / "pl")
    reference = train(tmp_path, "reference")
    # saves at steps 4, 8 (mid-epoch: 6 batches per epoch) and Lightning's at step 6; killed at 10
    train_and_kill(tmp_path, 10, "--ours", ours, "--pl", pl)
    shutil.copytree(ours, ours + "-copy")

    auto = train(tmp_path, "auto", "--ours", ours)
    assert auto["resumed_from"] == os.path.join(ours, "ckpt-8")
    last = train(tmp_path, "last", "--ours", ours + "-copy", "--no-resume", "--ckpt-path", "last")
    assert last["resumed_from"] == os.path.join(ours + "-copy", "ckpt-8.index")
    lightning = train(tmp_path, "lightning", "--pl", pl, "--ckpt-path", "last")
    assert lightning["resumed_from"] == os.path.join(pl, "last.ckpt")

    for run in (auto, last, lightning):
        assert run["global_step"] == reference["global_step"] == 18
        assert same_weights(run["weights"], reference["weights"])


@pytest.mark.parametrize(
    ("save_every", "kill_at", "resumed_step"),
    [(4, 10, 8), (6, 9, 6)],
    ids=["mid-epoch", "epoch-boundary"],
)
def test_dropout_and_shuffle_resume_exactly_only_with_rng_restore(
    tmp_path, save_every, kill_at, resumed_step
):
    opts = ["--dropout", "0.5", "--shuffle", "--save-every", str(save_every)]
    ours = str(tmp_path / "ours")
    reference = train(tmp_path, "reference", *opts)
    train_and_kill(tmp_path, kill_at, "--ours", ours, *opts)
    shutil.copytree(ours, ours + "-copy")

    resumed = train(tmp_path, "resumed", "--ours", ours, *opts)
    assert resumed["resumed_from"] == os.path.join(ours, f"ckpt-{resumed_step}")
    assert same_weights(resumed["weights"], reference["weights"])

    # The same resume without restoring the RNG states draws other dropout masks and batch orders.
    no_rng = train(tmp_path, "no-rng", "--ours", ours + "-copy", "--no-rng", *opts)
    assert no_rng["global_step"] == reference["global_step"]
    assert not same_weights(no_rng["weights"], reference["weights"])
