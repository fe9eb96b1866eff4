"""Keras on a 2-process JAX job (``jax.distributed`` on 127.0.0.1, gloo CPU collectives, 2 CPU devices
per process): the same ``CheckpointCallback(directory)`` on every process. Each process writes its own
data file, process 0 commits; kill both mid-fit and the rerun resumes bit-exactly; a process killed
during a save leaves the previous checkpoint latest; a 2-process checkpoint restores in one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from keras_helpers import HERE, REPO, run_python
from test_jax_sharded import RESTORE_ELSEWHERE, _env, _variables

from ckpt_callbacks import CheckpointManager
from ckpt_callbacks._manager._state import parse_state

pytest.importorskip("jax")
pytestmark = pytest.mark.slow
SCRIPT = HERE / "keras_jax_sharded_script.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_job(*args, timeout=300, **extra) -> list[subprocess.CompletedProcess]:
    """Both processes of the job; any still running at ``timeout`` is killed (and so is the other)."""
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND="jax",
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")]),
        PYTHONHASHSEED="0",
        NUM_PROCESSES="2",
        COORDINATOR=f"127.0.0.1:{_free_port()}",
        **_env(2),
        **extra,
    )
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    procs = [
        subprocess.Popen(
            cmd, env={**env, "PROCESS_ID": str(p)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for p in (0, 1)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(cmd, p.returncode, out.decode(), err.decode()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _check(results) -> None:
    for p, r in enumerate(results):
        assert r.returncode == 0, f"process {p} failed with {r.returncode}:\n{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    out = {}
    for layout in ("model", "data", "frozen"):
        d = tmp_path_factory.mktemp(f"ref2-{layout}")
        _check(_run(d, layout))
        out[layout] = d
    return out


def _layout(layout: str) -> tuple:
    """The script's layout and environment: "frozen" is "model" with the first layer frozen."""
    return ("model", {"FREEZE": "1"}) if layout == "frozen" else (layout, {})


def _run(directory, layout: str, *args, **extra) -> list[subprocess.CompletedProcess]:
    name, env = _layout(layout)
    return _run_job(directory / "ckpt", directory / "final.npz", name, *args, **env, **extra)


def _same_as_reference(d, ref_dir) -> None:
    for p in (0, 1):
        got, ref = np.load(d / f"final.{p}.npz"), np.load(ref_dir / f"final.{p}.npz")
        assert not bool(got["cached"])
        for a, b in zip(_variables(got), _variables(ref)):
            assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("layout", ["model", "data"])
def test_every_process_writes_its_own_file_and_process_0_commits(references, layout):
    ckpt = references[layout] / "ckpt"
    names = sorted(os.listdir(ckpt))
    assert "ckpt-20.data-00000-of-00002" in names and "ckpt-20.data-00001-of-00002" in names
    index = CheckpointManager(ckpt).checkpoints  # a plain reader sees the committed checkpoints
    assert [os.path.basename(p) for p in index] == ["ckpt-16", "ckpt-20"]
    if layout == "model":  # the kernel's model axis spans both processes: one chunk in each file
        kernel = json.loads((ckpt / "ckpt-20.index").read_text())["tensors"][
            "model/sequential/dense_in/kernel"
        ]
        assert sorted(c["file"] for c in kernel["chunks"]) == [0, 1]


