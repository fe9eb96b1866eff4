"""Storage conformance suite for the CheckpointManager, written once for every backend.

Modelled on fsspec's ``tests/abstract``: :class:`ManagerConformance` holds the tests and needs one
fixture, ``backend``, giving a fresh, empty directory URL and its ``storage_options``. Subclasses bind
it to a filesystem: ``tests/conformance/test_conformance_local.py`` for ``memory://`` and local disk,
``integration/test_conformance_cloud.py`` for a real local S3 server and a real GCS emulator. Backend
quirks are attributes of the :class:`Backend` (or of the subclass), never ``if``s in these tests.

The module name does not start with ``test_`` so that pytest collects the tests only through the
concrete ``Test*`` subclasses.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

import fsspec
import ml_dtypes
import numpy as np
import pytest
from fakes import NUMERIC_DTYPES, T0, FakeClock

import ckpt_callbacks._checkpoint._checkpoint_io as checkpoint_io
from ckpt_callbacks import (
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    get_checkpoint_state,
    latest_checkpoint,
    list_variables,
    load_checkpoint,
    save_checkpoint,
)
from ckpt_callbacks._api._resolve import read_meta
from ckpt_callbacks._format._format import LazyArray
from ckpt_callbacks._manager._lock import LOCK_FILE_NAME

DTYPES = NUMERIC_DTYPES
OUR_SUFFIXES = (".index", ".meta", ".data-00000-of-00001")


@dataclass
class Backend:
    """A fresh, empty checkpoint directory on one filesystem."""

    name: str
    url: str
    storage_options: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def so(self) -> dict[str, Any] | None:
        return self.storage_options

    def _fs(self) -> tuple[Any, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
        return fs, root.rstrip("/")

    def names(self) -> set[str]:
        """File names directly in the directory, read with plain fsspec (not through the library)."""
        fs, root = self._fs()
        fs.invalidate_cache()
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        except FileNotFoundError:
            return set()

    def read(self, name: str) -> bytes:
        fs, root = self._fs()
        return fs.cat_file(f"{root}/{name}")

    def write(self, name: str, data: bytes) -> None:
        fs, root = self._fs()
        fs.pipe_file(f"{root}/{name}", data)
        fs.invalidate_cache()

    def join(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"


def assert_same_tree(a: Any, b: Any) -> None:
    """Same types all the way down and bit-identical array contents."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y)
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    else:
        assert a == b


