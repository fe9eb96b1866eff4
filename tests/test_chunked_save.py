"""A ChunkedArray leaf (what the Keras JAX adapter gives for an array sharded over devices) is saved
piece by piece as one chunked index entry, and loads back whole."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ckpt_callbacks import CheckpointManager, load_checkpoint, save_checkpoint
from ckpt_callbacks._format._chunks import ChunkedArray
from ckpt_callbacks._format._format import LazyArray


def _piece(arr):
    return LazyArray(arr.shape, arr.dtype, lambda: arr)


def test_pieces_are_written_as_chunks_and_load_back_whole(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    split = ChunkedArray((6, 4), np.float32, [((0, 0), _piece(a[:3])), ((3, 0), _piece(a[3:]))])
    whole = ChunkedArray((6, 4), np.float32, [((0, 0), _piece(a))])
    save_checkpoint(tmp_path / "ckpt-1", {"split": split, "whole": whole})
    tensors = json.loads((tmp_path / "ckpt-1.index").read_text())["tensors"]
    assert [c["offsets"] for c in tensors["split"]["chunks"]] == [[0, 0], [3, 0]]
    assert all(c["sizes"] == [3, 4] and c["file"] == 0 for c in tensors["split"]["chunks"])
    assert "chunks" not in tensors["whole"] and tensors["whole"]["shape"] == [6, 4]  # a plain entry
    assert set(tensors) == {"split", "whole"}  # the pieces are no tensors of their own
    state = load_checkpoint(tmp_path / "ckpt-1")
    assert np.array_equal(state["split"], a) and np.array_equal(state["whole"], a)


def test_a_piece_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        ChunkedArray((6, 4), np.float32, [((0, 0), _piece(np.zeros((3, 4), np.float64)))])


def _split_state(frozen, head):
    return {
        "frozen": ChunkedArray(
            frozen.shape, frozen.dtype, [((0, 0), _piece(frozen[:4])), ((4, 0), _piece(frozen[4:]))]
        ),
        "head": ChunkedArray(head.shape, head.dtype, [((0,), _piece(head[:2])), ((2,), _piece(head[2:]))]),
    }


def test_an_unchanged_piece_points_into_the_earlier_data_file(tmp_path):
    """Incremental saves of sharded arrays: each piece is compared on its own; one whose bytes did
    not change points into the data file that holds it, inside the chunked entry."""
    frozen = np.arange(8 * 1024, dtype=np.float32).reshape(8, 1024)
    head = np.arange(4, dtype=np.float32)
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save(_split_state(frozen, head), step=1)
        head2 = head.copy()
        head2[3] = -1  # the second piece of the head changes, the first does not
        mgr.save(_split_state(frozen, head2), step=2)
    index = json.loads((tmp_path / "ckpt-2.index").read_text())
    names = [f["name"] for f in index["files"]]
    assert [names[c["file"]] for c in index["tensors"]["frozen"]["chunks"]] == [
        "ckpt-1.data-00000-of-00001"
    ] * 2
    assert [names[c["file"]] for c in index["tensors"]["head"]["chunks"]] == [
        "ckpt-1.data-00000-of-00001",
        "ckpt-2.data-00000-of-00001",
    ]
    assert os.path.getsize(tmp_path / "ckpt-2.data-00000-of-00001") < 1024  # the changed piece only
    state = load_checkpoint(tmp_path / "ckpt-2")
    assert np.array_equal(state["frozen"], frozen) and np.array_equal(state["head"], head2)


def test_a_whole_piece_points_into_an_earlier_plain_entry(tmp_path):
    """A tensor saved plain and then as one whole piece (its sharding changed) is the same bytes."""
    frozen = np.arange(4096, dtype=np.float32).reshape(64, 64)
    with CheckpointManager(str(tmp_path), max_to_keep=None) as mgr:
        mgr.save({"w": frozen, "step": 1}, step=1)
        mgr.save(
            {"w": ChunkedArray(frozen.shape, frozen.dtype, [((0, 0), _piece(frozen))]), "step": 2}, step=2
        )
    index = json.loads((tmp_path / "ckpt-2.index").read_text())
    assert index["files"][index["tensors"]["w"]["file"]]["name"] == "ckpt-1.data-00000-of-00001"
    assert np.array_equal(load_checkpoint(tmp_path / "ckpt-2")["w"], frozen)
