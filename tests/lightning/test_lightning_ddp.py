"""DDP with 2 CPU processes (gloo): periodic saves, rotation, resume; only rank 0 writes; failures
surface on every rank, and nothing hangs (the whole run has a timeout, DDP collectives one too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from lightning_helpers import HERE, PYTHON, same_weights, script_env

from ckpt_callbacks import get_checkpoint_state

SCRIPT = os.path.join(HERE, "lightning_ddp_script.py")

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)


def ddp_run(tmp_path, name: str, directory: str, max_steps: int, *args: str) -> list[dict]:
    out = str(tmp_path / name)
    proc = subprocess.run(
        [PYTHON, SCRIPT, "--dir", directory, "--out", out, "--max-steps", str(max_steps), *args],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )
    results = []
    for rank in (0, 1):
        path = os.path.join(out, f"rank{rank}.json")
        assert os.path.exists(path), (
            f"rank {rank} wrote no result\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        with open(path) as f:
            result = json.load(f)
        result["weights"] = torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=True)
        results.append(result)
    return results


def test_ddp_periodic_saves_rotation_resume_and_rank_zero_only_writes(tmp_path):
    d = str(tmp_path / "ckpts")
    first = ddp_run(tmp_path, "first", d, 14, "--crash-at", "11")
    for r in first:
        assert r["error"] == "RuntimeError: simulated crash at step 11" and r["violations"] == []
    # Both ranks took the same decisions although only rank 0's clock moves (it is broadcast).
    saved_at = first[0]["saved_at"]
    assert saved_at == first[1]["saved_at"] and {3, 6, 9} <= set(saved_at)
    kept = [os.path.basename(p) for p in get_checkpoint_state(d).all_model_checkpoint_paths]
    assert kept == [f"ckpt-{s}" for s in saved_at[-2:]]  # max_to_keep=2

    resumed = ddp_run(tmp_path, "resumed", d, 14)
    reference = ddp_run(tmp_path, "reference", str(tmp_path / "reference-ckpts"), 14)
    for r in resumed:
        assert "error" not in r and r["violations"] == []
        assert r["resumed_from"] == os.path.join(d, f"ckpt-{saved_at[-1]}") and r["global_step"] == 14
    assert resumed[0]["saved_at"] == resumed[1]["saved_at"]
    assert same_weights(resumed[0]["weights"], resumed[1]["weights"])
    assert same_weights(resumed[0]["weights"], reference[0]["weights"])
    kept = [os.path.basename(p) for p in get_checkpoint_state(d).all_model_checkpoint_paths]
    assert kept == [f"ckpt-{s}" for s in resumed[0]["saved_at"][-2:]]
    assert sorted(f for f in os.listdir(d) if f.endswith(".index")) == sorted(f"{k}.index" for k in kept)


def test_ddp_failed_save_raises_on_every_rank(tmp_path):
    d = str(tmp_path / "ckpts")
    results = ddp_run(tmp_path, "failing", d, 14, "--fail-at", "9")
    for r in results:
        assert r["global_step"] == 9 and r["violations"] == []
        assert r["error"].startswith("CheckpointWriteError"), r["error"]
    assert "failed on global rank 0" in results[1]["error"]
    assert results[0]["saved_at"] == results[1]["saved_at"]
