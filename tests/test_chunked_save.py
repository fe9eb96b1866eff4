"""A ChunkedArray leaf (what the Keras JAX adapter gives for an array sharded over devices) is saved
piece by piece as one chunked index entry, and loads back whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ckpt_callbacks import load_checkpoint, save_checkpoint
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
