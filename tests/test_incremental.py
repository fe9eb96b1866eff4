"""Incremental checkpoints (SPEC §3.1): unchanged tensors point into the data file that holds them;
retention, the leftover sweep, verify and export follow those references."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ckpt_callbacks import CheckpointManager, CorruptCheckpointError, load_checkpoint
from ckpt_callbacks._checkpoint._checkpoint_read import read_index
from ckpt_callbacks._format._format import dump_index
from ckpt_callbacks._manager._state import parse_state
from ckpt_callbacks._storage import Storage

FROZEN = np.arange(64 * 1024, dtype=np.float32).reshape(256, 256)  # 256 KiB, never trained


def _state(step: int, frozen: np.ndarray = FROZEN) -> dict:
    return {"frozen": frozen, "head": np.full(1000, step, np.float32), "step": step}


def _files(d) -> list[str]:
    return sorted(f for f in os.listdir(d) if not f.startswith("."))


def _index(d, name: str) -> dict:
    return read_index(Storage(str(d)), name)


def _records(d) -> dict:
    with open(os.path.join(d, "checkpoint"), "rb") as f:
        _, records = parse_state(f.read())
    return {r.name: r for r in records}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_callbacks", *args], capture_output=True, text=True)


def test_unchanged_tensor_points_into_the_earlier_data_file(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
    index = _index(tmp_path, "ckpt-2")
    files = [f["name"] for f in index["files"]]
    assert sorted(files) == ["ckpt-1.data-00000-of-00001", "ckpt-2.data-00000-of-00001", "ckpt-2.meta"]
    assert files[index["tensors"]["frozen"]["file"]] == "ckpt-1.data-00000-of-00001"
    assert files[index["tensors"]["head"]["file"]] == "ckpt-2.data-00000-of-00001"
    # the new data file holds only the changed tensor, and is still a valid safetensors file
    safetensors_numpy = pytest.importorskip("safetensors.numpy", reason="safetensors reads the data file")
    own = safetensors_numpy.load_file(str(tmp_path / "ckpt-2.data-00000-of-00001"))
    assert list(own) == ["head"]
    assert os.path.getsize(tmp_path / "ckpt-2.data-00000-of-00001") < FROZEN.nbytes / 10
    state = load_checkpoint(str(tmp_path / "ckpt-2"))
    np.testing.assert_array_equal(state["frozen"], FROZEN)
    assert state["head"][0] == 2 and state["step"] == 2
    assert _records(tmp_path)["ckpt-2"].refs == ("ckpt-1.data-00000-of-00001",)


def test_references_are_never_chained(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        for step in (1, 2, 3):
            mgr.save(_state(step), step=step)
    index = _index(tmp_path, "ckpt-3")
    assert index["files"][index["tensors"]["frozen"]["file"]]["name"] == "ckpt-1.data-00000-of-00001"


def test_a_change_the_probe_cannot_see_is_found_by_the_checksum(tmp_path):
    changed = FROZEN.copy()
    changed[128, 3] += 1  # the middle of the tensor, away from the probed start / middle / end pieces
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2, changed), step=2)
    np.testing.assert_array_equal(load_checkpoint(str(tmp_path / "ckpt-2"))["frozen"], changed)
    assert _records(tmp_path)["ckpt-2"].refs == ()


@pytest.mark.parametrize("change", ["dtype", "shape"])
def test_another_dtype_or_shape_is_written(tmp_path, change):
    other = FROZEN.astype(np.int32) if change == "dtype" else FROZEN.reshape(-1)
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2, other), step=2)
    loaded = load_checkpoint(str(tmp_path / "ckpt-2"))["frozen"]
    assert loaded.dtype == other.dtype and loaded.shape == other.shape
    assert _records(tmp_path)["ckpt-2"].refs == ()


def test_an_empty_tensor_is_written_not_pointed_into_an_earlier_file(tmp_path):
    # (e.g. a sharded save's empty chunk: a reference would keep an earlier data file for no bytes)
    with CheckpointManager(str(tmp_path), max_to_keep=1) as mgr:
        mgr.save({"empty": np.zeros((0, 8), np.float32), "head": np.full(4, 1.0)}, step=1)
        mgr.save({"empty": np.zeros((0, 8), np.float32), "head": np.full(4, 2.0)}, step=2)
    assert _records(tmp_path)["ckpt-2"].refs == ()
    assert _files(tmp_path) == ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index", "ckpt-2.meta"]
    assert load_checkpoint(str(tmp_path / "ckpt-2"))["empty"].shape == (0, 8)


def test_incremental_false_writes_every_tensor(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None, incremental=False) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
    assert all(f["name"].startswith("ckpt-2.") for f in _index(tmp_path, "ckpt-2")["files"])


@pytest.mark.parametrize("bad", [None, 1, "yes"])
def test_incremental_must_be_a_bool(tmp_path, bad):
    with pytest.raises(TypeError, match="incremental"):
        CheckpointManager(str(tmp_path), incremental=bad)


@pytest.mark.parametrize("async_save", [False, True])
def test_retention_keeps_referenced_bytes_until_the_last_referrer_goes(tmp_path, async_save):
    with CheckpointManager(str(tmp_path), max_to_keep=2, async_save=async_save) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(_state(step), step=step)
        mgr.wait_until_finished()
        # ckpt-1 is dropped but its data file stays: ckpt-3 and ckpt-4 point into it
        assert _files(tmp_path) == [
            "checkpoint",
            "ckpt-1.data-00000-of-00001",
            "ckpt-3.data-00000-of-00001",
            "ckpt-3.index",
            "ckpt-3.meta",
            "ckpt-4.data-00000-of-00001",
            "ckpt-4.index",
            "ckpt-4.meta",
        ]
        for step in (3, 4):
            np.testing.assert_array_equal(mgr.restore(str(tmp_path / f"ckpt-{step}"))["frozen"], FROZEN)
        # the frozen part changes (unfrozen): two saves later nothing points into ckpt-1's file
        for step in (5, 6):
            mgr.save(_state(step, FROZEN + 1), step=step)
    assert _files(tmp_path) == [
        "checkpoint",
        "ckpt-5.data-00000-of-00001",
        "ckpt-5.index",
        "ckpt-5.meta",
        "ckpt-6.data-00000-of-00001",
        "ckpt-6.index",
        "ckpt-6.meta",
    ]


def test_a_restarted_manager_references_the_latest_and_its_sweep_keeps_referenced_files(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=1) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
    with CheckpointManager(str(tmp_path), max_to_keep=1) as mgr:
        assert mgr.removed_leftovers == []
        assert mgr.restore()["head"][0] == 2
        mgr.save(_state(3), step=3)
    assert _records(tmp_path)["ckpt-3"].refs == ("ckpt-1.data-00000-of-00001",)
    assert "ckpt-1.data-00000-of-00001" in _files(tmp_path)
    np.testing.assert_array_equal(load_checkpoint(str(tmp_path))["frozen"], FROZEN)


def test_sweep_removes_an_unreferenced_data_file_of_a_dropped_checkpoint(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=1) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
        mgr.save(_state(3, FROZEN + 1), step=3)  # nothing points into ckpt-1's file any more
    # a crash between the state file and the deletes would have left it: put one back
    with CheckpointManager(str(tmp_path / "other"), max_to_keep=None, incremental=False) as mgr:
        mgr.save(_state(1), step=1)
    os.replace(tmp_path / "other" / "ckpt-1.data-00000-of-00001", tmp_path / "ckpt-1.data-00000-of-00001")
    with CheckpointManager(str(tmp_path), max_to_keep=1) as mgr:
        assert mgr.removed_leftovers == ["ckpt-1.data-00000-of-00001"]


def test_resaving_a_referenced_step_keeps_the_bytes_a_later_checkpoint_points_into(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
        mgr.save(_state(1, FROZEN * 2), step=1)  # a re-save of step 1, as after a restore
        np.testing.assert_array_equal(mgr.restore(str(tmp_path / "ckpt-2"))["frozen"], FROZEN)
        np.testing.assert_array_equal(mgr.restore(str(tmp_path / "ckpt-1"))["frozen"], FROZEN * 2)


def test_torch_version_counter_skips_hashing_a_trained_tensor(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch", reason="the torch kind's version counter")
    from ckpt_callbacks._checkpoint import _incremental

    frozen, head = torch.arange(8192, dtype=torch.float32), torch.zeros(5000)  # both over the probe's 12 KiB
    hashed = []
    real = _incremental.full_checksum
    monkeypatch.setattr(_incremental, "full_checksum", lambda a: hashed.append(a.nbytes) or real(a))
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save({"frozen": frozen, "head": head}, step=1)
        with torch.no_grad():
            head.add_(1)  # an optimizer step: in place, counted
        mgr.save({"frozen": frozen, "head": head}, step=2)
    assert hashed == [frozen.numel() * 4]  # only the frozen tensor was hashed before writing
    state = load_checkpoint(str(tmp_path / "ckpt-2"))
    assert torch.equal(state["frozen"], frozen) and torch.equal(state["head"], head)
    assert _records(tmp_path)["ckpt-2"].refs == ("ckpt-1.data-00000-of-00001",)


def _rewrite_index(d, name: str, change) -> None:
    index = _index(d, name)
    change(index)
    index.pop("index_checksum", None)
    (d / f"{name}.index").write_bytes(dump_index(index))


@pytest.mark.parametrize(
    "fname",
    ["../ckpt-1.data-00000-of-00001", "other-1.data-00000-of-00001", "ckpt-1.meta", "ckpt-1.index", "x"],
)
def test_an_index_may_point_only_into_data_files_of_its_prefix(tmp_path, fname):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)

    def point_elsewhere(index):
        index["files"][2]["name"] = fname

    _rewrite_index(tmp_path, "ckpt-2", point_elsewhere)
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(str(tmp_path / "ckpt-2"))


def test_verify_follows_references(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
    assert cli("verify", str(tmp_path / "ckpt-2")).returncode == 0
    data = tmp_path / "ckpt-1.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[_index(tmp_path, "ckpt-1")["tensors"]["frozen"]["offset"] + 7] ^= 0xFF
    data.write_bytes(bytes(raw))
    out = cli("verify", str(tmp_path / "ckpt-2"))
    assert out.returncode == 1
    assert "frozen" in out.stdout and "ckpt-1.data-00000-of-00001" in out.stdout


def test_ls_shows_bytes_written_and_referenced(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
    doc = json.loads(cli("ls", str(tmp_path), "--json").stdout)
    by_name = {c["checkpoint"]: c for c in doc["checkpoints"]}
    assert by_name["ckpt-1"]["referenced"] == 0
    assert by_name["ckpt-2"]["referenced"] == os.path.getsize(tmp_path / "ckpt-1.data-00000-of-00001")
    assert by_name["ckpt-2"]["written"] + by_name["ckpt-2"]["referenced"] == by_name["ckpt-2"]["size"]
    out = cli("ls", str(tmp_path))
    assert out.returncode == 0 and "1 incremental checkpoint(s)" in out.stdout


def test_export_to_ckpt_is_a_self_contained_copy(tmp_path):
    run = tmp_path / "run"
    with CheckpointManager(str(run), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2, meta={"note": "kept"})
    out = cli("export", str(run), "--to", "ckpt", str(tmp_path / "copy" / "ckpt-2"))
    assert out.returncode == 0, out.stderr
    copy = tmp_path / "copy"
    assert _files(copy) == ["ckpt-2.data-00000-of-00001", "ckpt-2.index", "ckpt-2.meta"]
    for f in _files(run):
        os.remove(run / f)
    state = load_checkpoint(str(copy / "ckpt-2"))
    np.testing.assert_array_equal(state["frozen"], FROZEN)
    assert state["head"][0] == 2 and state["step"] == 2
    with open(copy / "ckpt-2.meta") as f:
        assert json.load(f)["user"] == {"note": "kept"}
    assert cli("verify", str(copy / "ckpt-2")).returncode == 0


def test_a_hostile_refs_record_is_not_trusted_and_the_index_decides(tmp_path):
    with CheckpointManager(str(tmp_path / "run"), max_to_keep=1) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
    (tmp_path / "victim").write_bytes(b"not ours")
    state_file = tmp_path / "run" / "checkpoint"
    state_file.write_text(state_file.read_text().replace('"refs":["ckpt-1.', '"refs":["../victim","ckpt-1.'))
    assert parse_state(state_file.read_bytes())[1] is None  # the comment is dropped: TF's fields rule
    with CheckpointManager(str(tmp_path / "run"), max_to_keep=1) as mgr:
        assert mgr.removed_leftovers == []  # ckpt-2's index still says it points into ckpt-1's file
        mgr.save(_state(3, FROZEN + 1), step=3)
    assert (tmp_path / "victim").read_bytes() == b"not ours"
    assert _files(tmp_path / "run") == [
        "checkpoint",
        "ckpt-3.data-00000-of-00001",
        "ckpt-3.index",
        "ckpt-3.meta",
    ]


def _corrupt_tensor(d, name: str, tensor: str) -> None:
    """Flip one byte of ``tensor``'s bytes in the data file that holds them (the index stays valid)."""
    index = _index(d, name)
    t = index["tensors"][tensor]
    path = d / index["files"][t["file"]]["name"]
    data = bytearray(path.read_bytes())
    data[t["offset"] + 7] ^= 0xFF
    path.write_bytes(bytes(data))


