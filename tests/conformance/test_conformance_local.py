"""The storage conformance suite on ``memory://`` and local disk (the cloud backends run it in integration/)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
from conformance_suite import Backend, ManagerConformance, small

from ckpt_callbacks import CheckpointManager


class TestMemory(ManagerConformance):
    @pytest.fixture
    def backend(self) -> Iterator[Backend]:
        url = f"memory://conformance-{uuid.uuid4().hex}"
        yield Backend("memory", url)
        fs = fsspec.filesystem("memory")
        if fs.exists(url):
            fs.rm(url, recursive=True)


class TestLocal(ManagerConformance):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Backend:
        return Backend("local", str(tmp_path / "run"))

    def test_temp_files_of_interrupted_saves_removed(self, backend: Backend) -> None:
        # Local disk writes through hidden temp files; object stores have no such stage.
        with CheckpointManager(backend.url) as mgr:
            mgr.save(small(1), step=1)
        Path(backend.url, ".ckpt-2.index.tmp-0123abcd").write_bytes(b"partial")
        Path(backend.url, ".notes.tmp-0123abcd").write_bytes(b"foreign")
        with CheckpointManager(backend.url) as mgr:
            assert mgr.restore()["step"] == 1
        assert not Path(backend.url, ".ckpt-2.index.tmp-0123abcd").exists()
        assert Path(backend.url, ".notes.tmp-0123abcd").exists()
