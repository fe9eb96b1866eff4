"""Hostile checkpoints (README, "Guarantees"): rejected with CorruptCheckpointError, quickly, in bounded memory,
and never reading, writing or deleting outside the checkpoint directory.

The attacker controls every byte, so each hostile index is written *self-consistent*: its own
checksum recomputed with ``dump_index``, so only the structural checks can catch it. Memory is
measured with tracemalloc (numpy allocations included); "quickly" is the pytest timeout.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
import struct
import tracemalloc
import warnings

import numpy as np
import pytest

from ckpt_callbacks import (
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    get_checkpoint_state,
    latest_checkpoint,
    list_variables,
    load_checkpoint,
)
from ckpt_callbacks._api._resolve import read_meta, resolve_checkpoint
from ckpt_callbacks._format import _format as fmt

pytestmark = pytest.mark.timeout(120)

MEMORY_BOUND = 32 << 20  # bytes of peak traced allocation allowed while rejecting one input


def _state():
    return {"a": np.arange(16, dtype=np.float32), "b": np.ones((2, 3), dtype=np.int64), "s": "x", "n": 3}


@pytest.fixture
def ckpt(tmp_path):
    """A valid ckpt-1 in tmp/run, and victim files next to the directory that must survive."""
    d = tmp_path / "run"
    with CheckpointManager(str(d)) as mgr:
        mgr.save(_state(), step=1)
    # A complete checkpoint *outside* the directory, under the names a path escape would reach.
    for f in os.listdir(d):
        if f.startswith("ckpt-1."):
            shutil.copy(d / f, tmp_path / f.replace("ckpt-1", "victim"))
    (tmp_path / "sentinel.txt").write_bytes(b"outside")
    return d


def _outside(tmp_path) -> dict[str, bytes]:
    return {
        f: (tmp_path / f).read_bytes() for f in sorted(os.listdir(tmp_path)) if os.path.isfile(tmp_path / f)
    }


def _index(d) -> dict:
    data = (d / "ckpt-1.index").read_bytes()
    return json.loads(data[: data.rindex(b',"index_checksum"')] + b"}")


def _write_index(d, index: dict) -> None:
    depth = index.pop("_nested", None)
    if depth is None:
        (d / "ckpt-1.index").write_bytes(fmt.dump_index(index))
        return
    # Deeper than json.dumps can write: splice the tree in as text, checksum recomputed.
    index["tree"] = "@TREE@"
    body = fmt.dump_index(index)
    head = body[: body.rindex(b',"index_checksum"')]
    head = head.replace(b'"@TREE@"', b'{"l":[' * depth + b"null" + b"]}" * depth)
    (d / "ckpt-1.index").write_bytes(
        head + b',"index_checksum":"' + fmt.checksum_bytes(head).encode() + b'"}\n'
    )


def _rejected(fn, exc=CorruptCheckpointError):
    """fn() raises ``exc`` with a bounded peak of traced memory."""
    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(exc) as info:
                fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MEMORY_BOUND, f"peak {peak} bytes while rejecting: {info.value}"
    return info.value


def _all_readers_reject(d, exc=CorruptCheckpointError):
    path = str(d / "ckpt-1")
    _rejected(lambda: load_checkpoint(path), exc)
    _rejected(lambda: list_variables(path), exc)


# ---------------------------------------------------------------- the index


def _tensor(index):
    return next(iter(index["tensors"].values()))


def _data_file(index):
    return next(f for f in index["files"] if f["kind"] == "data")


HOSTILE_INDEX = {
    # header lengths
    "header_size 2**63": lambda ix: _data_file(ix).update(header_size=2**63),
    "header_size 2**64+8": lambda ix: _data_file(ix).update(header_size=2**64 + 8),
    "header_size over 100 MB": lambda ix: _data_file(ix).update(header_size=100 * 1024 * 1024 + 16),
    "header_size 0": lambda ix: _data_file(ix).update(header_size=0),
    "header_size negative": lambda ix: _data_file(ix).update(header_size=-8),
    "header_size float": lambda ix: _data_file(ix).update(header_size=64.0),
    # offsets
    "offset past the end": lambda ix: _tensor(ix).update(offset=_data_file(ix)["size"]),
    "offset 2**62": lambda ix: _tensor(ix).update(offset=2**62),
    "offset 2**64": lambda ix: _tensor(ix).update(offset=2**64),
    "offset negative": lambda ix: _tensor(ix).update(offset=-1),
    "offset inside the header": lambda ix: _tensor(ix).update(offset=8),
    "overlapping tensors": lambda ix: list(ix["tensors"].values())[1].update(offset=_tensor(ix)["offset"]),
    "file number out of range": lambda ix: _tensor(ix).update(file=7),
    "file number negative": lambda ix: _tensor(ix).update(file=-1),
    "tensor in the meta file": lambda ix: _tensor(ix).update(
        file=next(i for i, f in enumerate(ix["files"]) if f["kind"] == "meta")
    ),
    "length lies": lambda ix: _tensor(ix).update(length=_tensor(ix)["length"] + 4),
    "file size lies": lambda ix: _data_file(ix).update(size=_data_file(ix)["size"] * 1000),
    "file size 2**63": lambda ix: _data_file(ix).update(size=2**63),
    # shapes
    "shape overflows int64": lambda ix: _tensor(ix).update(shape=[2**32, 2**32], length=0),
    "shape 2**40 x 2**40": lambda ix: _tensor(ix).update(shape=[2**40, 2**40]),
    "shape huge rank": lambda ix: _tensor(ix).update(shape=[1] * 100000),
    "shape negative": lambda ix: _tensor(ix).update(shape=[-4, -16]),
    "shape float": lambda ix: _tensor(ix).update(shape=[16.0]),
    "shape bool": lambda ix: _tensor(ix).update(shape=[True] * 16),
    "shape not a list": lambda ix: _tensor(ix).update(shape="16"),
    # dtypes
    **{
        f"dtype {d!r}": (lambda d: lambda ix: _tensor(ix).update(dtype=d))(d)  # noqa: B023
        for d in [
            "object",
            "O",
            "<U5",
            "U5",
            "S5",
            "V64",
            "str",
            "datetime64[ns]",
            "timedelta64",
            "float64 ",
            "f4",
            "<f4",
            ">f4",
            "float32,float32",
            "[('a','<f4')]",
            "x" * 10000,
            7,
            None,
        ]
    },
    # file names that leave the directory or belong to another checkpoint
    **{
        f"file name {n!r}": (lambda n: lambda ix: _data_file(ix).update(name=n))(n)  # noqa: B023
        for n in [
            "../victim.data-00000-of-00001",
            "/etc/passwd",
            "s3://x/y",
            "file:///etc/passwd",
            "..",
            ".",
            "",
            "ckpt-1.data/../../victim.meta",
            "ckpt-2.data-00000-of-00001",
            "C:\\x",
            "a" * 300,
        ]
    },
    # the tree
    "pickle node": lambda ix: ix.update(tree={"p": base64.b64encode(pickle.dumps(print)).decode()}),
    "scalar of dtype object": lambda ix: ix.update(
        tree={"s": ["object", base64.b64encode(b"\0" * 8).decode()]}
    ),
    "scalar of dtype <U5": lambda ix: ix.update(tree={"s": ["<U5", base64.b64encode(b"\0" * 20).decode()]}),
    "scalar wrong size": lambda ix: ix.update(tree={"s": ["float64", base64.b64encode(b"\0" * 3).decode()]}),
    "unknown tensor": lambda ix: ix.update(tree={"x": "nope"}),
    "unknown tag": lambda ix: ix.update(tree={"q": 1}),
    "two tags": lambda ix: ix.update(tree={"l": [], "t": []}),
    "bad base64": lambda ix: ix.update(tree={"b": "!!!"}),
    "dict key not str": lambda ix: ix.update(tree={"d": [[[1], 2]]}),
    **{
        f"tree nested {n} deep": (lambda n: lambda ix: ix.update(_nested=n))(n)  # noqa: B023
        for n in (600, 5000)
    },
    "float tag with string": lambda ix: ix.update(tree={"f": "1e999999"}),
    # versions and tables
    "no files table": lambda ix: ix.pop("files"),
    "tensors not a dict": lambda ix: ix.update(tensors=[]),
    "not our format": lambda ix: ix.update(format="safetensors"),
    "format_version missing": lambda ix: ix.pop("format_version"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_INDEX))
def test_hostile_index_is_rejected(ckpt, tmp_path, case):
    before = _outside(tmp_path)
    index = _index(ckpt)
    HOSTILE_INDEX[case](index)
    _write_index(ckpt, index)
    # A pickle under a valid checksum is refused (TypeError), not reported corrupt.
    _rejected(
        lambda: load_checkpoint(str(ckpt / "ckpt-1")),
        exc=TypeError if case == "pickle node" else CorruptCheckpointError,
    )
    if (
        case
        not in (
            "pickle node",
            "scalar of dtype object",
            "scalar of dtype <U5",
            "scalar wrong size",
            "unknown tensor",
            "unknown tag",
            "two tags",
            "bad base64",
            "dict key not str",
            "float tag with string",
            "file size lies",
        )
        and "nested" not in case
    ):
        _rejected(lambda: list_variables(str(ckpt / "ckpt-1")))
    assert _outside(tmp_path) == before


def test_deeply_nested_index_json_is_rejected(ckpt):
    """JSON nested past the interpreter's recursion limit: a parse error, not a RecursionError."""
    head = b'{"format":"ckpt_callbacks","format_version":1,"tree":' + b"[" * 200000 + b"]" * 200000
    (ckpt / "ckpt-1.index").write_bytes(
        head + b',"index_checksum":"' + fmt.checksum_bytes(head).encode() + b'"}\n'
    )
    _all_readers_reject(ckpt)