def test_after_a_resume_past_a_corrupt_latest_the_next_save_points_into_the_checkpoint_read(tmp_path):
    """The resume skipped ckpt-2 (its frozen tensor's bytes are damaged) and read ckpt-1: the next
    save compares with ckpt-1, so it never points into the damaged bytes its index still lists."""
    with CheckpointManager(str(tmp_path), max_to_keep=None, incremental=False) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
    _corrupt_tensor(tmp_path, "ckpt-2", "frozen")
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        with pytest.warns(UserWarning, match="falling back"):
            path, state = mgr.restore_with_path()
        assert path.endswith("ckpt-1")
        mgr.save(_state(3, state["frozen"]), step=3)
    index = _index(tmp_path, "ckpt-3")
    assert index["files"][index["tensors"]["frozen"]["file"]]["name"] == "ckpt-1.data-00000-of-00001"
    np.testing.assert_array_equal(load_checkpoint(str(tmp_path / "ckpt-3"))["frozen"], FROZEN)


def test_after_a_resume_that_found_nothing_usable_the_next_save_writes_every_tensor(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
    _corrupt_tensor(tmp_path, "ckpt-1", "frozen")
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        with pytest.warns(UserWarning, match="falling back"):
            assert mgr.restore_with_path() == (None, None)
        mgr.save(_state(2), step=2)
    assert [f["name"] for f in _index(tmp_path, "ckpt-2")["files"]] == [
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.meta",
    ]
    np.testing.assert_array_equal(load_checkpoint(str(tmp_path / "ckpt-2"))["frozen"], FROZEN)


def test_a_second_manager_on_the_directory_never_leaves_the_first_pointing_into_deleted_bytes(tmp_path):
    """Manager B's retention deletes ckpt-1 whole (its own save changed everything); manager A, whose
    memory still describes ckpt-1, compares its next save with B's ckpt-2 instead."""
    a = CheckpointManager(str(tmp_path), max_to_keep=1)
    a.save(_state(1), step=1)
    with CheckpointManager(str(tmp_path), max_to_keep=1) as b:
        b.save(_state(2, FROZEN + 1), step=2)
    assert not (tmp_path / "ckpt-1.data-00000-of-00001").exists()
    a.save(_state(3), step=3)  # the original frozen tensor again: ckpt-1's bytes are gone
    a.close()
    index = _index(tmp_path, "ckpt-3")
    assert index["files"][index["tensors"]["frozen"]["file"]]["name"] == "ckpt-3.data-00000-of-00001"
    np.testing.assert_array_equal(load_checkpoint(str(tmp_path / "ckpt-3"))["frozen"], FROZEN)


def test_a_commit_whose_referenced_bytes_another_writer_deleted_meanwhile_commits_nothing(
    tmp_path, monkeypatch
):
    """Manager B commits (and its retention deletes ckpt-1) while A writes ckpt-3, which points into
    ckpt-1: A's commit finds the bytes gone and fails cleanly; B's ckpt-2 stays the latest."""
    from ckpt_callbacks import CheckpointWriteError
    from ckpt_callbacks._checkpoint import _checkpoint_io

    a = CheckpointManager(str(tmp_path), max_to_keep=1)
    a.save(_state(1), step=1)
    b = CheckpointManager(str(tmp_path), max_to_keep=1)
    started = []

    def other_writer_commits(where):
        if where == "after_index" and not started:
            started.append(1)
            b.save(_state(2, FROZEN + 1), step=2)

    monkeypatch.setattr(_checkpoint_io, "_crash_point", other_writer_commits)
    with pytest.raises(CheckpointWriteError, match="ckpt-1.data-00000-of-00001"):
        a.save(_state(3), step=3)
    monkeypatch.undo()
    b.close()
    a.close()
    assert not (tmp_path / "ckpt-3.index").exists()
    assert os.path.basename(CheckpointManager(str(tmp_path)).latest_checkpoint) == "ckpt-2"


def test_a_resaved_step_points_into_lower_steps_only(tmp_path):
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_state(1), step=1)
        mgr.save(_state(2), step=2)
        mgr.save(_state(20), step=2)  # the same step again (e.g. a final save): only the head is new
    index = _index(tmp_path, "ckpt-2")
    names = [f["name"] for f in index["files"]]
    assert names[index["tensors"]["frozen"]["file"]] == "ckpt-1.data-00000-of-00001"
    assert names[index["tensors"]["head"]["file"]].startswith("ckpt-2.data-")
    assert not (tmp_path / "ckpt-2.data-00000-of-00001").exists()  # the replaced copy's data file went
    state = load_checkpoint(str(tmp_path / "ckpt-2"))
    np.testing.assert_array_equal(state["frozen"], FROZEN)
    assert state["head"][0] == 20


