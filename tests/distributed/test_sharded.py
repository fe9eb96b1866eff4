"""Sharded checkpoints through torch.distributed.checkpoint (SPEC §2.5): real ranks on gloo.

Each test starts real rank processes (``dist_worker.py``) on a loopback port; one spawn checks as
much as it can (a process group costs seconds to start on a small machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from cloud_helpers import free_port, moto_s3

torch = pytest.importorskip("torch", reason="torch is needed for sharded checkpoints")
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint._nested_dict import flatten_state_dict  # noqa: E402

import ckpt_callbacks  # noqa: E402
from ckpt_callbacks import CheckpointManager, CorruptCheckpointError, get_checkpoint_state, load_checkpoint  # noqa: E402
from ckpt_callbacks._api._resolve import read_index  # noqa: E402
from ckpt_callbacks._format import _format as fmt  # noqa: E402
from ckpt_callbacks._manager._state import parse_state  # noqa: E402
from ckpt_callbacks.distributed import StorageReader  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
ROOT = os.path.dirname(os.path.dirname(HERE))
# Longer than the workers' collective timeout (20 s) plus start-up: a hang fails the test instead.
RUN_TIMEOUT = 240


def run_ranks(scenario: str, world: int, directory: str, out: str, env: dict | None = None) -> list[dict]:
    os.makedirs(out, exist_ok=True)
    port = str(free_port())
    penv = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, scenario, str(r), str(world), port, directory, out],
            env=penv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    deadline = time.monotonic() + RUN_TIMEOUT
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: ranks still running after {RUN_TIMEOUT} s (a hang)") from None
    results = []
    for r in range(world):
        path = os.path.join(out, f"rank{r}.json")
        if not os.path.exists(path):
            results.append({"rank": r, "exit": procs[r].returncode, "log": logs[r][-3000:]})
            continue
        with open(path) as f:
            results.append(json.load(f) | {"exit": procs[r].returncode})
    return results


def flat_tensors(state: dict) -> dict:
    flat, _ = flatten_state_dict(state)
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Two FSDP2 ranks: saves at steps 1-3 (max_to_keep=2), a rank-1 failure at step 4, a restore."""
    base = tmp_path_factory.mktemp("sharded")
    directory, out = str(base / "ckpts"), str(base / "out")
    results = run_ranks("save_and_restore", 2, directory, out)
    return directory, out, results


def test_two_ranks_save_commit_retention_and_restore_bit_exact(sharded):
    directory, out, results = sharded
    for r in results:
        assert "error" not in r, r
        # Retention ran after each commit and both ranks' managers follow the state file.
        assert r["listed"] == [["ckpt-1"], ["ckpt-1", "ckpt-2"], ["ckpt-2", "ckpt-3"]]
        # A fresh sharded model restored model + optimizer + DTensor + plain values bit-exactly.
        assert r["restored"] == "ckpt-3" and r["mismatch"] == [] and r["compared"] == 17
        assert r["extra"] == {"step": 3, "note": "ok"}
    # Step 1 was dropped by retention: all of its files, both ranks' data files included.
    assert sorted(n for n in os.listdir(directory) if not n.startswith(".")) == [
        "checkpoint",
        *[
            f"ckpt-{s}.{x}"
            for s in (2, 3)
            for x in ("data-00000-of-00002", "data-00001-of-00002", "index", "meta")
        ],
    ]


def test_layout_chunks_cover_every_tensor_and_files_are_safetensors(sharded):
    from safetensors import safe_open

    directory, _, _ = sharded
    index = read_index(os.path.join(directory, "ckpt-3"))
    assert [f["name"] for f in index["files"]] == [
        "ckpt-3.data-00000-of-00002",
        "ckpt-3.data-00001-of-00002",
        "ckpt-3.meta",
    ]
    w = index["tensors"]["model.0.weight"]
    assert w["shape"] == [16, 8] and w["kind"] == "torch"
    assert [(c["file"], c["offsets"], c["sizes"]) for c in w["chunks"]] == [
        (0, [0, 0], [8, 8]),
        (1, [8, 0], [8, 8]),
    ]
    cols = index["tensors"]["cols"]  # a DTensor sharded on its second dimension
    assert [(c["offsets"], c["sizes"]) for c in cols["chunks"]] == [([0, 0], [4, 3]), ([0, 3], [4, 3])]
    # Replicated tensors are written once, by one rank, as plain entries.
    step = index["tensors"]["optim.state.0.weight.step"]
    assert "chunks" not in step and step["shape"] == []
    # Non-tensor leaves live in the index as JSON, never pickled.
    assert b"pickle" not in open(os.path.join(directory, "ckpt-3.index"), "rb").read()
    for rank in (0, 1):
        with safe_open(os.path.join(directory, f"ckpt-3.data-0000{rank}-of-00002"), "pt") as f:
            got = f.get_tensor(f"model.0.weight@{8 * rank},0")
        assert got.shape == (8, 8)
    state = get_checkpoint_state(directory)
    assert os.path.basename(state.model_checkpoint_path) == "ckpt-3"


