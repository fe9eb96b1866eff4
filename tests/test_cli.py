"""The command line (SPEC §2.4): every command and its exit status, through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ckpt_callbacks import CheckpointManager
from ckpt_callbacks._cli import _options, main


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_callbacks", *args], capture_output=True, text=True)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    clock = iter(float(t) for t in range(0, 10**6, 1800)).__next__
    with CheckpointManager(
        str(d), max_to_keep=2, keep_best=1, monitor="loss", keep_checkpoint_every_n_hours=1, clock=clock
    ) as mgr:
        for i, loss in enumerate([0.5, 3.0, 2.0, 1.0, 4.0, 5.0], start=1):
            state = {
                "model": {"w": np.full((4, 4), i, np.float32), "b": np.arange(3, dtype=np.int64)},
                "epoch": i,
            }
            mgr.save(state, step=i * 100, metrics={"loss": loss})
    return d


def test_ls_table_and_json(run_dir):
    out = cli("ls", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "kept-because" in out.stdout and "hourly" in out.stdout and "ckpt-600 *" in out.stdout
    doc = json.loads(cli("ls", str(run_dir), "--json").stdout)
    assert doc["latest"] == "ckpt-600"
    reasons = {c["step"]: c["kept_because"] for c in doc["checkpoints"]}
    assert reasons[600] == ["latest"] and reasons[500] == ["latest"]
    assert "best" in reasons[100] or "hourly" in reasons[100]
    assert all(c["size"] > 0 and "loss" in c["metrics"] for c in doc["checkpoints"])


def test_inspect(run_dir):
    out = cli("inspect", str(run_dir / "ckpt-600"))
    assert out.returncode == 0
    assert "model/w  float32  (4, 4)  64 B" in out.stdout and "'epoch': 6" in out.stdout
    doc = json.loads(cli("inspect", str(run_dir / "ckpt-600"), "--json").stdout)
    assert {t["name"]: t["shape"] for t in doc["tensors"]} == {"model/b": [3], "model/w": [4, 4]}
    assert doc["meta"]["metrics"] == {"loss": 5.0}


def test_verify_ok_then_corrupt_names_file_and_tensor(run_dir):
    assert cli("verify", str(run_dir)).returncode == 0
    data = run_dir / "ckpt-600.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # last byte of the last tensor, "model/b"
    data.write_bytes(bytes(raw))
    out = cli("verify", str(run_dir))
    assert out.returncode == 1
    assert (
        "CORRUPT" in out.stdout and "model/b" in out.stdout and "ckpt-600.data-00000-of-00001" in out.stdout
    )
    assert cli("verify", str(run_dir / "ckpt-500")).returncode == 0
    assert cli("verify", str(run_dir / "ckpt-600")).returncode == 1


def test_usage_and_not_found_exit_2(tmp_path):
    assert cli("ls", str(tmp_path / "nothing")).returncode == 2
    assert cli("verify", str(tmp_path / "nothing")).returncode == 2
    assert cli("inspect", str(tmp_path / "ckpt-1")).returncode == 2
    assert cli("bogus").returncode == 2
    assert cli("ls", str(tmp_path), "--storage-option", "novalue").returncode == 2


def test_gc_removes_only_leftovers(run_dir):
    (run_dir / "ckpt-700.data-00000-of-00001").write_bytes(
        (run_dir / "ckpt-600.data-00000-of-00001").read_bytes()
    )
    (run_dir / ".ckpt-800.index.tmp-0123abcd").write_bytes(b"partial")
    (run_dir / "notes.txt").write_text("mine")
    before = {p.name for p in run_dir.iterdir()}
    out = cli("gc", str(run_dir))
    assert out.returncode == 0 and "2 leftover file(s) removed" in out.stdout
    after = {p.name for p in run_dir.iterdir()}
    assert before - after == {"ckpt-700.data-00000-of-00001", ".ckpt-800.index.tmp-0123abcd"}


def test_gc_of_a_missing_directory_is_a_usage_error(tmp_path):
    out = cli("gc", str(tmp_path / "nope"))
    assert out.returncode == 2 and "No checkpoint directory" in out.stderr
    assert not (tmp_path / "nope").exists()


def test_verify_names_the_tensors_a_truncation_cut(run_dir):
    data = run_dir / "ckpt-600.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-10])
    out = cli("verify", str(run_dir / "ckpt-600"))
    assert out.returncode == 1
    assert "ckpt-600.data-00000-of-00001" in out.stdout and "truncated" in out.stdout
    assert "'model/w'" in out.stdout or "'model/b'" in out.stdout, out.stdout


@pytest.mark.parametrize("to", ["safetensors", "npz", "torch"])
def test_export(run_dir, tmp_path, to):
    out_file = tmp_path / f"weights.{to}"
    assert main(["export", str(run_dir / "ckpt-600"), "--to", to, str(out_file)]) == 0
    if to == "safetensors":
        loaded = load_file(str(out_file))
    elif to == "npz":
        loaded = dict(np.load(str(out_file)))
    else:
        import torch

        loaded = {k: v.numpy() for k, v in torch.load(str(out_file), weights_only=True).items()}
    assert set(loaded) == {"model/w", "model/b"}
    np.testing.assert_array_equal(loaded["model/w"], np.full((4, 4), 6, np.float32))


def test_storage_options_parse():
    assert _options(["anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "key=abc"]) == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "key": "abc",
    }


@pytest.mark.parametrize("field", ["model_checkpoint_path", "all_model_checkpoint_paths"])
def test_state_file_naming_outside_paths_is_corruption(tmp_path, field):
    (tmp_path / "checkpoint").write_text(f'{field}: "../victim"\n')
    assert cli("ls", str(tmp_path)).returncode == 1
    assert cli("verify", str(tmp_path)).returncode == 1
