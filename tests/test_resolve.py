"""Path forms: a checkpoint prefix, its .index, a pointer file (new and old format name), a directory;
and the one URL splitter."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ckpt_callbacks import load_checkpoint, save_checkpoint
from ckpt_callbacks._api._resolve import POINTER_FORMAT, pointer_bytes, resolve_one
from ckpt_callbacks._format._names import join_url, split_url
from ckpt_callbacks.errors import CorruptCheckpointError


@pytest.fixture
def ckpt(tmp_path):
    save_checkpoint(str(tmp_path / "ckpt-7"), {"w": np.arange(3)})
    return tmp_path


def test_new_pointer_files_carry_a_neutral_format_name():
    doc = json.loads(pointer_bytes("ckpt-7"))
    assert doc == {"format": "ckpt_callbacks.pointer", "version": 1, "checkpoint": "ckpt-7"}
    assert POINTER_FORMAT == "ckpt_callbacks.pointer"


@pytest.mark.parametrize(
    "marker",
    [
        pointer_bytes("ckpt-7"),
        # as FsspecCheckpointIO wrote them before pointer files had a neutral name
        b'{"format":"ckpt_callbacks.lightning","version":1,"checkpoint":"ckpt-7"}\n',
    ],
    ids=["pointer", "old-lightning-marker"],
)
def test_a_pointer_file_names_its_checkpoint(ckpt, marker):
    (ckpt / "last.ckpt").write_bytes(marker)
    assert resolve_one(str(ckpt / "last.ckpt")) == str(ckpt / "ckpt-7")
    assert load_checkpoint(str(ckpt / "last.ckpt"))["w"].tolist() == [0, 1, 2]


def test_a_pointer_leaving_its_directory_is_refused(ckpt):
    (ckpt / "last.ckpt").write_bytes(b'{"format":"ckpt_callbacks.pointer","version":1,"checkpoint":"../x"}')
    with pytest.raises(CorruptCheckpointError, match="invalid checkpoint"):
        resolve_one(str(ckpt / "last.ckpt"))


def test_other_json_is_no_pointer(ckpt):
    (ckpt / "cfg.json").write_bytes(b'{"format":"something else","checkpoint":"ckpt-7"}')
    assert resolve_one(str(ckpt / "cfg.json")) is None


@pytest.mark.parametrize(
    "path, parts",
    [
        ("s3://b/run/ckpt-1", ("s3://b/run", "ckpt-1")),
        ("memory://ckpt-1", ("memory://", "ckpt-1")),
        ("ckpt-1", (".", "ckpt-1")),
        ("/ckpt-1", ("/", "ckpt-1")),
        ("runs/a/ckpt-1/", ("runs/a", "ckpt-1")),
    ],
)
def test_split_url_and_join_url(path, parts):
    assert split_url(path) == parts
    if parts[0] not in (".", "/"):
        assert join_url(*parts) == path.rstrip("/")