def _data_bytes(d) -> int:
    return sum(os.path.getsize(d / f) for f in _files(d) if ".data-" in f)


def test_a_small_unchanged_tensor_never_keeps_an_old_checkpoints_weights_on_storage(tmp_path):
    """A constant of 1 KiB beside 256 KiB of trained weights: pointing into ckpt-1's data file would
    keep all of it (ckpt-1's weights) for 1 KiB. The constant is written again, into a data file of
    its own, which the later saves point into whole; retention leaves no more bytes than full saves."""
    const = np.arange(256, dtype=np.float32)
    rng = np.random.default_rng(0)
    with CheckpointManager(str(tmp_path), max_to_keep=1) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(
                {"weights": rng.standard_normal(64 * 1024).astype(np.float32), "const": const}, step=step
            )
    index = _index(tmp_path, "ckpt-4")
    names = [f["name"] for f in index["files"]]
    assert names[index["tensors"]["const"]["file"]] == "ckpt-2.data-00001-of-00002"  # ckpt-2's own, whole
    assert _files(tmp_path) == [
        "checkpoint",
        "ckpt-2.data-00001-of-00002",
        "ckpt-4.data-00000-of-00001",
        "ckpt-4.index",
        "ckpt-4.meta",
    ]
    assert _data_bytes(tmp_path) < 64 * 1024 * 4 + const.nbytes + 1024  # one checkpoint's bytes, headers
    np.testing.assert_array_equal(load_checkpoint(str(tmp_path / "ckpt-4"))["const"], const)


def test_frozen_bytes_in_a_mostly_trained_file_are_written_once_more_then_pointed_into(tmp_path):
    """A model 25 % frozen: ckpt-1's file is mostly trained bytes, so ckpt-2 writes the frozen tensor
    again into a file of its own; from ckpt-3 on every save points into that file."""
    frozen = np.arange(16 * 1024, dtype=np.float32)  # 64 KiB of 256 KiB
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save({"frozen": frozen, "head": np.full(48 * 1024, step, np.float32)}, step=step)
    for name in ("ckpt-3", "ckpt-4"):
        index = _index(tmp_path, name)
        assert index["files"][index["tensors"]["frozen"]["file"]]["name"] == "ckpt-2.data-00001-of-00002"
    assert os.path.getsize(tmp_path / "ckpt-4.data-00000-of-00001") < 48 * 1024 * 4 + 1024  # the head only
    np.testing.assert_array_equal(load_checkpoint(str(tmp_path / "ckpt-4"))["frozen"], frozen)
