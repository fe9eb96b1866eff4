"""Golden bytes of every file a save writes: ``.data``, ``.index``, ``.meta`` and ``checkpoint``.

The clock and the version strings the ``.meta`` records are fixed, so these bytes are what this
library writes, to the byte. A change here is a format change: it needs a format-version bump, not a
new golden file.
"""

from __future__ import annotations

import sys
import time

import ml_dtypes
import numpy as np
import pytest

import ckpt_callbacks
from ckpt_callbacks import CheckpointManager, load_checkpoint, save_checkpoint

GOLDEN = {
    "checkpoint": (
        b'model_checkpoint_path: "ckpt-3"\nall_model_checkpoint_paths: "ckpt-2"\nall_model_c'
        b'heckpoint_paths: "ckpt-3"\nall_model_checkpoint_timestamps: 1764090001.0\nall_mode'
        b"l_checkpoint_timestamps: 1764091801.5\nlast_preserved_timestamp: 1764086399.0\n# c"
        b'kpt_callbacks: {"v":1,"checkpoints":[{"name":"ckpt-2","step":2,"timestamp":17640'
        b'90001.0,"status":"active","metric":0.5,"shards":1},{"name":"ckpt-3","step":3,"ti'
        b'mestamp":1764091801.5,"status":"active","metric":0.3333333333333333,"shards":1}]'
        b',"best":"ckpt-3"}\n'
    ),
    "ckpt-2.data-00000-of-00001": (
        b'\xd8\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"format":"ckpt_callbacks"},"w":{"dtype":"F32","shape":['
        b'3],"data_offsets":[0,12]},"b":{"dtype":"I16","shape":[2],"data_offsets":[12,16]}'
        b',"h":{"dtype":"BF16","shape":[1],"data_offsets":[16,18]}}       \x00\x00\x00\x00\x00\x00\x00@\x00\x00\x80@\x01\x00\x02\x00'
        b"\xc0?"
    ),
    "ckpt-2.index": (
        b'{"format":"ckpt_callbacks","format_version":1,"step":2,"files":[{"name":"ckpt-2.'
        b'data-00000-of-00001","kind":"data","size":242,"header_size":224,"checksum":"xxh3'
        b'_64:a74f74fd6b7ac42c"},{"name":"ckpt-2.meta","kind":"meta","size":257,"checksum"'
        b':"xxh3_64:5161be9cf154bb4e"}],"tensors":{"w":{"dtype":"float32","shape":[3],"off'
        b'set":224,"length":12,"checksum":"xxh3_64:7dfcb758aa12a261","file":0},"b":{"dtype'
        b'":"int16","shape":[2],"offset":236,"length":4,"checksum":"xxh3_64:706d9387ba3bbe'
        b'b3","file":0},"h":{"dtype":"bfloat16","shape":[1],"offset":240,"length":2,"check'
        b'sum":"xxh3_64:12f7496a243a9638","file":0}},"tree":{"d":[["w",{"x":"w"}],["b",{"x'
        b'":"b"}],["h",{"x":"h"}],["step",2],["lr",{"f":0.5}],["cfg",{"t":["a",null,true,{'
        b'"b":"eA=="}]}]]},"index_checksum":"xxh3_64:53f4f3a5f55564f8"}\n'
    ),
    "ckpt-2.meta": (
        b'{"format":"ckpt_callbacks","format_version":1,"framework":null,"framework_versio'
        b'ns":{},"model":null,"epoch":null,"step":2,"time":1764090001.0,"metrics":{"loss":'
        b'0.5},"user":{"note":"g"},"library":{"ckpt_callbacks":"0.1.0","python":"3.12.0","'
        b'numpy":"2.0.0"}}\n'
    ),
    "ckpt-3.data-00000-of-00001": (
        b'\xd8\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"format":"ckpt_callbacks"},"w":{"dtype":"F32","shape":['
        b'3],"data_offsets":[0,12]},"b":{"dtype":"I16","shape":[2],"data_offsets":[12,16]}'
        b',"h":{"dtype":"BF16","shape":[1],"data_offsets":[16,18]}}       \x00\x00\x00\x00\x00\x00@@\x00\x00\xc0@\x01\x00\x02\x00'
        b"\xc0?"
    ),
    "ckpt-3.index": (
        b'{"format":"ckpt_callbacks","format_version":1,"step":3,"files":[{"name":"ckpt-3.'
        b'data-00000-of-00001","kind":"data","size":242,"header_size":224,"checksum":"xxh3'
        b'_64:a74f74fd6b7ac42c"},{"name":"ckpt-3.meta","kind":"meta","size":272,"checksum"'
        b':"xxh3_64:3ddc30190520644d"}],"tensors":{"w":{"dtype":"float32","shape":[3],"off'
        b'set":224,"length":12,"checksum":"xxh3_64:3e60efab27d00b27","file":0},"b":{"dtype'
        b'":"int16","shape":[2],"offset":236,"length":4,"checksum":"xxh3_64:706d9387ba3bbe'
        b'b3","file":0},"h":{"dtype":"bfloat16","shape":[1],"offset":240,"length":2,"check'
        b'sum":"xxh3_64:12f7496a243a9638","file":0}},"tree":{"d":[["w",{"x":"w"}],["b",{"x'
        b'":"b"}],["h",{"x":"h"}],["step",3],["lr",{"f":0.5}],["cfg",{"t":["a",null,true,{'
        b'"b":"eA=="}]}]]},"index_checksum":"xxh3_64:1d61c6674127b9a0"}\n'
    ),
    "ckpt-3.meta": (
        b'{"format":"ckpt_callbacks","format_version":1,"framework":null,"framework_versio'
        b'ns":{},"model":null,"epoch":null,"step":3,"time":1764091801.5,"metrics":{"loss":'
        b'0.3333333333333333},"user":{"note":"g"},"library":{"ckpt_callbacks":"0.1.0","pyt'
        b'hon":"3.12.0","numpy":"2.0.0"}}\n'
    ),
    "one-7.data-00000-of-00001": (
        b'h\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{"format":"ckpt_callbacks"},"a":{"dtype":"I16","shape":['
        b'2],"data_offsets":[0,4]}}       \x01\x00\x02\x00'
    ),
    "one-7.index": (
        b'{"format":"ckpt_callbacks","format_version":1,"step":7,"files":[{"name":"one-7.d'
        b'ata-00000-of-00001","kind":"data","size":116,"header_size":112,"checksum":"xxh3_'
        b'64:8f53787f1966b997"},{"name":"one-7.meta","kind":"meta","size":244,"checksum":"'
        b'xxh3_64:5c8a9703e1e85bc0"}],"tensors":{"a":{"dtype":"int16","shape":[2],"offset"'
        b':112,"length":4,"checksum":"xxh3_64:706d9387ba3bbeb3","file":0}},"tree":{"d":[["'
        b'a",{"x":"a"}]]},"index_checksum":"xxh3_64:a108769bce5d8447"}\n'
    ),
    "one-7.meta": (
        b'{"format":"ckpt_callbacks","format_version":1,"framework":null,"framework_versio'
        b'ns":{},"model":null,"epoch":3,"step":7,"time":1764100000.25,"metrics":{},"user":'
        b'{"epoch":3},"library":{"ckpt_callbacks":"0.1.0","python":"3.12.0","numpy":"2.0.0'
        b'"}}\n'
    ),
}


