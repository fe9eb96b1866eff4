"""Chunked tensor entries (a sharded save's): the coverage rules every reader applies (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from ckpt_callbacks import CorruptCheckpointError
from ckpt_callbacks._format import _chunks


def entry(shape, *boxes, itemsize=4):
    return {
        "dtype": "float32",
        "shape": list(shape),
        "chunks": [
            {
                "file": i % 2,
                "offset": 64,
                "length": int(np.prod(s)) * itemsize,
                "offsets": list(o),
                "sizes": list(s),
                "checksum": "xxh3_64:0",
            }
            for i, (o, s) in enumerate(boxes)
        ],
    }


@pytest.mark.parametrize(
    "t",
    [
        entry((8, 4), ((0, 0), (4, 4)), ((4, 0), (4, 4))),
        entry((4, 6), ((0, 0), (4, 3)), ((0, 3), (4, 3))),
        entry((4, 4), ((0, 0), (2, 2)), ((0, 2), (2, 2)), ((2, 0), (2, 4))),
        entry((0, 3)),
        entry((), ((), ())),
        entry((5,), ((0,), (5,)), ((5,), (0,))),  # an empty chunk of a rank with nothing of it
    ],
    ids=["rows", "columns", "blocks", "empty tensor", "scalar", "empty chunk"],
)
def test_chunks_that_tile_the_tensor_are_accepted(t):
    locs = _chunks.validate("w", t, 4)
    assert [loc["length"] for loc in locs] == [c["length"] for c in t["chunks"]]


@pytest.mark.parametrize(
    "t, match",
    [
        (entry((8, 4), ((0, 0), (4, 4))), "a chunk is missing"),
        (
            entry((8, 4), ((0, 0), (4, 4)), ((2, 0), (4, 4)), ((6, 0), (2, 4))),
            "chunk is missing or duplicated|overlap",
        ),
        (entry((8, 4), ((0, 0), (6, 4)), ((4, 0), (2, 4))), "overlap"),
        (entry((8, 4), ((0, 0), (4, 4)), ((6, 0), (4, 4))), "outside its shape"),
        (entry((8,), ((0, 0), (8, 1))), "Invalid chunk"),
        ({"dtype": "float32", "shape": [2], "chunks": "x"}, "Invalid chunk list"),
    ],
    ids=["missing", "duplicated", "overlapping", "outside", "wrong rank", "not a list"],
)
def test_chunks_that_do_not_tile_the_tensor_are_corrupt(t, match):
    with pytest.raises(CorruptCheckpointError, match=match):
        _chunks.validate("w", t, 4)


def test_a_chunk_whose_length_does_not_match_its_sizes_is_corrupt():
    t = entry((4,), ((0,), (4,)))
    t["chunks"][0]["length"] = 12
    with pytest.raises(CorruptCheckpointError, match="need 16"):
        _chunks.validate("w", t, 4)


def test_split_and_assemble_rebuild_the_full_tensor():
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    index = {"tensors": {"w": entry((4, 6), ((0, 0), (4, 3)), ((0, 3), (4, 3))), "b": {"file": 0}}}
    parts = _chunks.split(index)
    assert sorted(index["tensors"]) == ["b", "w [chunk at [0, 0]]", "w [chunk at [0, 3]]"]
    arrays = {"b": 1, "w [chunk at [0, 0]]": full[:, :3].copy(), "w [chunk at [0, 3]]": full[:, 3:].copy()}
    _chunks.assemble(index, parts, arrays)
    assert sorted(arrays) == ["b", "w"] and np.array_equal(arrays["w"], full)


def test_a_dtensor_given_to_a_plain_save_names_the_sharded_path(tmp_path):
    """One process cannot save a DTensor; the error says where sharded state goes instead."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from ckpt_callbacks import save_checkpoint

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        dt = distribute_tensor(torch.arange(8.0), init_device_mesh("cpu", (1,)), [Shard(0)])
        with pytest.raises(TypeError, match=r"state\['model'\]\['w'\].*DTensor.*ckpt_callbacks\.distributed"):
            save_checkpoint(str(tmp_path / "ckpt-1"), {"model": {"w": dt}})
        assert not list(tmp_path.iterdir())
    finally:
        dist.destroy_process_group()