def rich_state(seed: int = 0) -> dict:
    """A tree with every numeric dtype, scalars, python leaves and nesting."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for dt in DTYPES:
        dt = np.dtype(dt)
        raw = rng.integers(0, 256, size=3 * 5 * dt.itemsize, dtype=np.uint8)
        arr = raw.view(dt).reshape(3, 5).copy() if dt != np.bool_ else raw.astype(bool).reshape(3, 5)
        if dt == np.dtype(ml_dtypes.int4):
            arr = rng.integers(-8, 8, size=(3, 5)).astype(ml_dtypes.int4)
        arrays[dt.name] = arr
    return {
        "arrays": arrays,
        "empty": np.zeros((0, 4), np.float32),
        "big_endian": [np.arange(6, dtype=">f8").reshape(2, 3), np.arange(4, dtype=">i2")],
        "scalar": np.float32(1.5),
        "scalar_i": np.int64(-3),
        "py": [None, True, 7, 2**70, -0.0, float("nan"), float("inf"), "text", b"\x00bytes", (1, 2)],
        3: {"int key": 1},
        "step": seed,
    }


def small(step: int) -> dict:
    return {"w": np.full((4, 4), step, np.float32), "step": step}


def names_of(paths: list[str]) -> list[str]:
    return [p.rstrip("/").rsplit("/", 1)[-1] for p in paths]


def _big_state(step: int) -> dict:
    """16 MiB: on object stores a multipart / chunked upload that takes a moment."""
    return {"w": np.full(4 << 20, step, np.float32), "step": step}


def _failing_state() -> dict:
    """A state whose second tensor fails while it is written, 12 MiB into the save: on object stores
    the upload is then under way (S3: a multipart upload with a part sent; GCS: a resumable session)."""

    def explode() -> np.ndarray:
        raise RuntimeError("injected failure while producing a tensor")

    rng = np.random.default_rng(3)
    return {
        "a": rng.integers(0, 255, 12 << 20, dtype=np.uint8),
        "b": LazyArray((4,), np.dtype("float32"), explode),
    }


class ManagerConformance:
    """The CheckpointManager contract on one backend. Subclasses provide the ``backend`` fixture."""

    # ---------------------------------------------------------------- round trips

    def test_round_trip_many_dtypes(self, backend: Backend) -> None:
        state = rich_state(1)
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            path = mgr.save(state, step=1)
            # Paths come back in the caller's spelling of the directory.
            assert path == mgr.latest_checkpoint == backend.join("ckpt-1")
            assert mgr.checkpoints == [path]
            assert latest_checkpoint(backend.url, storage_options=backend.so) == path
            assert_same_tree(mgr.restore(), state)
        assert_same_tree(load_checkpoint(path, storage_options=backend.so), state)

    def test_files_of_one_checkpoint(self, backend: Backend) -> None:
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            mgr.save(small(10), step=10)
        names = backend.names()
        assert {"ckpt-10" + s for s in OUR_SUFFIXES} | {"checkpoint"} <= names
        assert not {
            n for n in names if n.startswith("ckpt-10") and n not in {"ckpt-10" + s for s in OUR_SUFFIXES}
        }

    def test_meta_has_every_field(self, backend: Backend) -> None:
        """.meta: framework and versions, model, step, epoch, time, metrics, user meta."""
        clock = FakeClock(T0 + 0.25)
        with CheckpointManager(backend.url, storage_options=backend.so, clock=clock) as mgr:
            mgr.save(small(10), step=10, metrics={"loss": 0.5}, meta={"epoch": 3, "note": "x"})
        meta = json.loads(backend.read("ckpt-10.meta"))
        assert {
            "framework",
            "framework_versions",
            "model",
            "step",
            "epoch",
            "time",
            "metrics",
            "user",
        } <= set(meta)
        assert (meta["step"], meta["epoch"], meta["time"]) == (10, 3, T0 + 0.25)
        assert meta["metrics"] == {"loss": 0.5} and meta["user"] == {"epoch": 3, "note": "x"}

    def test_large_state_sharded_and_multipart(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Force the object-store sharding threshold down so a 24 MiB state takes the parallel path:
        # several data shards written concurrently, each bigger than one 8 MiB S3 part.
        monkeypatch.setattr(checkpoint_io, "_SHARD_BYTES", 10 << 20)
        monkeypatch.setattr(checkpoint_io, "_SHARD_BYTES_PARALLEL_PARTS", 10 << 20)
        rng = np.random.default_rng(7)
        state = {
            f"t{i}": rng.standard_normal((1 << 20,)).astype(np.float32).reshape(1024, 1024) for i in range(6)
        }
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            mgr.save(state, step=1)
            assert_same_tree(mgr.restore(), state)
        data_files = sorted(n for n in backend.names() if ".data-" in n)
        assert data_files[0].startswith("ckpt-1.data-00000-of-") and len(data_files) == backend.extra.get(
            "large_shards", 1
        )

    # ---------------------------------------------------------------- state file

    def test_state_file_contents(self, backend: Backend) -> None:
        clock = FakeClock()
        with CheckpointManager(backend.url, storage_options=backend.so, max_to_keep=2, clock=clock) as mgr:
            for step in (1, 2, 3):
                clock.now += 10
                mgr.save(small(step), step=step)
            assert names_of(mgr.checkpoints) == ["ckpt-2", "ckpt-3"]
            assert mgr.latest_checkpoint == mgr.checkpoints[-1]
        text = backend.read("checkpoint").decode()
        lines = text.splitlines()
        assert lines[0] == 'model_checkpoint_path: "ckpt-3"'
        assert [ln for ln in lines if ln.startswith("all_model_checkpoint_paths")] == [
            'all_model_checkpoint_paths: "ckpt-2"',
            'all_model_checkpoint_paths: "ckpt-3"',
        ]
        stamps = [
            float(ln.split(":", 1)[1]) for ln in lines if ln.startswith("all_model_checkpoint_timestamps")
        ]
        assert stamps == [T0 + 20, T0 + 30]
        state = get_checkpoint_state(backend.url, storage_options=backend.so)
        assert names_of([state.model_checkpoint_path]) == ["ckpt-3"]
        assert names_of(state.all_model_checkpoint_paths) == ["ckpt-2", "ckpt-3"]
        assert state.all_model_checkpoint_timestamps == [T0 + 20, T0 + 30]
        latest = latest_checkpoint(backend.url, storage_options=backend.so)
        assert latest == state.model_checkpoint_path and names_of([latest]) == ["ckpt-3"]

    def test_empty_directory(self, backend: Backend) -> None:
        assert latest_checkpoint(backend.url, storage_options=backend.so) is None
        assert get_checkpoint_state(backend.url, storage_options=backend.so) is None
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            assert mgr.latest_checkpoint is None
            assert mgr.checkpoints == []
            assert mgr.restore() is None

    # ---------------------------------------------------------------- retention

    def test_rotation_max_to_keep(self, backend: Backend) -> None:
        with CheckpointManager(backend.url, storage_options=backend.so, max_to_keep=3) as mgr:
            for step in range(1, 7):
                mgr.save(small(step), step=step)
            assert names_of(mgr.checkpoints) == ["ckpt-4", "ckpt-5", "ckpt-6"]
        on_storage = {n.split(".")[0] for n in backend.names() if n.startswith("ckpt-")}
        assert on_storage == {"ckpt-4", "ckpt-5", "ckpt-6"}

    @pytest.mark.parametrize("async_save", [False, True])
    def test_incremental_saves_upload_only_what_changed(self, backend: Backend, async_save: bool) -> None:
        """Unchanged tensors are not written again (on object stores: not uploaded again); the bytes
        a kept checkpoint points into outlive the checkpoint that wrote them."""
        frozen = np.arange(256 * 1024, dtype=np.float32)  # 1 MiB
        with CheckpointManager(
            backend.url, storage_options=backend.so, max_to_keep=2, async_save=async_save
        ) as mgr:
            for step in range(1, 5):
                mgr.save({"frozen": frozen, "head": small(step)["w"], "step": step}, step=step)
            mgr.wait_until_finished()
            assert names_of(mgr.checkpoints) == ["ckpt-3", "ckpt-4"]
        names = backend.names()
        data = sorted(n for n in names if ".data-" in n)
        assert data == [f"ckpt-{s}.data-00000-of-00001" for s in (1, 3, 4)]
        assert {n.split(".")[0] for n in names if n.startswith("ckpt-") and ".data-" not in n} == {
            "ckpt-3",
            "ckpt-4",
        }
        assert len(backend.read("ckpt-4.data-00000-of-00001")) < frozen.nbytes // 10
        for step in (3, 4):
            state = load_checkpoint(backend.join(f"ckpt-{step}"), storage_options=backend.so)
            np.testing.assert_array_equal(state["frozen"], frozen)
            np.testing.assert_array_equal(state["head"], small(step)["w"])

    # Saves every half hour, max_to_keep=2, one kept per hour: TensorFlow's CheckpointManager keeps
    # ckpt-3 (1 h after the manager started) and ckpt-5 (1 h after ckpt-3) forever.
    HOURLY_EXPECTED = ["ckpt-3", "ckpt-5", "ckpt-6", "ckpt-7"]

    def _hourly_saves(self, backend: Backend, clock: FakeClock, steps: range) -> list[str]:
        with CheckpointManager(
            backend.url,
            storage_options=backend.so,
            max_to_keep=2,
            keep_checkpoint_every_n_hours=1,
            clock=clock,
        ) as mgr:
            for step in steps:
                clock.now = T0 + (step - 1) * 1800
                mgr.save(small(step), step=step)
            return names_of(mgr.checkpoints)

    def test_hourly_retention(self, backend: Backend) -> None:
        clock = FakeClock(T0)
        assert self._hourly_saves(backend, clock, range(1, 8)) == self.HOURLY_EXPECTED
        state = get_checkpoint_state(backend.url, storage_options=backend.so)
        assert state.last_preserved_timestamp == T0 + 2 * 3600
        on_storage = {n.split(".")[0] for n in backend.names() if n.startswith("ckpt-")}
        assert on_storage == set(self.HOURLY_EXPECTED)

    def test_restart_continuity(self, backend: Backend) -> None:
        clock = FakeClock(T0)
        self._hourly_saves(backend, clock, range(1, 5))
        # A new manager on the same directory continues exactly where the first one stopped.
        assert self._hourly_saves(backend, clock, range(5, 8)) == self.HOURLY_EXPECTED
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            assert names_of([mgr.latest_checkpoint]) == ["ckpt-7"]
            assert mgr.restore()["step"] == 7

    def test_resumed_checkpoint_protected_only_until_a_newer_commit(self, backend: Backend) -> None:
        """Retention: a restarted run keeps the same survivors as one uninterrupted manager."""
        with CheckpointManager(backend.url, storage_options=backend.so, max_to_keep=1) as mgr:
            for step in (1, 2, 3):
                mgr.save(small(step), step=step)
        with CheckpointManager(backend.url, storage_options=backend.so, max_to_keep=1) as mgr:
            assert mgr.restore()["step"] == 3
            mgr.save(small(4), step=4)  # this commit ends the protection of ckpt-3
            assert names_of(mgr.checkpoints) == ["ckpt-4"]
        assert not {n for n in backend.names() if n.startswith("ckpt-3.")}

    def test_two_managers_in_one_process_lose_nothing(self, backend: Backend) -> None:
        """A manager continues from the state file another writer changed (the lock is per process)."""
        a = CheckpointManager(backend.url, storage_options=backend.so)
        a.save(small(1), step=1)
        with CheckpointManager(backend.url, storage_options=backend.so) as b:
            b.save(small(10), step=10)
            b.save(small(11), step=11)
        a.save(small(2), step=2)
        assert names_of(a.checkpoints) == ["ckpt-1", "ckpt-10", "ckpt-11", "ckpt-2"]
        a.close()
        with CheckpointManager(backend.url, storage_options=backend.so) as c:
            assert names_of(c.checkpoints) == ["ckpt-1", "ckpt-10", "ckpt-11", "ckpt-2"]
            assert c.restore()["step"] == 2
        assert {f"ckpt-{n}.index" for n in (1, 10, 11, 2)} <= backend.names()

    def test_keep_best_warns_once_when_the_metric_is_missing(
        self, backend: Backend, caplog: pytest.LogCaptureFixture
    ) -> None:
        with CheckpointManager(
            backend.url, storage_options=backend.so, max_to_keep=1, keep_best=1, monitor="val_loss"
        ) as mgr:
            for step in (1, 2, 3):
                mgr.save(small(step), step=step, metrics={"loss": 0.1})
        warned = [
            r for r in caplog.records if "keep_best=1 ranks checkpoints by metrics['val_loss']" in r.message
        ]
        assert len(warned) == 1 and "['loss']" in warned[0].message

    def test_keep_best(self, backend: Backend) -> None:
        losses = {1: 0.5, 2: 0.1, 3: 0.3, 4: 0.4}
        with CheckpointManager(
            backend.url, storage_options=backend.so, max_to_keep=1, keep_best=1, monitor="loss"
        ) as mgr:
            for step, loss in losses.items():
                mgr.save(small(step), step=step, metrics={"loss": loss})
            assert names_of(mgr.checkpoints) == ["ckpt-2", "ckpt-4"]
        assert load_checkpoint(backend.join("ckpt-2"), storage_options=backend.so)["step"] == 2

    def test_resave_same_step(self, backend: Backend) -> None:
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mgr.save(small(1), step=1)
            mgr.save({"w": np.ones(3), "step": 99}, step=1)
            assert names_of(mgr.checkpoints) == ["ckpt-1"]
            assert mgr.restore()["step"] == 99
        assert load_checkpoint(backend.join("ckpt-1"), storage_options=backend.so)["step"] == 99
        # The replaced copy's data files are gone; what is left is exactly what the new index names.
        index = json.loads(backend.read("ckpt-1.index"))
        assert {n for n in backend.names() if n.startswith("ckpt-1.")} == {
            "ckpt-1.index",
            *(f["name"] for f in index["files"]),
        }

    def test_failed_resave_keeps_the_old_copy(self, backend: Backend) -> None:
        """Re-saving the only checkpoint and failing half-way leaves the old copy listed and whole."""
        with CheckpointManager(backend.url, storage_options=backend.so, max_to_keep=1) as mgr:
            mgr.save(small(1), step=1)
            before = {n: backend.read(n) for n in backend.names() - {LOCK_FILE_NAME}}
            with pytest.raises(RuntimeError, match="injected"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mgr.save(_failing_state(), step=1)
            assert names_of(mgr.checkpoints) == ["ckpt-1"]
            assert mgr.restore()["step"] == 1
        assert {n: backend.read(n) for n in backend.names() - {LOCK_FILE_NAME}} == before
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            assert mgr.restore()["step"] == 1

    # ---------------------------------------------------------------- crash leftovers, corruption

    def test_without_a_state_file_complete_checkpoints_are_kept(self, backend: Backend) -> None:
        """A lost or uncopied ``checkpoint`` file must not make the next start delete every checkpoint
        (one complete checkpoint alone is an interrupted first save's leftover, and is removed)."""
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            for step in (1, 2, 3):
                mgr.save(small(step), step=step)
        fs, root = backend._fs()
        fs.rm(f"{root}/checkpoint")
        fs.rm(f"{root}/ckpt-3.index")  # ckpt-3 incomplete: its data and meta are leftovers
        fs.invalidate_cache()
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            assert mgr.restore() is None and mgr.checkpoints == []
        names = backend.names()
        assert {f"ckpt-{n}{s}" for n in (1, 2) for s in OUR_SUFFIXES} <= names
        assert not {n for n in names if n.startswith("ckpt-3.")}
        assert load_checkpoint(backend.join("ckpt-1"), storage_options=backend.so)["step"] == 1

    def test_leftovers_removed_on_start_only_ours(self, backend: Backend) -> None:
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            mgr.save(small(1), step=1)
        # An interrupted save of ckpt-2: complete files of this format that no state file names.
        save_checkpoint(backend.join("ckpt-2"), small(2), storage_options=backend.so)
        # Files this format did not write, some with names that look like ours.
        foreign = {
            "notes.txt": b"keep me",
            "ckpt-3.index": b"not ours",
            "ckpt-3.data-00000-of-00001": b"nope",
        }
        for name, data in foreign.items():
            backend.write(name, data)
        assert {"ckpt-2" + s for s in OUR_SUFFIXES} <= backend.names()
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            assert names_of(mgr.checkpoints) == ["ckpt-1"]
            assert mgr.restore()["step"] == 1
        names = backend.names()
        assert not {n for n in names if n.startswith("ckpt-2")}
        assert set(foreign) <= names
        for name, data in foreign.items():
            assert backend.read(name) == data
        assert {"ckpt-1" + s for s in OUR_SUFFIXES} <= names

    def test_restore_falls_back_from_corrupt_newest(self, backend: Backend) -> None:
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            mgr.save(small(1), step=1)
            mgr.save(small(2), step=2)
        data_name = "ckpt-2.data-00000-of-00001"
        data = bytearray(backend.read(data_name))
        data[-1] ^= 0xFF  # flip one bit of the last tensor byte: same size, wrong checksum
        backend.write(data_name, bytes(data))
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            with pytest.warns(UserWarning, match="ckpt-2"):
                state = mgr.restore()
            assert state["step"] == 1
            with pytest.raises(CorruptCheckpointError):
                mgr.restore(backend.join("ckpt-2"))
        with pytest.raises(CorruptCheckpointError):
            load_checkpoint(backend.join("ckpt-2"), storage_options=backend.so)

    def test_failed_save_leaves_previous_checkpoint(self, backend: Backend) -> None:
        """A save that dies half-way through a data file leaves nothing visible."""
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            mgr.save(small(1), step=1)
            before = backend.names() - {LOCK_FILE_NAME}
            with pytest.raises(RuntimeError, match="injected"):
                mgr.save(_failing_state(), step=2)
            assert names_of(mgr.checkpoints) == ["ckpt-1"]
            assert mgr.restore()["step"] == 1
        assert backend.names() - {LOCK_FILE_NAME} == before
        assert names_of([latest_checkpoint(backend.url, storage_options=backend.so)]) == ["ckpt-1"]

    def test_missing_index_is_not_a_checkpoint(self, backend: Backend) -> None:
        save_checkpoint(backend.join("ckpt-5"), small(5), storage_options=backend.so)
        fs, root = backend._fs()
        fs.rm_file(f"{root}/ckpt-5.index")
        with pytest.raises(CheckpointNotFoundError):
            load_checkpoint(backend.join("ckpt-5"), storage_options=backend.so)

    # ---------------------------------------------------------------- one-shot functions

    def test_save_load_list_variables(self, backend: Backend) -> None:
        state = {
            "dense": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2, ml_dtypes.bfloat16)},
            "n": 1,
        }
        path = backend.join("ckpt-42")
        save_checkpoint(path, state, meta={"note": "hi"}, storage_options=backend.so)
        assert_same_tree(load_checkpoint(path, storage_options=backend.so), state)
        assert_same_tree(load_checkpoint(path, storage_options=backend.so, verify=False), state)
        variables = list_variables(path, storage_options=backend.so)
        assert variables == [("dense/bias", "bfloat16", (2,)), ("dense/kernel", "float32", (3, 2))]
        assert read_meta(path, storage_options=backend.so)["user"] == {"note": "hi"}

    def test_path_forms_load_and_list(self, backend: Backend) -> None:
        """Like tf.train.load_checkpoint: a checkpoint, its .index file, or a directory (its newest)."""
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            mgr.save(small(1), step=1)
            mgr.save(small(2), step=2)
        so = backend.so
        assert load_checkpoint(backend.url, storage_options=so)["step"] == 2
        assert load_checkpoint(backend.join("ckpt-1.index"), storage_options=so)["step"] == 1
        assert list_variables(backend.join("ckpt-1.index"), storage_options=so) == [("w", "float32", (4, 4))]
        assert read_meta(backend.join("ckpt-1.index"), storage_options=so)["step"] == 1
        with pytest.raises(CheckpointNotFoundError):
            load_checkpoint(backend.join("ckpt-3"), storage_options=so)

    # ---------------------------------------------------------------- async

    def test_async_save(self, backend: Backend) -> None:
        with CheckpointManager(
            backend.url, storage_options=backend.so, async_save=True, max_to_keep=2
        ) as mgr:
            state = rich_state(3)
            for step in (1, 2, 3):
                state["step"] = step
                mgr.save(state, step=step)
            mgr.wait_until_finished()
            assert names_of(mgr.checkpoints) == ["ckpt-2", "ckpt-3"]
            assert_same_tree(mgr.restore(), state)
        assert names_of([latest_checkpoint(backend.url, storage_options=backend.so)]) == ["ckpt-3"]

    def test_async_restore_of_the_path_save_returned(self, backend: Backend) -> None:
        with CheckpointManager(backend.url, storage_options=backend.so, async_save=True) as mgr:
            path = mgr.save(_big_state(1), step=1)  # returns before the write
            assert mgr.restore(path)["step"] == 1

    def test_async_failure_is_kept_for_wait_and_restore_still_works(
        self, backend: Backend, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def fail_in_background(point: str) -> None:
            if point == "after_data":
                raise OSError("injected background failure")

        with CheckpointManager(backend.url, storage_options=backend.so, async_save=True) as mgr:
            mgr.save(small(1), step=1)
            mgr.wait_until_finished()
            monkeypatch.setattr(checkpoint_io, "_crash_point", fail_in_background)
            mgr.save(small(2), step=2)
            assert mgr.restore()["step"] == 1  # the committed checkpoint, not the background error
            with pytest.raises(OSError, match="injected"):
                mgr.wait_until_finished()
            assert names_of(mgr.checkpoints) == ["ckpt-1"]

    # ---------------------------------------------------------------- errors

    def test_errors(self, backend: Backend) -> None:
        with pytest.raises(CheckpointNotFoundError) as info:
            load_checkpoint(backend.join("ckpt-404"), storage_options=backend.so)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, CheckpointError)
        with pytest.raises(ValueError, match="max_to_keep"):
            CheckpointManager(backend.url, storage_options=backend.so, max_to_keep=0)
        with CheckpointManager(backend.url, storage_options=backend.so) as mgr:
            with pytest.raises(CheckpointNotFoundError):
                mgr.restore(backend.join("ckpt-404"))
            with pytest.raises(TypeError, match="obj"):
                mgr.save({"obj": object()}, step=1)
            with pytest.raises(ValueError, match="step"):
                mgr.save(small(1), step=-1)
            assert mgr.latest_checkpoint is None
        assert latest_checkpoint(backend.url, storage_options=backend.so) is None
