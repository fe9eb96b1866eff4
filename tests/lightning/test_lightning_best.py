"""Lightning ``keep_best`` on a metric measured at validation: "best" is right and always exists.

A save between two validations carries no ranking value (Lightning keeps the last validation's
values in ``callback_metrics``; ranked, they would displace the checkpoint they were measured at),
and a save is made when the validation that logs the monitored metric finishes.
"""

from __future__ import annotations

import os

import pytest
import torch
from lightning_helpers import _TinyModel, make_trainer, model_class, same_weights, weights
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks import CheckpointNotFoundError, get_checkpoint_state, load_checkpoint
from ckpt_callbacks.lightning import CheckpointCallback, load_from_checkpoint

VAL_ACC = [0.5, 0.9, 0.6, 0.7]  # at the ends of epochs 0-3


class _Scored(_TinyModel):
    def validation_step(self, batch, batch_idx):
        self.log("val_acc", VAL_ACC[self.current_epoch])


def _loader(n: int = 64) -> DataLoader:  # 8 batches of 8: 8 optimizer steps per epoch
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)), batch_size=8
    )


def _steps(d: str) -> list[int]:
    return [int(p.rsplit("-", 1)[1]) for p in get_checkpoint_state(d).all_model_checkpoint_paths]


def test_mid_epoch_saves_never_displace_the_best_validation(pl, tmp_path):
    d = str(tmp_path / "ck")
    cb = CheckpointCallback(
        d, save_every_n_steps=3, max_to_keep=2, keep_best=1, monitor="val_acc", save_on_epoch_end=True
    )
    trainer = make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=4)
    trainer.fit(model_class(pl, _Scored)(), _loader(), _loader(16))

    assert cb.best_model_path == os.path.join(d, "ckpt-16")
    assert float(cb.best_model_score) == pytest.approx(0.9)
    assert os.path.exists(cb.best_model_path + ".index")
    assert _steps(d) == [16, 30, 32]  # the best by a fresh val_acc, and the newest two
    # The mid-epoch saves after step 16 carry no ranking value; the validation saves carry theirs.
    trainer.test(ckpt_path="best", dataloaders=_loader(16))
    assert trainer.ckpt_path == cb.best_model_path

    # "best" from the directory alone: load_from_checkpoint, and a new Trainer's ckpt_path="best".
    saved = load_checkpoint(os.path.join(d, "ckpt-16"))["state_dict"]
    model = load_from_checkpoint(model_class(pl, _Scored), d, checkpoint="best")
    assert same_weights(weights(model), saved)
    assert not same_weights(weights(load_from_checkpoint(model_class(pl, _Scored), d)), saved)
    fresh = CheckpointCallback(d, keep_best=1, monitor="val_acc")
    trainer = make_trainer(str(tmp_path), [fresh], pl=pl)
    trainer.test(model_class(pl, _Scored)(), ckpt_path="best", dataloaders=_loader(16))
    assert trainer.ckpt_path == os.path.join(d, "ckpt-16")


def test_best_of_a_directory_without_keep_best_is_not_found(pl, tmp_path):
    d = str(tmp_path / "ck")
    make_trainer(str(tmp_path), [CheckpointCallback(d)], pl=pl, max_epochs=1).fit(
        model_class(pl, _Scored)(), _loader()
    )
    with pytest.raises(CheckpointNotFoundError, match="not ranked"):
        load_from_checkpoint(model_class(pl, _Scored), d, checkpoint="best")
    with pytest.raises(ValueError, match="one checkpoint"):
        load_from_checkpoint(model_class(pl, _Scored), os.path.join(d, "ckpt-8"), checkpoint="best")
    with pytest.raises(ValueError, match="latest"):
        load_from_checkpoint(model_class(pl, _Scored), d, checkpoint="newest")


def test_validation_end_saves_the_step_it_measured(pl, tmp_path):
    # Validation twice per epoch (after batches 4 and 8): each one saves its step, ranked by its value.
    d = str(tmp_path / "ck")
    cb = CheckpointCallback(d, save_every_n_steps=100, max_to_keep=1, keep_best=1, monitor="val_acc")
    trainer = make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=2, val_check_interval=0.5)
    trainer.fit(model_class(pl, _Scored)(), _loader(), _loader(16))
    # Saves at 4 and 8 (0.5), 12 and 16 (0.9): the first 0.9 is the best, 16 the newest.
    assert _steps(d) == [12, 16]
    assert cb.best_model_path == os.path.join(d, "ckpt-12")


def test_resume_from_a_mid_epoch_validation_save_is_exact(pl, tmp_path):
    class Crash(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 13:
                raise RuntimeError("crash")

    def fit(d, *extra, **kw):
        pl.seed_everything(0, verbose=False)
        cb = CheckpointCallback(d, save_every_n_steps=100, keep_best=1, monitor="val_acc")
        trainer = make_trainer(str(tmp_path), [cb, *extra], pl=pl, max_epochs=2, val_check_interval=0.5, **kw)
        model = model_class(pl, _Scored)(dropout=0.2)
        trainer.fit(model, DataLoader(_loader().dataset, batch_size=8, shuffle=True), _loader(16))
        return trainer, model

    _, straight = fit(str(tmp_path / "a"))
    d = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="crash"):
        fit(d, Crash())
    assert get_checkpoint_state(d).model_checkpoint_path == os.path.join(d, "ckpt-12")  # saved mid-epoch 1
    trainer, resumed = fit(d)
    assert trainer.ckpt_path == os.path.join(d, "ckpt-12") and trainer.global_step == 16
    assert same_weights(weights(resumed), weights(straight))
