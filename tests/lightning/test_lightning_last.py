"""``fit(ckpt_path="last")`` and ``resume=True`` read the resumed checkpoint's data once."""

from __future__ import annotations

import os

import pytest
from lightning_helpers import make_loader, make_trainer, model_class

from ckpt_callbacks._api._resolve import read_index
from ckpt_callbacks._storage import Storage
from ckpt_callbacks.lightning import CheckpointCallback


@pytest.fixture
def data_reads(monkeypatch):
    """Names of the ``.data-`` files opened for reading through the storage layer, in order."""
    opened: list[str] = []
    real_open, real_read = Storage.open_read, Storage.read_bytes

    def open_read(self, name):
        if ".data-" in name:
            opened.append(name)
        return real_open(self, name)

    def read_bytes(self, name, max_bytes=None):
        if ".data-" in name and (max_bytes is None or max_bytes > 64):  # 64: a format check of the head
            opened.append(name)
        return real_read(self, name, max_bytes)

    monkeypatch.setattr(Storage, "open_read", open_read)
    monkeypatch.setattr(Storage, "read_bytes", read_bytes)
    return opened


@pytest.mark.parametrize("how", ["last", "resume"])
def test_resumed_checkpoint_is_read_once(pl, tmp_path, data_reads, how):
    d = str(tmp_path / "run")
    make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=1).fit(
        model_class(pl)(), make_loader()
    )
    assert data_reads == []
    cb = CheckpointCallback(d, save_every_n_steps=100, save_on_train_end=False, resume=how == "resume")
    trainer = make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=2)
    trainer.fit(model_class(pl)(), make_loader(), ckpt_path="last" if how == "last" else None)
    assert trainer.global_step == 12
    assert trainer.ckpt_path.startswith(os.path.join(d, "ckpt-6"))
    # Each data file ckpt-6 names is read once: its own, and (incremental checkpoints) the earlier one
    # holding the tensors that did not change since.
    named = [f["name"] for f in read_index(os.path.join(d, "ckpt-6"))["files"] if f["kind"] == "data"]
    assert sorted(data_reads) == sorted(named) and "ckpt-6.data-00000-of-00001" in named
