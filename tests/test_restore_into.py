"""Restoring in place: load_checkpoint(path, into=...) and CheckpointManager.restore(into=...)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from ckpt_callbacks import (
    CheckpointManager,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from ckpt_callbacks._api._resolve import read_index


def _state():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "b": np.arange(7, dtype=np.int64),
        "h": rng.standard_normal(100).astype(ml_dtypes.bfloat16),
        "t": torch.randn(16, 8),
        "tb": torch.randn(5, 3).to(torch.bfloat16),
        "step": 12,
        "nested": [np.ones(3, np.float16), {"z": torch.arange(6, dtype=torch.int32)}],
    }


def _zeros_like(state):
    return {
        "w": np.zeros_like(state["w"]),
        "b": np.zeros_like(state["b"]),
        "h": np.zeros_like(state["h"]),
        "t": torch.zeros_like(state["t"]),
        "tb": torch.zeros_like(state["tb"]),
        "nested": [np.zeros(3, np.float16), {"z": torch.zeros(6, dtype=torch.int32)}],
    }


def _bits_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        a = a.contiguous().view(torch.uint8).numpy() if a.dtype == torch.bfloat16 else a.numpy()
        b = b.contiguous().view(torch.uint8).numpy() if b.dtype == torch.bfloat16 else b.numpy()
    return np.asarray(a).tobytes() == np.asarray(b).tobytes() and a.shape == b.shape


def test_into_fills_the_same_objects_bit_identical(tmp_path):
    state = _state()
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, state)
    into = _zeros_like(state)
    ptrs = {k: v.data_ptr() for k, v in into.items() if isinstance(v, torch.Tensor)}
    out = load_checkpoint(path, into=into)
    for key in ("w", "b", "h", "t", "tb"):
        assert out[key] is into[key]
        assert _bits_equal(out[key], state[key])
    assert out["nested"][0] is into["nested"][0]
    assert out["nested"][1]["z"] is into["nested"][1]["z"]
    assert _bits_equal(into["nested"][1]["z"], state["nested"][1]["z"])
    assert {k: v.data_ptr() for k, v in into.items() if isinstance(v, torch.Tensor)} == ptrs
    assert out["step"] == 12  # keys not in `into` load as usual


def test_keys_not_in_into_load_as_usual(tmp_path):
    state = _state()
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, state)
    w = np.zeros_like(state["w"])
    out = load_checkpoint(path, into={"w": w})
    assert out["w"] is w and np.array_equal(w, state["w"])
    assert isinstance(out["t"], torch.Tensor) and torch.equal(out["t"], state["t"])
    assert out["h"].dtype == ml_dtypes.bfloat16 and out["h"].tobytes() == state["h"].tobytes()


def test_live_torch_module_restored_in_place(tmp_path):
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    src[1].running_mean.add_(1.5)
    path = str(tmp_path / "ckpt-3")
    save_checkpoint(path, {"state_dict": src.state_dict(), "epoch": 3})
    dst = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    weight = dst[0].weight
    out = load_checkpoint(path, into={"state_dict": dst.state_dict()})
    assert dst[0].weight is weight and weight.requires_grad
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert out["epoch"] == 3


def test_non_contiguous_views_and_big_endian_go_through_staging(tmp_path):
    state = {
        "a": np.arange(24, dtype=np.float32).reshape(4, 6),
        "t": torch.arange(12, dtype=torch.float64).reshape(3, 4),
        "be": np.arange(5, dtype=">i4"),
    }
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, state)
    big = np.zeros((6, 4), np.float32)
    a_view = big.T  # (4, 6), not C-contiguous, a view of `big`
    t_base = torch.zeros(4, 3, dtype=torch.float64)
    t_view = t_base.t()  # (3, 4) non-contiguous
    be = np.zeros(5, dtype=">i4")
    out = load_checkpoint(path, into={"a": a_view, "t": t_view, "be": be})
    assert out["a"] is a_view and np.array_equal(big.T, state["a"])
    assert out["t"] is t_view and torch.equal(t_base.t(), state["t"])
    assert out["be"] is be and np.array_equal(be, state["be"]) and be.dtype == np.dtype(">i4")


def test_mismatch_raises_before_anything_is_written(tmp_path):
    state = {"a": np.ones((4, 4), np.float32), "b": np.full(3, 2.0), "c": torch.ones(2)}
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, state)
    a = np.zeros((4, 4), np.float32)
    for bad in (
        {"a": a, "b": np.zeros(4)},  # shape
        {"a": a, "b": np.zeros(3, np.float32)},  # dtype
        {"a": a, "c": torch.zeros(2, dtype=torch.bfloat16)},  # torch dtype
        {"a": a, "missing": np.zeros(2)},  # no saved tensor there
    ):
        with pytest.raises(IncompatibleCheckpointError, match="Nothing was written"):
            load_checkpoint(path, into=bad)
        assert not a.any()
    ro = np.zeros((4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        load_checkpoint(path, into={"a": ro})


def _corrupt_tensor(path: str, tname: str) -> None:
    index = read_index(path)
    t = index["tensors"][tname]
    data_file = str(path) + ".data-00000-of-00001"
    with open(data_file, "r+b") as f:
        f.seek(t["offset"] + t["length"] // 2)
        byte = f.read(1)
        f.seek(t["offset"] + t["length"] // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_checksum_failure_is_raised_and_says_into_was_partly_written(tmp_path):
    state = {"a": np.ones(1000, np.float32), "b": np.full(1000, 2.0, np.float32), "c": np.full(10, 3.0)}
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, state)
    _corrupt_tensor(path, "b")
    into = {"a": np.zeros(1000, np.float32), "b": np.zeros(1000, np.float32), "c": np.zeros(10)}
    with pytest.raises(CorruptCheckpointError, match="restore them again from another checkpoint"):
        load_checkpoint(path, into=into)
    # Documented state: tensors read before the corrupt one hold the checkpoint's values, the corrupt
    # one its corrupt bytes, the rest are unchanged.
    assert np.array_equal(into["a"], state["a"])
    assert not np.array_equal(into["b"], state["b"]) and into["b"].any()
    assert not into["c"].any()


def test_manager_restore_into_falls_back_past_a_corrupt_checkpoint(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=3) as mgr:
        mgr.save({"w": np.full(100, 1.0), "t": torch.full((4,), 1.0)}, step=1)
        mgr.save({"w": np.full(100, 2.0), "t": torch.full((4,), 2.0)}, step=2)
    _corrupt_tensor(str(tmp_path / "ckpt-2"), "w")
    into = {"w": np.zeros(100), "t": torch.zeros(4)}
    with CheckpointManager(tmp_path, max_to_keep=3) as mgr:
        with pytest.warns(UserWarning, match="unusable"):
            out = mgr.restore(into=into)
        assert out["w"] is into["w"] and np.all(into["w"] == 1.0) and torch.all(into["t"] == 1.0)
        out = mgr.restore(str(tmp_path / "ckpt-1"), into=into)
        assert out["t"] is into["t"]
        with pytest.raises(CorruptCheckpointError):
            mgr.restore(str(tmp_path / "ckpt-2"), into=into)


def test_big_tensor_read_in_chunks_with_hashing_behind(tmp_path, monkeypatch):
    from ckpt_callbacks._checkpoint import _checkpoint_read

    monkeypatch.setattr(_checkpoint_read, "READ_CHUNK", 1 << 16)
    monkeypatch.setattr(_checkpoint_read, "HASH_BEHIND_BYTES", 1 << 10)
    state = {"big": np.random.default_rng(1).standard_normal(300_000).astype(np.float32), "s": np.ones(3)}
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, state)
    into = {"big": np.zeros(300_000, np.float32)}
    out = load_checkpoint(path, into=into)
    assert out["big"] is into["big"] and np.array_equal(into["big"], state["big"])
    assert np.array_equal(load_checkpoint(path)["big"], state["big"])
    _corrupt_tensor(path, "big")
    with pytest.raises(CorruptCheckpointError, match="Checksum mismatch"):
        load_checkpoint(path, into={"big": np.zeros(300_000, np.float32)})


def test_async_manager_prepares_snapshot_buffers_on_resume(tmp_path):
    state = {"w": np.arange(50_000, dtype=np.float32), "t": torch.arange(10, dtype=torch.bfloat16), "e": 1}
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save(state, step=1)
    with CheckpointManager(tmp_path, async_save=True) as mgr:
        path, restored = mgr.restore_with_path()
        assert path.endswith("ckpt-1")
        mgr._buffers.wait()
        prepared = dict(mgr._buffers)
        assert prepared["w"].shape == (50_000,) and prepared["t"].shape == (10,)
        restored["w"] += 1
        mgr.save(restored, step=2)
        assert mgr._buffers["w"] is prepared["w"]  # the first save copied into the prepared buffer
        mgr.wait_until_finished()
        out = mgr.restore()
    assert np.array_equal(out["w"], state["w"] + 1)
    assert torch.equal(out["t"], state["t"]) and out["e"] == 1


def test_into_tensor_without_a_saved_one_names_the_key_and_the_fix(tmp_path):
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, {"model": {"w": np.ones(3, np.float32)}, "epoch": 1})
    w = np.zeros(3, np.float32)
    with pytest.raises(IncompatibleCheckpointError) as e:
        load_checkpoint(path, into={"model": {"w": w, "extra": np.zeros(2)}})
    msg = str(e.value)
    assert "into['model']['extra']" in msg and "'model/w'" in msg  # what is missing, what is saved
    assert "Leave those keys out of `into`" in msg and "Nothing was written" in msg
    assert not w.any()


def test_prepare_snapshot_at_train_start_maps_the_buffers_the_first_save_uses(tmp_path):
    state = {"w": np.arange(50_000, dtype=np.float32), "t": torch.arange(10, dtype=torch.bfloat16), "e": 1}
    with CheckpointManager(tmp_path / "sync") as sync:
        assert sync._prepare_snapshot(state) is False
    with CheckpointManager(tmp_path / "a", async_save=True) as mgr:
        assert mgr._prepare_snapshot(state) is True
        mgr._buffers.wait()
        prepared = dict(mgr._buffers)
        assert prepared["w"].shape == (50_000,) and prepared["t"].shape == (10,)
        mgr.save(state, step=1)
        assert mgr._buffers["w"] is prepared["w"] and mgr._buffers["t"] is prepared["t"]
        assert mgr._prepare_snapshot({"w": np.zeros(3)}) is True  # a save right after: stops it
        mgr.save(state, step=2)
        mgr.wait_until_finished()
        out = mgr.restore()
    assert np.array_equal(out["w"], state["w"]) and torch.equal(out["t"], state["t"]) and out["e"] == 1


def test_chunked_tensor_of_a_sharded_save_is_assembled_into_the_destination(tmp_path):
    from ckpt_callbacks._format import _format as fmt

    full = np.arange(32, dtype=np.float32).reshape(8, 4)
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, {"top": full[:4], "bottom": full[4:]})
    # Rewrite the index as a sharded save writes it: one tensor "w" in two chunks.
    index = read_index(path)
    chunks = []
    for part, row in (("top", 0), ("bottom", 4)):
        t = index["tensors"][part]
        chunks.append({k: t[k] for k in ("file", "offset", "length", "checksum")})
        chunks[-1].update({"offsets": [row, 0], "sizes": [4, 4]})
    index["tensors"] = {"w": {"dtype": "float32", "shape": [8, 4], "chunks": chunks}}
    index["tree"] = {"d": [["w", {"x": "w"}]]}
    with open(path + ".index", "wb") as f:
        f.write(fmt.dump_index(index))
    for dest in (np.zeros((8, 4), np.float32), torch.zeros(8, 4)):
        out = load_checkpoint(path, into={"w": dest})
        assert out["w"] is dest and np.array_equal(np.asarray(dest), full)