def test_single_process_load_checkpoint_gives_full_tensors(sharded):
    directory, out, _ = sharded
    want = torch.load(os.path.join(out, "step3-rank0.pt"), weights_only=True)
    state = load_checkpoint(os.path.join(directory, "ckpt-3"))
    assert_same(flat_tensors(state), want)
    assert state["extra"] == {"step": 3, "note": "ok"}
    assert state["optim"]["param_groups"][0]["lr"] == 0.01
    assert ("model.0.weight", "float32", (16, 8)) in ckpt_callbacks.list_variables(directory)


def test_plain_incremental_saves_after_sharded_ones_share_a_directory(sharded, tmp_path):
    """Plain (incremental) saves continue a directory of sharded ones (here full checkpoints: every
    tensor changed at every step): the first plain one writes everything (a plain save names its
    tensors by tree path, ``model/0.weight``, never as DCP's keys and chunks, so nothing of a sharded
    index is pointed into), the next one points into it, and retention drops the sharded checkpoints
    whole."""
    directory = str(tmp_path / "mixed")
    shutil.copytree(sharded[0], directory)
    full = load_checkpoint(os.path.join(directory, "ckpt-3"))
    with CheckpointManager(directory, max_to_keep=2) as mgr:
        mgr.save(full, step=4)
        first = read_index(os.path.join(directory, "ckpt-4"))
        assert all(f["name"].startswith("ckpt-4.") for f in first["files"])
        mgr.save(full, step=5)
        mgr.save(full, step=6)
    latest = read_index(os.path.join(directory, "ckpt-6"))
    assert {f["name"] for f in latest["files"]} == {
        "ckpt-6.meta",
        "ckpt-6.data-00000-of-00001",
        "ckpt-4.data-00000-of-00001",
    }
    assert sorted(n for n in os.listdir(directory) if n.startswith("ckpt-") and ".data-" in n) == [
        "ckpt-4.data-00000-of-00001",
        "ckpt-5.data-00000-of-00001",
        "ckpt-6.data-00000-of-00001",
    ]
    assert_same(flat_tensors(load_checkpoint(os.path.join(directory, "ckpt-6"))), flat_tensors(full))


@pytest.fixture(scope="module")
def incremental(tmp_path_factory):
    """Two FSDP2 ranks, a frozen layer and a trained head: steps 1-3 (max_to_keep=2), sync and async."""
    base = tmp_path_factory.mktemp("incremental")
    directory, out = str(base / "ckpts"), str(base / "out")
    return directory, out, run_ranks("incremental", 2, directory, out)