def test_frozen_pieces_are_written_once_and_every_later_checkpoint_points_at_them(references):
    """Incremental saves across processes: each process compares its own pieces with the latest
    checkpoint's; process 0's index points the frozen layer's pieces (one in each process's file) into
    the first checkpoint's data files, whose bytes retention keeps after dropping its index."""
    ckpt = references["frozen"] / "ckpt"
    index = json.loads((ckpt / "ckpt-20.index").read_text())
    names = [f["name"] for f in index["files"]]
    frozen = index["tensors"]["model/sequential/dense_in/kernel"]["chunks"]
    assert sorted(names[c["file"]] for c in frozen) == [f"ckpt-4.data-0000{p}-of-00002" for p in (0, 1)]
    trained = index["tensors"]["model/sequential/dense_out/kernel"]["chunks"]
    assert sorted(names[c["file"]] for c in trained) == [f"ckpt-20.data-0000{p}-of-00002" for p in (0, 1)]
    assert not (ckpt / "ckpt-4.index").exists() and (ckpt / "ckpt-4.data-00001-of-00002").exists()
    with open(ckpt / "checkpoint", "rb") as f:
        refs = {r.name: r.refs for r in parse_state(f.read())[1]}
    # (and any small leaf of process 0 unchanged since ckpt-16, e.g. the optimizer's learning rate)
    assert refs["ckpt-20"] == tuple(sorted(n for n in names if not n.startswith("ckpt-20.")))
    done = subprocess.run([sys.executable, "-m", "ckpt_callbacks", "verify", str(ckpt)], capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr
    run_python(
        RESTORE_ELSEWHERE,
        ckpt / "ckpt-20",
        ckpt.parent / "final.0.npz",
        "load_model",
        backend="jax",
        env=_env(1),
    )


@pytest.mark.parametrize(
    ("layout", "async_save"), [("model", "0"), ("data", "0"), ("model", "1"), ("frozen", "0")]
)
def test_kill_both_processes_mid_fit_then_rerun_resumes_bit_exactly(references, tmp_path, layout, async_save):
    killed = _run(tmp_path, layout, 10, ASYNC_SAVE=async_save)
    assert [r.returncode for r in killed] == [-signal.SIGKILL] * 2, killed[0].stderr[-2000:]
    _check(_run(tmp_path, layout, 10, ASYNC_SAVE=async_save))
    for p in (0, 1):  # async: the kill may land before the background write of ckpt-8 commits
        assert str(np.load(tmp_path / f"final.{p}.npz")["resumed"]).endswith(("ckpt-8", "ckpt-4"))
    _same_as_reference(tmp_path, references[layout])


def test_a_process_whose_write_fails_fails_the_save_on_every_process(tmp_path):
    args = (tmp_path / "ckpt", tmp_path / "final.npz", "model")
    failed = _run_job(*args, CRASH_AT="1:2:after_data:raise")
    for r in failed:
        assert r.returncode != 0
        assert "CheckpointWriteError" in r.stderr and "process 1: OSError: injected write failure" in r.stderr
    mgr = CheckpointManager(tmp_path / "ckpt", _allow_concurrent_writers=True)
    assert os.path.basename(mgr.latest_checkpoint) == "ckpt-4"
    mgr.close()
    assert not [n for n in os.listdir(tmp_path / "ckpt") if n.startswith("ckpt-8")]  # both data files removed


def test_process_killed_during_a_save_commits_nothing_and_the_rerun_resumes(references, tmp_path):
    args = (tmp_path / "ckpt", tmp_path / "final.npz", "model")
    crashed = _run_job(*args, CRASH_AT="1:2:after_data")  # process 1, its data file of ckpt-8 written
    assert crashed[1].returncode == -signal.SIGKILL
    assert crashed[0].returncode != 0  # process 0 is told (the coordination service ends it)
    mgr = CheckpointManager(tmp_path / "ckpt", _allow_concurrent_writers=True)
    assert os.path.basename(mgr.latest_checkpoint) == "ckpt-4"
    assert not (tmp_path / "ckpt" / "ckpt-8.index").exists()
    mgr.close()
    _check(_run_job(*args))
    assert str(np.load(tmp_path / "final.0.npz")["resumed"]).endswith("ckpt-4")
    _same_as_reference(tmp_path, references["model"])


@pytest.mark.parametrize(("devices", "layout"), [(1, "none"), (2, "data"), (1, "load_model")])
def test_two_process_checkpoint_restores_in_one_process(references, devices, layout):
    d = references["model"]
    run_python(
        RESTORE_ELSEWHERE, d / "ckpt" / "ckpt-20", d / "final.0.npz", layout, backend="jax", env=_env(devices)
    )


def test_a_callback_on_one_process_only_is_named_before_training(tmp_path):
    """Issue 23 point 5: the callback on process 0 alone. Saves and resumes are collective, so the
    process that runs it refuses to start training, saying that every process must run it."""
    done = _run_job(tmp_path / "ckpt", tmp_path / "final.npz", "model", CALLBACK_ONLY_ON="0", timeout=180)
    assert done[0].returncode != 0
    assert "ValueError" in done[0].stderr and "on every process" in done[0].stderr, done[0].stderr[-2000:]
    assert not (tmp_path / "ckpt" / "checkpoint").exists()
