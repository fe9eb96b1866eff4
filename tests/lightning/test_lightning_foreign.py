"""A directory of stock Lightning ``.ckpt`` files (``torch.save``) is refused, not trained over from step 0."""

from __future__ import annotations

import os

import pytest
from lightning_helpers import make_loader, make_trainer, model_class

from ckpt_callbacks import IncompatibleCheckpointError, get_checkpoint_state
from ckpt_callbacks.lightning import CheckpointCallback, FsspecCheckpointIO


def _snapshot(d: str) -> dict[str, bytes]:
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def _stock(pl, tmp_path, d: str, plugins=()) -> None:
    mc = pl.callbacks.ModelCheckpoint(dirpath=d, save_last=True)
    make_trainer(str(tmp_path), [mc], pl=pl, max_epochs=1, plugins=list(plugins)).fit(
        model_class(pl)(), make_loader()
    )


def test_stock_lightning_checkpoints_are_refused_and_resumable_as_told(pl, tmp_path):
    d = str(tmp_path / "run")
    _stock(pl, tmp_path, d)
    before = _snapshot(d)
    assert sorted(before) == ["epoch=0-step=6.ckpt", "last.ckpt"]

    trainer = make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=2)
    with pytest.raises(IncompatibleCheckpointError) as e:
        trainer.fit(model_class(pl)(), make_loader())
    message = str(e.value)
    assert "last.ckpt, epoch=0-step=6.ckpt" in message and "torch.save" in message
    assert f"ckpt_path={os.path.join(d, 'last.ckpt')!r}" in message and "allow_pickle=True" in message
    assert trainer.global_step == 0
    assert _snapshot(d) == before  # nothing written, nothing touched

    # What the message says: pass the file once; the saves that follow resume by themselves.
    cb = CheckpointCallback(d, save_every_n_steps=3, allow_pickle=True)
    trainer = make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=2)
    trainer.fit(model_class(pl)(), make_loader(), ckpt_path=os.path.join(d, "last.ckpt"))
    assert trainer.global_step == 12
    trainer = make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=3)
    trainer.fit(model_class(pl)(), make_loader())
    assert trainer.ckpt_path == os.path.join(d, "ckpt-12") and trainer.global_step == 18
    assert {n: _snapshot(d)[n] for n in before} == before


def test_resume_false_and_our_own_markers_are_not_refused(pl, tmp_path):
    d = str(tmp_path / "run")
    _stock(pl, tmp_path, d)
    trainer = make_trainer(str(tmp_path), [CheckpointCallback(d, resume=False)], pl=pl, max_epochs=1)
    trainer.fit(model_class(pl)(), make_loader())  # told not to resume: a fresh run next to them
    assert get_checkpoint_state(d).model_checkpoint_path == os.path.join(d, "ckpt-6")

    m = str(tmp_path / "markers")  # Lightning's ModelCheckpoint writing this library's format
    _stock(pl, tmp_path, m, plugins=[FsspecCheckpointIO()])
    trainer = make_trainer(str(tmp_path), [CheckpointCallback(m)], pl=pl, max_epochs=1)
    trainer.fit(model_class(pl)(), make_loader())
    assert trainer.global_step == 6