def test_pickle_payload_is_never_executed(ckpt, tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    index = _index(ckpt)
    index["tree"] = {"d": [["x", {"p": base64.b64encode(pickle.dumps(Exploit())).decode()}]]}
    _write_index(ckpt, index)
    # A checkpoint whose checksums match is not corrupt: the refusal is a TypeError that names the
    # leaf, and restore() raises it rather than skipping to an older checkpoint (or to none).
    err = _rejected(lambda: load_checkpoint(str(ckpt / "ckpt-1")), exc=TypeError)
    assert isinstance(err, IncompatibleCheckpointError)
    assert "state['x']" in str(err) and "allow_pickle=True" in str(err)
    with CheckpointManager(str(ckpt)) as mgr:
        _rejected(mgr.restore, exc=TypeError)
        _rejected(lambda: mgr.restore(str(ckpt / "ckpt-1")), exc=TypeError)
    assert not marker.exists()


def test_index_file_too_big_is_rejected_without_reading_it(ckpt):
    with open(ckpt / "ckpt-1.index", "r+b") as f:
        f.truncate(fmt.MAX_INDEX_BYTES + 4096)  # sparse: costs no disk
    _all_readers_reject(ckpt)


def test_data_file_header_length_prefix(ckpt):
    """The safetensors length prefix must agree with the index (2**63, > 100 MB, off by 8)."""
    index = _index(ckpt)
    f = _data_file(index)
    path = ckpt / f["name"]
    data = bytearray(path.read_bytes())
    for prefix in (2**63, 2**64 - 1, 100 * 1024 * 1024 + 8, f["header_size"], 0):
        data[:8] = struct.pack("<Q", prefix)
        path.write_bytes(bytes(data))
        f["checksum"] = fmt.checksum_bytes(bytes(data[: f["header_size"]]))  # a consistent attacker
        _write_index(ckpt, index)
        _rejected(lambda: load_checkpoint(str(ckpt / "ckpt-1")))


def test_sparse_data_file_claiming_huge_tensor(ckpt):
    """A 1 TiB sparse data file with an index that matches it.

    Such a file is indistinguishable from a real 512 GiB tensor, so this is not CorruptCheckpointError:
    the one honest bound is that the allocation fails up front (MemoryError) instead of the loader
    reading half a terabyte into memory. Not measured with tracemalloc, which counts the failed request.
    """
    index = _index(ckpt)
    f, t = _data_file(index), _tensor(index)
    huge = 1 << 40
    try:
        with open(ckpt / f["name"], "r+b") as fh:
            fh.truncate(huge)
    except OSError as e:
        pytest.skip(f"this filesystem cannot hold a 1 TiB sparse file: {e}")
    f["size"] = huge
    t.update(offset=huge - (1 << 39), length=1 << 39, shape=[1 << 37], dtype="float32")
    _write_index(ckpt, index)
    with pytest.raises((CorruptCheckpointError, MemoryError)):
        load_checkpoint(str(ckpt / "ckpt-1"))


def test_meta_hostile(ckpt):
    meta = ckpt / "ckpt-1.meta"
    meta.write_bytes(b"[" * 200000)
    _rejected(lambda: read_meta(str(ckpt / "ckpt-1")))
    _rejected(lambda: load_checkpoint(str(ckpt / "ckpt-1")))
    with open(meta, "r+b") as f:
        f.truncate(1 << 31)  # sparse 2 GiB
    _rejected(lambda: load_checkpoint(str(ckpt / "ckpt-1")))


# ---------------------------------------------------------------- the state file


HOSTILE_PATHS = [
    "/etc/passwd",
    "../victim",
    "..",
    ".",
    "s3://x/y",
    "file:///etc/passwd",
    "ckpt-1/../../victim",
    "..\\victim",
    "C:\\victim",
    "~/victim",
    "ckpt-1\x00",
    "a" * 1000,
    "gs://bucket/ckpt-1",
]


@pytest.mark.parametrize("where", ["model_checkpoint_path", "all_model_checkpoint_paths"])
@pytest.mark.parametrize("bad", HOSTILE_PATHS)
def test_state_file_paths_outside_the_directory(ckpt, tmp_path, where, bad):
    quoted = json.dumps(bad)  # TF text format escapes like JSON for these
    lines = [
        'model_checkpoint_path: "ckpt-1"',
        'all_model_checkpoint_paths: "ckpt-1"',
        "all_model_checkpoint_timestamps: 1.0",
        "last_preserved_timestamp: 0.0",
    ]
    if where == "model_checkpoint_path":
        lines[0] = f"model_checkpoint_path: {quoted}"
    else:
        lines.insert(1, f"all_model_checkpoint_paths: {quoted}")
        lines.insert(3, "all_model_checkpoint_timestamps: 0.5")
    (ckpt / "checkpoint").write_text("\n".join(lines) + "\n")
    before = _outside(tmp_path)
    inside = sorted(os.listdir(ckpt))
    d = str(ckpt)
    _rejected(lambda: get_checkpoint_state(d))
    _rejected(lambda: resolve_checkpoint(d))
    _rejected(lambda: CheckpointManager(d, max_to_keep=1))  # refuses to start: deletes nothing
    if where == "model_checkpoint_path":
        _rejected(lambda: latest_checkpoint(d))
    assert _outside(tmp_path) == before
    assert sorted(os.listdir(ckpt)) == inside
    try:
        from ckpt_callbacks._cli._main import main
    except ImportError:
        return
    for cmd in (["verify", d], ["gc", d]):
        assert main(cmd) != 0
    assert _outside(tmp_path) == before
    assert sorted(os.listdir(ckpt)) == inside


def test_state_file_naming_missing_checkpoints(ckpt, tmp_path):
    (ckpt / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-77"\nall_model_checkpoint_paths: "ckpt-1"\nall_model_checkpoint_paths: "ckpt-77"\n'
    )
    assert latest_checkpoint(str(ckpt)) is None
    with CheckpointManager(str(ckpt), max_to_keep=1) as mgr, pytest.warns(UserWarning, match="ckpt-77"):
        path, state = mgr.restore_with_path()
    assert path.endswith("ckpt-1") and state["n"] == 3
    _rejected(lambda: mgr.restore(str(ckpt / "ckpt-77")), CheckpointError)


@pytest.mark.parametrize(
    "comment",
    [
        "[" * 200000,
        '{"v":1,"checkpoints":[{"name":"ckpt-1","step":1e999,"timestamp":1,"status":"active"}]}',
        '{"v":1,"checkpoints":[{"name":"ckpt-1","step":1,"timestamp":"nan","status":"active","shards":1e999}]}',
        '{"v":1,"checkpoints":[{"name":"../victim","step":1,"timestamp":1,"status":"active"}]}',
        '{"v":1,"checkpoints":"x"}',
        "null",
        '"' + "x" * 1000 + '"',
    ],
)
def test_state_file_retention_comment_is_untrusted(ckpt, tmp_path, comment):
    """A hostile ``# ckpt_callbacks:`` line is ignored (the TF fields rule), never a crash."""
    text = (ckpt / "checkpoint").read_text().splitlines()
    text = [ln for ln in text if not ln.startswith("# ckpt_callbacks:")] + ["# ckpt_callbacks: " + comment]
    (ckpt / "checkpoint").write_text("\n".join(text) + "\n")
    before = _outside(tmp_path)
    # incremental=False: the same state again would point into ckpt-1's data file, which then stays
    with CheckpointManager(str(ckpt), max_to_keep=1, incremental=False) as mgr:
        assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-1"]
        mgr.save(_state(), step=2)
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("ckpt-")) == [
        "ckpt-2.data-00000-of-00001",
        "ckpt-2.index",
        "ckpt-2.meta",
    ]
    assert _outside(tmp_path) == before


def test_state_file_too_big_or_binary(ckpt):
    (ckpt / "checkpoint").write_bytes(b"\xff" * 100)
    _rejected(lambda: get_checkpoint_state(str(ckpt)))
    with open(ckpt / "checkpoint", "r+b") as f:
        f.truncate(1 << 31)
    _rejected(lambda: get_checkpoint_state(str(ckpt)))
    _rejected(lambda: CheckpointManager(str(ckpt)))
