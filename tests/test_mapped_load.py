"""Loading without ``into`` from local disk: tensors are copy-on-write views of the data file's
mapping (no fresh memory), verified by reading the file, and independent of it once returned."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ckpt_callbacks import CheckpointManager, CorruptCheckpointError, load_checkpoint, save_checkpoint
from ckpt_callbacks._api._resolve import read_index

pytestmark = pytest.mark.skipif(os.name != "posix", reason="mapped loads are POSIX-only")


def _mapping_of(arr) -> str | None:
    """The file whose mapping holds ``arr``'s first byte (from /proc/self/maps), or None."""
    addr = arr.data_ptr() if isinstance(arr, torch.Tensor) else arr.ctypes.data
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if start <= addr < end:
                return os.path.basename(parts[5].strip()) if len(parts) == 6 and parts[5].strip() else None
    return None


def _state():
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal((256, 128)).astype(np.float32),
        "t": torch.randn(64, 32),
        "odd": np.arange(5, dtype=np.int8),  # 5 bytes: the tensor after it is not 8-byte aligned
        "after": np.arange(3, dtype=np.float64) + 0.5,
        "step": 7,
    }


def test_tensors_are_writable_copy_on_write_views_of_the_file(tmp_path):
    state = _state()
    save_checkpoint(tmp_path / "ckpt-1", state)
    offsets = {k: t["offset"] for k, t in read_index(str(tmp_path / "ckpt-1"))["tensors"].items()}
    got = load_checkpoint(tmp_path / "ckpt-1")
    for key in ("w", "t", "odd", "after"):
        want = state[key].numpy() if isinstance(state[key], torch.Tensor) else state[key]
        have = got[key].numpy() if isinstance(got[key], torch.Tensor) else got[key]
        np.testing.assert_array_equal(have, want)
        assert have.flags.writeable
        aligned = offsets[key] % 8 == 0
        assert (_mapping_of(got[key]) == "ckpt-1.data-00000-of-00001") == aligned, (key, offsets[key])
    assert _mapping_of(got["w"]) == _mapping_of(got["t"]) == "ckpt-1.data-00000-of-00001"
    # Writing to a loaded tensor changes that copy only, never the checkpoint.
    got["w"][:] = -1
    got["t"].mul_(0)
    again = load_checkpoint(tmp_path / "ckpt-1")
    np.testing.assert_array_equal(again["w"], state["w"])
    assert torch.equal(again["t"], state["t"])


def test_views_outlive_the_file_when_retention_deletes_it(tmp_path):
    state = _state()
    with CheckpointManager(tmp_path, max_to_keep=1) as mgr:
        mgr.save(state, step=1)
        got = mgr.restore()
        assert _mapping_of(got["w"]) == "ckpt-1.data-00000-of-00001"
        mgr.save({"w": np.zeros(2)}, step=2)  # retention deletes ckpt-1's files
        assert not any(n.startswith("ckpt-1.") for n in os.listdir(tmp_path))
    np.testing.assert_array_equal(got["w"], state["w"])
    assert torch.equal(got["t"], state["t"])


def test_a_corrupt_mapped_tensor_is_found_while_loading(tmp_path):
    save_checkpoint(tmp_path / "ckpt-1", _state())
    index = read_index(str(tmp_path / "ckpt-1"))
    entry = index["tensors"]["w"]
    data = tmp_path / index["files"][entry["file"]]["name"]
    with open(data, "r+b") as f:
        f.seek(entry["offset"] + entry["length"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptCheckpointError, match="'w'"):
        load_checkpoint(tmp_path / "ckpt-1")
    # Unverified, the mapped view shows the file's bytes as they are.
    got = load_checkpoint(tmp_path / "ckpt-1", verify=False)
    assert _mapping_of(got["w"]) == "ckpt-1.data-00000-of-00001"
    assert got["w"].view(np.uint8).reshape(-1)[entry["length"] // 2] == byte[0] ^ 0xFF