def _joined(parts: bytes | tuple[bytes, ...]) -> bytes:
    return parts if isinstance(parts, bytes) else b"".join(parts)


class _Clock:
    def __init__(self) -> None:
        self.t = 1_764_086_400.0

    def __call__(self) -> float:
        return self.t


def _state(step: int) -> dict:
    return {
        "w": np.arange(3, dtype=np.float32) * step,
        "b": np.array([1, 2], dtype=np.int16),
        "h": np.array([1.5], dtype=ml_dtypes.bfloat16),
        "step": step,
        "lr": 0.5,
        "cfg": ("a", None, True, b"x"),
    }


@pytest.fixture
def fixed_versions(monkeypatch):
    """The versions the ``.meta`` records, and the one-shot API's wall clock, pinned."""
    monkeypatch.setattr(sys, "version", "3.12.0 (golden)")
    monkeypatch.setattr(np, "__version__", "2.0.0")
    monkeypatch.setattr(ckpt_callbacks, "__version__", "0.1.0")
    monkeypatch.setattr(time, "time", lambda: 1_764_100_000.25)


def test_every_file_of_a_save_is_byte_identical_to_the_golden_copy(tmp_path, fixed_versions):
    clock = _Clock()
    with CheckpointManager(
        str(tmp_path),
        max_to_keep=2,
        keep_checkpoint_every_n_hours=1,
        keep_best=1,
        monitor="loss",
        clock=clock,
        incremental=False,  # the full format; test_incremental.py covers references
    ) as mgr:
        for step in (1, 2, 3):
            clock.t += 1800.5
            mgr.save(_state(step), step=step, metrics={"loss": 1.0 / step}, meta={"note": "g"})
    save_checkpoint(str(tmp_path / "one-7"), {"a": np.array([1, 2], dtype=np.int16)}, meta={"epoch": 3})
    written = {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir()) if not p.name.startswith(".")}
    assert sorted(written) == sorted(GOLDEN)
    for name, expected in GOLDEN.items():
        assert written[name] == _joined(expected), name


def test_the_golden_copy_loads(tmp_path):
    for name, parts in GOLDEN.items():
        (tmp_path / name).write_bytes(_joined(parts))
    state = load_checkpoint(str(tmp_path))
    assert state["step"] == 3 and state["cfg"] == ("a", None, True, b"x")
    np.testing.assert_array_equal(state["w"], np.arange(3, dtype=np.float32) * 3)
    assert state["h"].dtype == np.dtype(ml_dtypes.bfloat16) and float(state["h"][0]) == 1.5
    assert load_checkpoint(str(tmp_path / "one-7"))["a"].tolist() == [1, 2]
