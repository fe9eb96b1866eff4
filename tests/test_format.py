"""Round trips of the state tree and the on-storage format (README, "On storage")."""

from __future__ import annotations

import collections
import json
import os
import struct

import numpy as np
import pytest
import torch
from conformance.conformance_suite import assert_same_tree  # one definition for all suites
from fakes import NUMERIC_DTYPES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import safe_open

from ckpt_callbacks import list_variables, load_checkpoint, save_checkpoint
from ckpt_callbacks._format._format import FORMAT_NAME, dump_index, parse_index
from ckpt_callbacks.errors import CorruptCheckpointError, IncompatibleCheckpointError


@st.composite
def arrays(draw):
    dtype = np.dtype(draw(st.sampled_from(NUMERIC_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
    n = int(np.prod(shape)) * dtype.itemsize
    raw = draw(st.binary(min_size=n, max_size=n))
    arr = np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape).copy()
    if dtype == np.bool_:
        arr = arr.view(np.uint8).astype(bool)  # only 0/1 are valid bools
    return arr


leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | arrays()
    | arrays().map(lambda a: a.reshape(-1)[0] if a.size else np.float32(1.5))
)
keys = st.text(max_size=5) | st.integers(-5, 5)
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(keys, children, max_size=3)
        | st.dictionaries(st.text(max_size=3), children, max_size=3).map(collections.OrderedDict)
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=trees)
def test_round_trip_random_trees(tmp_path_factory, state):
    path = str(tmp_path_factory.mktemp("rt") / "ckpt-1")
    save_checkpoint(path, {"root": state})
    assert_same_tree({"root": state}, load_checkpoint(path))


def test_round_trip_memory_url():
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), 3: ("a", b"b", None, -0.0, float("inf"))}
    save_checkpoint("memory://fmt/ckpt-7", state)
    assert_same_tree(state, load_checkpoint("memory://fmt/ckpt-7"))


@pytest.mark.parametrize("dtype", NUMERIC_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_data_file_is_safetensors(tmp_path, dtype):
    arr = np.arange(12).astype(np.float32).astype(dtype).reshape(3, 4)
    path = tmp_path / "ckpt-3"
    save_checkpoint(str(path), {"model": {"w": arr}, "n": 1})
    data_file = tmp_path / "ckpt-3.data-00000-of-00001"
    # The torch reader knows every safetensors dtype (numpy has no bfloat16 / float8).
    with safe_open(str(data_file), "pt") as f:
        assert list(f.keys()) == ["model/w"]
        assert f.metadata() == {"format": FORMAT_NAME}
        raw = f.get_tensor("model/w")
    # Same bytes; dtypes safetensors has no name for travel as U8 and the index keeps the real one.
    assert raw.contiguous().view(torch.uint8).numpy().tobytes() == arr.tobytes()
    assert list_variables(str(path)) == [("model/w", np.dtype(dtype).name, (3, 4))]


def test_files_of_a_checkpoint(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt-1000"), {"w": np.ones(3)}, meta={"run": "a"})
    assert sorted(os.listdir(tmp_path)) == [
        "ckpt-1000.data-00000-of-00001",
        "ckpt-1000.index",
        "ckpt-1000.meta",
    ]
    index = json.loads((tmp_path / "ckpt-1000.index").read_bytes())
    assert index["format"] == FORMAT_NAME and index["format_version"] == 1 and index["step"] == 1000
    (t,) = index["tensors"].values()
    assert set(t) >= {"dtype", "shape", "file", "offset", "length", "checksum"}
    assert [f["size"] for f in index["files"]] == [
        os.path.getsize(tmp_path / f["name"]) for f in index["files"]
    ]
    meta = json.loads((tmp_path / "ckpt-1000.meta").read_bytes())
    assert meta["step"] == 1000 and meta["user"] == {"run": "a"}


def test_golden_bytes_of_a_tiny_checkpoint(tmp_path):
    """Pins the data file layout: safetensors header + little-endian tensor bytes."""
    save_checkpoint(str(tmp_path / "ckpt-1"), {"a": np.array([1, 2], dtype=np.int16)})
    data = (tmp_path / "ckpt-1.data-00000-of-00001").read_bytes()
    header = (
        b'{"__metadata__":{"format":"ckpt_callbacks"},"a":{"dtype":"I16","shape":[2],"data_offsets":[0,4]}}'
    )
    header += b" " * (-len(header) % 8)
    assert data == struct.pack("<Q", len(header)) + header + b"\x01\x00\x02\x00"


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"cfg": object()}, "state['cfg']"),
        ({"hyper_parameters": {"cfg": {1, 2}}}, "state['hyper_parameters']['cfg']"),
        ({"a": [np.array(["x"])]}, "state['a'][0]"),
        ({(1, 2): 3}, "keys must be str or int"),
    ],
)
def test_unsupported_leaves_name_their_key_path(tmp_path, bad, where):
    with pytest.raises(TypeError, match=__import__("re").escape(where)):
        save_checkpoint(str(tmp_path / "ckpt-1"), bad)
    assert not os.listdir(tmp_path)


def test_pickle_only_when_both_sides_opt_in(tmp_path):
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, {"s": {1, 2}}, allow_pickle=True)
    with pytest.raises(TypeError, match=r"state\['s'\] is a pickled object.*allow_pickle=True") as info:
        load_checkpoint(path)
    assert isinstance(info.value, IncompatibleCheckpointError)  # valid checksums: not corrupt
    assert load_checkpoint(path, allow_pickle=True) == {"s": {1, 2}}


def test_index_checksum_covers_every_byte():
    raw = dump_index(
        {"format": FORMAT_NAME, "format_version": 1, "files": [], "tensors": {}, "tree": {"f": 0.001}}
    )
    assert parse_index(raw)["tree"] == {"f": 0.001}
    for i in range(len(raw)):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        with pytest.raises(CorruptCheckpointError):
            parse_index(bytes(flipped))


@pytest.mark.parametrize("rewrite", ["reserialized", "edited in place"])
def test_newer_format_version_is_incompatible_not_corrupt(tmp_path, rewrite):
    """A later version may change anything after the version, its checksum included: IncompatibleCheckpointError."""
    path = str(tmp_path / "ckpt-1")
    save_checkpoint(path, {"w": np.ones(2, np.float32)})
    index_file = tmp_path / "ckpt-1.index"
    raw = index_file.read_bytes()
    if rewrite == "reserialized":
        doc = json.loads(raw)
        doc["format_version"] = 7
        raw = json.dumps(doc, indent=1).encode()
    else:
        raw = raw.replace(b'"format_version":1', b'"format_version":2')
    index_file.write_bytes(raw)
    with pytest.raises(IncompatibleCheckpointError, match="newer than this library supports"):
        load_checkpoint(path)
    with pytest.raises(IncompatibleCheckpointError):
        list_variables(path)