@pytest.mark.parametrize("sub", ["sync", "async"])
def test_sharded_saves_point_unchanged_chunks_into_the_data_files_that_hold_them(incremental, sub):
    from safetensors import safe_open

    directory, out, results = incremental
    for r in results:
        assert "error" not in r, r
        assert r[f"listed_{sub == 'async'}"] == ["ckpt-2", "ckpt-3"]
        # the sharded restore (2 ranks) of a checkpoint pointing into another one's files
        assert r[f"restored_{sub == 'async'}"] == "ckpt-3" and r[f"mismatch_{sub == 'async'}"] == []
        assert r[f"compared_{sub == 'async'}"] == 10 and r[f"extra_{sub == 'async'}"] == {"step": 3}
    d = os.path.join(directory, sub)
    first = [f"ckpt-1.data-0000{rank}-of-00002" for rank in (0, 1)]
    for step in (2, 3):  # (sync: step 3 planned from step 2's index, by a new manager)
        index = read_index(os.path.join(d, f"ckpt-{step}"))
        own = [f"ckpt-{step}.data-0000{rank}-of-00002" for rank in (0, 1)]
        files = [f["name"] for f in index["files"]]
        assert files == [*own, *first, f"ckpt-{step}.meta"]
        tensors = index["tensors"]
        # each rank's frozen chunks point into the data file it wrote at step 1; trained ones are new
        for name in ("model.0.weight", "model.0.bias"):
            assert [files[c["file"]] for c in tensors[name]["chunks"]] == first
        for name in ("model.2.weight", "optim.state.2.weight.exp_avg"):
            assert [files[c["file"]] for c in tensors[name]["chunks"]] == own
        for rank in (0, 1):
            path = os.path.join(d, own[rank])
            assert os.path.getsize(path) < os.path.getsize(os.path.join(d, first[rank])) / 10
            with safe_open(path, "pt") as f:
                assert not [k for k in f.keys() if k.startswith("model.0.")]
    with open(os.path.join(d, "checkpoint"), "rb") as f:
        records = {r.name: r for r in parse_state(f.read())[1]}
    assert records["ckpt-2"].refs == records["ckpt-3"].refs == tuple(first)
    # Retention dropped step 1's .index and .meta and kept the data files the kept ones point into.
    assert sorted(n for n in os.listdir(d) if not n.startswith(".")) == [
        "checkpoint",
        *first,
        *[
            f"ckpt-{s}.{x}"
            for s in (2, 3)
            for x in ("data-00000-of-00002", "data-00001-of-00002", "index", "meta")
        ],
    ]
    want = torch.load(os.path.join(out, f"incremental-{sub}-rank0.pt"), weights_only=True)
    assert_same(flat_tensors(load_checkpoint(d)), want)
    cli = subprocess.run(
        [sys.executable, "-m", "ckpt_callbacks", "verify", d],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "ckpt-2" in cli.stdout and "ckpt-3" in cli.stdout


def test_sharded_saves_with_incremental_false_write_every_chunk(incremental):
    directory, _, results = incremental
    assert all("error" not in r for r in results), results
    index = read_index(os.path.join(directory, "full", "ckpt-2"))  # the same state as ckpt-1
    assert [f["name"] for f in index["files"]] == [
        "ckpt-2.data-00000-of-00002",
        "ckpt-2.data-00001-of-00002",
        "ckpt-2.meta",
    ]


def test_a_rank_1_error_raises_on_every_rank_and_commits_nothing(sharded):
    directory, _, results = sharded
    for r in results:
        assert r["step4"].startswith("CheckpointWriteError: Sharded save of")
        assert "rank 1: OSError" in r["step4"] and "rank 0" not in r["step4"]
        assert r["latest_after_failure"] == "ckpt-3"
    assert not [n for n in os.listdir(directory) if n.startswith("ckpt-4")]


def test_reshard_two_ranks_to_one_and_one_to_two(sharded, tmp_path):
    directory, out, _ = sharded
    want = torch.load(os.path.join(out, "step3-rank0.pt"), weights_only=True)
    one = run_ranks("load_into", 1, os.path.join(directory, "ckpt-3"), str(tmp_path / "one"))
    assert "error" not in one[0], one[0]
    assert_same(torch.load(str(tmp_path / "one" / "loaded-rank0.pt"), weights_only=True), want)
    assert one[0]["extra"] == {"step": 3, "note": "ok"}
    resaved = str(tmp_path / "one" / "resaved" / "ckpt-3")
    assert [f["name"] for f in read_index(resaved)["files"]][0] == "ckpt-3.data-00000-of-00001"
    two = run_ranks("load_into", 2, resaved, str(tmp_path / "two"))
    for r in two:
        assert "error" not in r, r
        assert_same(torch.load(str(tmp_path / "two" / f"loaded-rank{r['rank']}.pt"), weights_only=True), want)


def test_a_plain_checkpoint_manager_on_every_rank_saves_and_restores_sharded_state(tmp_path):
    """SPEC §2.5: CheckpointManager itself goes sharded when the state is (sync and async)."""
    directory, out = str(tmp_path / "ckpts"), str(tmp_path / "out")
    results = run_ranks("plain_manager", 2, directory, out)
    for r in results:
        assert "error" not in r, r
        for a in (False, True):
            assert r[f"listed_{a}"] == ["ckpt-2", "ckpt-3"]
            assert (
                r[f"resumed_{a}"] == "ckpt-3" and r[f"mismatch_{a}"] == [] and r[f"extra_{a}"] == {"step": 3}
            )
            assert r[f"explicit_{a}"] == [2, 3]
        assert r["own"] == "ckpt-1"
    for sub in ("sync", "async"):
        names = sorted(n for n in os.listdir(os.path.join(directory, sub)) if not n.startswith("."))
        # `cols` never changes, but it is the smaller part of each rank's file: pointing into step 1's
        # files would keep their dead bytes, so it is written again and retention drops step 1 whole.
        assert names == [
            "checkpoint",
            *[
                f"ckpt-{s}.{x}"
                for s in (2, 3)
                for x in ("data-00000-of-00002", "data-00001-of-00002", "index", "meta")
            ],
        ]
    # One process reads it back as full tensors.
    want = torch.load(os.path.join(out, "sync3-rank0.pt"), weights_only=True)
    assert_same(flat_tensors(load_checkpoint(os.path.join(directory, "sync"))), want)


def test_async_save_training_collectives_run_during_the_write_and_errors_reach_every_rank(tmp_path):
    directory = str(tmp_path / "ckpts")
    results = run_ranks("async_save", 2, directory, str(tmp_path / "out"))
    for r in results:
        assert "error" not in r, r
        # While step 2 was being written (held mid-write), the training thread's all_reduce and
        # barrier on the default group completed, and nothing of step 2 was committed yet.
        assert r["all_reduce"] == 3.0 and r["latest_while_writing"] == "ckpt-1"
        assert r["latest_after_wait"] == "ckpt-2"
        # Rank 1's failure in the background reached both ranks at wait_until_finished.
        assert r["step3"].startswith("CheckpointWriteError: Sharded save of")
        assert "rank 1: OSError" in r["step3"] and "rank 0" not in r["step3"]
        assert r["latest_after_failure"] == "ckpt-2"
        # The restored state is the one save() staged, not the model trained on during the write.
        assert r["restored"] == "ckpt-2" and r["mismatch"] == [] and r["compared"] == 17
        assert r["extra"] == {"step": 2}
        # Later failures: raised by the next save (step 5, not written) and by close (step 6).
        assert "ckpt-4' failed on rank 1: OSError" in r["step5"] and r["step5"].startswith(
            "CheckpointWriteError"
        )
        assert "ckpt-6' failed on rank 1: OSError" in r["close"] and r["close"].startswith(
            "CheckpointWriteError"
        )
    assert not [
        n for n in os.listdir(directory) if n.split(".")[0] in ("ckpt-3", "ckpt-4", "ckpt-5", "ckpt-6")
    ]
    assert get_checkpoint_state(directory).all_model_checkpoint_paths[-1].endswith("ckpt-2")


def test_raw_dcp_save_failure_leaves_other_ranks_files_until_a_retry_of_the_name_removes_them(tmp_path):
    directory = str(tmp_path / "ckpts")
    results = run_ranks("raw_failure", 2, directory, str(tmp_path / "out"))
    files = [f"ckpt-5.data-0000{r}-of-00002" for r in (0, 1)]
    for r in results:
        assert "error" not in r, r
        assert r["first"] == "CheckpointException"
        # The failed rank removed its own file; rank 0's finished one stays (DCP calls no writer
        # method after a failed write), and nothing is committed.
        assert r["after_failure"] == [files[0]]
    # The same checkpoint saved again (here by one rank): the coordinator removed the stale file
    # before writing, so only the new save's files are there.
    (r,) = run_ranks("raw_retry", 1, directory, str(tmp_path / "retry"))
    assert "error" not in r, r
    assert r["after_retry"] == ["checkpoint", "ckpt-5.data-00000-of-00001", "ckpt-5.index", "ckpt-5.meta"]


def _copy(directory: str, tmp_path) -> str:
    d = str(tmp_path / "copy")
    shutil.copytree(directory, d, ignore=shutil.ignore_patterns(".ckpt_callbacks.lock"))
    return d


@pytest.mark.parametrize("damage", ["missing file", "truncated file", "deleted chunk"])
def test_damage_is_corrupt_before_reading_and_restore_falls_back(sharded, tmp_path, damage):
    d = _copy(sharded[0], tmp_path)
    data1 = os.path.join(d, "ckpt-3.data-00001-of-00002")
    if damage == "missing file":
        os.remove(data1)
        match = "missing"
    elif damage == "truncated file":
        with open(data1, "r+b") as f:
            f.truncate(os.path.getsize(data1) - 4)
        match = "bytes; the index expects"
    else:
        path = os.path.join(d, "ckpt-3.index")
        index = read_index(path[: -len(".index")])
        index.pop("index_checksum", None)
        del index["tensors"]["model.0.weight"]["chunks"][1]
        with open(path, "wb") as f:
            f.write(fmt.dump_index(index))
        match = "a chunk is missing"
    with pytest.raises(CorruptCheckpointError, match=match):
        load_checkpoint(os.path.join(d, "ckpt-3"))
    # DCP's load checks the same before any tensor is read (raised inside CheckpointException).
    with pytest.raises(BaseException, match=match):
        dcp.load({"cols": torch.zeros(4, 6)}, storage_reader=StorageReader(os.path.join(d, "ckpt-3")))
    with CheckpointManager(d) as mgr, pytest.warns(UserWarning, match="falling back"):
        path, state = mgr.restore_with_path()
    assert os.path.basename(path) == "ckpt-2" and state["extra"]["step"] == 2


def test_rank_killed_mid_save_commits_nothing_and_does_not_hang(tmp_path):
    directory = str(tmp_path / "ckpts")
    results = run_ranks("killed", 2, directory, str(tmp_path / "out"))
    assert results[1]["exit"] == -9 and "step2" not in results[1]  # SIGKILLed after writing its file
    err = results[0]["error"]
    assert err.startswith("CheckpointWriteError: Sharded save of") and "Nothing was committed" in err
    assert os.path.basename(get_checkpoint_state(directory).model_checkpoint_path) == "ckpt-1"
    # What the killed save left is removed by the next manager; step 1 restores.
    with CheckpointManager(directory) as mgr:
        assert mgr.removed_leftovers == ["ckpt-2.data-00001-of-00002"]
        assert mgr.restore()["model"]["0.weight"].shape == (16, 8)
    assert not [n for n in os.listdir(directory) if n.startswith("ckpt-2")]


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3("sharded") as url:
        yield url


def test_two_ranks_on_s3_stream_their_own_files(s3_endpoint, tmp_path):
    import s3fs

    results = run_ranks("s3", 2, "s3://sharded/run", str(tmp_path / "out"), env={"S3_ENDPOINT": s3_endpoint})
    for r in results:
        assert "error" not in r, r
        assert r["mismatch"] == [] and r["extra"] == {"note": "s3"}
    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    fs = s3fs.S3FileSystem(**opts)
    names = sorted(os.path.basename(p) for p in fs.ls("sharded/run", refresh=True))
    # Step 2 saved the same state: every chunk points into step 1's data files (uploaded once), which
    # retention keeps when it drops step 1's .index and .meta; step 2's own data files hold nothing.
    first = ["ckpt-1.data-00000-of-00002", "ckpt-1.data-00001-of-00002"]
    assert [n for n in names if n.startswith("ckpt-")] == [
        *first,
        "ckpt-2.data-00000-of-00002",
        "ckpt-2.data-00001-of-00002",
        "ckpt-2.index",
        "ckpt-2.meta",
    ]
    index = read_index("s3://sharded/run/ckpt-2", storage_options=opts)
    files = index["files"]
    assert all(f["size"] == f["header_size"] for f in files[:2])  # a header, no tensor
    assert {files[c["file"]]["name"] for t in index["tensors"].values() for c in t.get("chunks", [t])} == set(
        first
    )
    want = torch.load(str(tmp_path / "out" / "s3-rank0.pt"), weights_only=True)
    assert_same(flat_tensors(load_checkpoint("s3://sharded/run", storage_options=opts)), want)


def test_a_flipped_byte_in_a_chunk_is_named_by_load_and_cli_verify(sharded, tmp_path):
    d = _copy(sharded[0], tmp_path)
    chunk = read_index(os.path.join(d, "ckpt-3"))["tensors"]["model.0.weight"]["chunks"][1]
    with open(os.path.join(d, "ckpt-3.data-00001-of-00002"), "r+b") as f:
        f.seek(chunk["offset"] + 5)
        b = f.read(1)
        f.seek(chunk["offset"] + 5)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(
        CorruptCheckpointError, match=r"Checksum mismatch for tensor 'model\.0\.weight \[chunk at \[8, 0\]\]'"
    ):
        load_checkpoint(os.path.join(d, "ckpt-3"))
    with pytest.raises(BaseException, match="Checksum mismatch for a chunk of tensor 'model.0.weight'"):
        dcp.load(
            {"model.0.weight": torch.zeros(16, 8)}, storage_reader=StorageReader(os.path.join(d, "ckpt-3"))
        )
    cli = subprocess.run(
        [sys.executable, "-m", "ckpt_callbacks", "verify", os.path.join(d, "ckpt-3")],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert cli.returncode == 1 and "model.0.weight [chunk at [8, 0]]" in cli.stdout
