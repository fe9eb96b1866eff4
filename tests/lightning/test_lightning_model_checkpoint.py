"""``ckpt_callbacks.lightning.ModelCheckpoint``, the drop-in for Lightning's: real ``Trainer.fit`` under
both package names (the ``pl`` fixture), Lightning's arguments with their meanings, its public state,
and this library's storage underneath (``<prefix>-<step>`` checkpoints, pointer files, retention)."""

from __future__ import annotations

import os
import threading

import pytest
import torch
from lightning_helpers import _TinyModel, make_loader, make_trainer, model_class, same_weights, weights

from ckpt_callbacks import get_checkpoint_state, load_checkpoint
from ckpt_callbacks.lightning import ModelCheckpoint, load_from_checkpoint

STOCK_STATE_KEYS = {
    "monitor",
    "best_model_score",
    "best_model_path",
    "current_score",
    "dirpath",
    "best_k_models",
    "kth_best_model_path",
    "kth_value",
    "last_model_path",
}


class _Scored(_TinyModel):
    """Logs ``val_acc`` from a fixed list, one value per validation (epoch), and remembers weights."""

    scores = (0.5, 0.9, 0.6, 0.7)

    def __init__(self, dropout: float = 0.0, lr: float = 0.05) -> None:
        super().__init__(dropout, lr)
        self.weights_at: dict[int, dict] = {}
        self.extra_seen = None

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_acc", self.scores[self.current_epoch % len(self.scores)])

    def on_validation_end(self):
        self.weights_at[self.trainer.global_step] = weights(self)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["user_extra"] = {"saved_by": "on_save_checkpoint"}


def fit(pl, tmp_path, callbacks, model=None, ckpt_path=None, **kwargs):
    model = model if model is not None else model_class(pl, _Scored)()
    kwargs.setdefault("max_epochs", 4)
    trainer = make_trainer(str(tmp_path / "root"), callbacks, pl=pl, **kwargs)
    trainer.fit(model, make_loader(), make_loader(), ckpt_path=ckpt_path)
    return trainer, model


def names(d) -> list[str]:
    return sorted(os.listdir(d))


def steps_kept(d) -> list[int]:
    state = get_checkpoint_state(str(d))
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


def test_top_k_keeps_the_best_and_the_last_and_best_path_loads(pl, tmp_path):
    d = tmp_path / "ckpts"
    cb = ModelCheckpoint(dirpath=str(d), monitor="val_acc", mode="max", save_top_k=2, save_last=True)
    trainer, model = fit(pl, tmp_path, [cb])
    assert isinstance(trainer.checkpoint_callback, pl.callbacks.ModelCheckpoint)
    # val_acc 0.5, 0.9, 0.6, 0.7 at steps 6, 12, 18, 24: the best two (12, 24) plus last (= 24).
    assert cb.best_model_path == str(d / "epoch=1-step=12.ckpt")
    assert cb.best_model_score == pytest.approx(0.9)
    assert set(cb.best_k_models) == {str(d / "epoch=1-step=12.ckpt"), str(d / "epoch=3-step=24.ckpt")}
    assert cb.kth_best_model_path == str(d / "epoch=3-step=24.ckpt") and cb.kth_value == pytest.approx(0.7)
    assert cb.current_score == pytest.approx(0.7) and cb.last_model_path == str(d / "last.ckpt")
    assert steps_kept(d) == [12, 24]
    assert [n for n in names(d) if n.endswith(".ckpt")] == [
        "epoch=1-step=12.ckpt",
        "epoch=3-step=24.ckpt",
        "last.ckpt",
    ]
    assert set(cb.state_dict()) == STOCK_STATE_KEYS
    # Saved through trainer.save_checkpoint: the module's on_save_checkpoint ran, pickle-free.
    best = load_checkpoint(str(d / "ckpt-12"))
    assert best["user_extra"] == {"saved_by": "on_save_checkpoint"} and best["global_step"] == 12
    # ckpt_path="best" restores the best weights.
    trainer.test(model, make_loader(), ckpt_path="best")
    assert same_weights(weights(model), model.weights_at[12])
    loaded = load_from_checkpoint(type(model), cb.best_model_path)
    assert same_weights(weights(loaded), model.weights_at[12])


def test_mid_epoch_saves_never_displace_the_checkpoint_measured_at_validation(pl, tmp_path):
    """Issue 22 point 1 with the drop-in: every 3 steps, val_acc measured at epoch ends (6 steps each)."""
    d = tmp_path / "ckpts"
    cb = ModelCheckpoint(
        dirpath=str(d), monitor="val_acc", mode="max", save_top_k=1, save_last=True, every_n_train_steps=3
    )
    trainer, model = fit(pl, tmp_path, [cb], max_epochs=4)
    # Steps 6, 12, 18, 24 validate (0.5, 0.9, 0.6, 0.7); the saves at 15, 21 carry the stale 0.9.
    assert cb.best_model_path == str(d / "epoch=1-step=12.ckpt") and cb.best_model_score == pytest.approx(0.9)
    assert os.path.exists(cb.best_model_path)
    assert 12 in steps_kept(d) and steps_kept(d)[-1] == 24
    trainer.test(model, make_loader(), ckpt_path="best")
    assert same_weights(weights(model), model.weights_at[12])


def test_save_top_k_minus_one_keeps_all_and_zero_keeps_only_last(pl, tmp_path):
    every = ModelCheckpoint(dirpath=str(tmp_path / "all"), monitor="val_acc", mode="max", save_top_k=-1)
    only_last = ModelCheckpoint(dirpath=str(tmp_path / "last"), save_top_k=0, save_last=True)
    assert every.state_key != only_last.state_key  # two instances in one Trainer coexist
    trainer, _ = fit(pl, tmp_path, [every, only_last])
    assert steps_kept(tmp_path / "all") == [6, 12, 18, 24] and len(every.best_k_models) == 4
    assert steps_kept(tmp_path / "last") == [24]
    assert [n for n in names(tmp_path / "last") if n.endswith(".ckpt")] == ["last.ckpt"]
    assert only_last.best_model_path == "" and only_last.last_model_path == str(
        tmp_path / "last" / "last.ckpt"
    )
    states = trainer._checkpoint_connector.dump_checkpoint()["callbacks"]
    assert {every.state_key, only_last.state_key} <= set(states)


def test_every_n_epochs_filename_template_link_and_resume_from_last(pl, tmp_path):
    d = tmp_path / "ckpts"
    cb = ModelCheckpoint(
        dirpath=str(d), filename="{epoch}-{val_acc:.1f}", every_n_epochs=2, save_top_k=-1, save_last="link"
    )
    fit(pl, tmp_path, [cb])
    assert [n for n in names(d) if n.endswith(".ckpt")] == [
        "epoch=1-val_acc=0.9.ckpt",
        "epoch=3-val_acc=0.7.ckpt",
        "last.ckpt",
    ]
    assert steps_kept(d) == [12, 24]
    assert load_checkpoint(str(d / "last.ckpt"))["global_step"] == 24  # a pointer, on any storage
    cb2 = ModelCheckpoint(dirpath=str(d), every_n_epochs=2, save_top_k=-1, save_last="link")
    trainer, model = fit(pl, tmp_path, [cb2], ckpt_path="last", max_epochs=6)
    assert trainer.global_step == 36 and steps_kept(d) == [12, 24, 36]
    # resume=True (this library's keyword) continues without ckpt_path.
    cb3 = ModelCheckpoint(dirpath=str(d), every_n_epochs=2, save_top_k=-1, resume=True)
    trainer, _ = fit(pl, tmp_path, [cb3], max_epochs=8)
    assert trainer.global_step == 48 and steps_kept(d)[-1] == 48


def test_dirpath_none_and_home_are_resolved_as_lightning_does(pl, tmp_path, monkeypatch):
    cb = ModelCheckpoint()
    fit(pl, tmp_path, [cb], max_epochs=1)
    assert cb.dirpath == str(tmp_path / "root" / "checkpoints")
    assert names(cb.dirpath)[-1] == "epoch=0-step=6.ckpt" and steps_kept(cb.dirpath) == [6]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ModelCheckpoint(dirpath="~/run").dirpath == os.path.realpath(str(tmp_path / "home" / "run"))


def test_async_save_and_retention_extras(pl, tmp_path):
    d = tmp_path / "ckpts"
    cb = ModelCheckpoint(
        dirpath=str(d),
        monitor="val_acc",
        mode="max",
        save_top_k=1,
        save_last=True,
        every_n_train_steps=2,
        async_save=True,
        max_to_keep=2,
    )
    trainer, model = fit(pl, tmp_path, [cb])
    assert cb.best_model_path == str(d / "epoch=1-step=12.ckpt")
    assert steps_kept(d) == [12, 22, 24]
    for path in cb.best_k_models:
        assert load_checkpoint(path)["global_step"] == int(path.rsplit("=", 1)[1][:-5])
    trainer.test(model, make_loader(), ckpt_path="best")
    assert same_weights(weights(model), model.weights_at[12])


def test_setup_alone_starts_no_thread_and_exception_saves(pl, tmp_path):
    cb = ModelCheckpoint(dirpath=str(tmp_path / "a"), async_save=True, save_on_exception=True)
    trainer = make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=1)
    before = set(threading.enumerate())
    cb.setup(trainer, model_class(pl, _Scored)(), "fit")
    assert set(threading.enumerate()) == before
    cb.teardown(trainer, None, "fit")

    class Failing(_Scored):
        def training_step(self, batch, batch_idx):
            if self.global_step == 4:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="boom"):
        fit(pl, tmp_path, [cb], model=model_class(pl, Failing)(), max_epochs=1)
    assert {t for t in threading.enumerate() if t.is_alive()} <= before
    assert steps_kept(tmp_path / "a") == [4]
    assert load_checkpoint(str(tmp_path / "a" / "epoch=0-step=4.ckpt"))["global_step"] == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"filename": "sub/{epoch}"}, "filename='sub/{epoch}'"),
        ({"filename": "{epoch}-{val/loss:.2f}"}, "auto_insert_metric_name=True"),
        ({"save_top_k": -1, "max_to_keep": 3}, "max_to_keep=3"),
        ({"save_top_k": -2}, "save_top_k=-2"),
        ({"save_top_k": 3}, "monitor=None"),
        ({"max_to_keep": 0}, "max_to_keep=0"),
        ({"storage_options": "anon"}, "storage_options='anon'"),
        ({"async_save": "yes"}, "async_save='yes'"),
    ],
)
def test_arguments_whose_meaning_cannot_be_kept_are_refused(pl, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=__import__("re").escape(match)):
        ModelCheckpoint(**kwargs)


def test_lightning_misconfiguration_is_also_a_value_error(pl):
    with pytest.raises(ValueError) as info:
        ModelCheckpoint(every_n_train_steps=2, every_n_epochs=2)
    assert type(info.value).__name__ == "MisconfigurationException"


def test_two_instances_and_pickling(pl, tmp_path):
    import pickle

    a = ModelCheckpoint(dirpath=str(tmp_path / "a"), monitor="val_acc", mode="max")
    b = ModelCheckpoint(dirpath=str(tmp_path / "b"), monitor="val_loss")
    fit(pl, tmp_path, [a, b], max_epochs=2)
    assert a.best_model_path.endswith("epoch=1-step=12.ckpt") and os.path.exists(b.best_model_path)
    fresh = ModelCheckpoint(dirpath=str(tmp_path / "a"), monitor="val_acc", mode="max", async_save=True)
    copy = pickle.loads(pickle.dumps(fresh))  # ddp_spawn, Trainer copies
    assert isinstance(copy, pl.callbacks.ModelCheckpoint) and copy.state_key == a.state_key
    assert torch.is_tensor(a.best_model_score)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed with gloo")
def test_ddp_ranks_agree_and_only_rank_zero_writes(tmp_path):
    import json
    import subprocess

    from lightning_helpers import HERE, PYTHON, script_env

    d, out = str(tmp_path / "ckpts"), str(tmp_path / "out")
    script = os.path.join(HERE, "lightning_ddp_model_checkpoint_script.py")
    proc = subprocess.run(
        [PYTHON, script, "--dir", d, "--out", out],
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=240,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = []
    for rank in (0, 1):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    assert {k: v for k, v in ranks[0].items() if k != "rank"} == {
        k: v for k, v in ranks[1].items() if k != "rank"
    }
    # 3 steps per epoch and rank (48 samples, 8 a batch, 2 ranks): validations at steps 3 and 6.
    assert ranks[0]["global_step"] == 6 and os.path.exists(ranks[0]["best_model_path"])
    assert all(os.path.exists(p) for p in ranks[0]["best_k_models"])
    assert load_checkpoint(os.path.join(d, "last.ckpt"))["global_step"] == 6


def test_state_loaded_without_checkpoints_deleted_since(pl, tmp_path):
    d = tmp_path / "ckpts"
    cb = ModelCheckpoint(dirpath=str(d), monitor="val_acc", mode="max", save_top_k=2)
    fit(pl, tmp_path, [cb], max_epochs=2)
    state = cb.state_dict()
    os.remove(cb.best_model_path)  # as retention would have, after this state was saved
    again = ModelCheckpoint(dirpath=str(d), monitor="val_acc", mode="max", save_top_k=2)
    again.load_state_dict(state)
    assert again.best_model_path == str(d / "epoch=0-step=6.ckpt") and list(again.best_k_models) == [
        again.best_model_path
    ]
    assert again.best_model_score == pytest.approx(0.5)


def test_fsspec_url_with_link_best_and_last(pl, tmp_path):
    import uuid

    import fsspec

    url = f"memory://mc-{uuid.uuid4().hex[:8]}/run"
    cb = ModelCheckpoint(dirpath=url, monitor="val_acc", mode="max", save_top_k=1, save_last="link")
    trainer, model = fit(pl, tmp_path, [cb])
    assert cb.best_model_path == f"{url}/epoch=1-step=12.ckpt" and cb.last_model_path == f"{url}/last.ckpt"
    fs = fsspec.filesystem("memory")
    assert sorted(n.rsplit("/", 1)[1] for n in fs.ls(url, detail=False) if n.endswith(".ckpt")) == [
        "epoch=1-step=12.ckpt",
        "last.ckpt",
    ]
    trainer.test(model, make_loader(), ckpt_path="best")
    assert same_weights(weights(model), model.weights_at[12])
    cb2 = ModelCheckpoint(dirpath=url, monitor="val_acc", mode="max", save_top_k=1, save_last="link")
    trainer, _ = fit(pl, tmp_path, [cb2], ckpt_path="last", max_epochs=5)
    assert trainer.global_step == 30 and load_checkpoint(f"{url}/last.ckpt")["global_step"] == 30


@pytest.mark.parametrize("same_folder", [True, False])
def test_the_checkpoint_a_run_resumed_from_is_never_deleted(pl, tmp_path, same_folder):
    """As Lightning's ModelCheckpoint: top-k of the resumed run never deletes the checkpoint it resumed from."""
    first, second = tmp_path / "first", tmp_path / "second"
    kwargs = dict(monitor="step", mode="max", save_top_k=2, every_n_train_steps=2)
    fit(pl, tmp_path, [ModelCheckpoint(dirpath=str(first), **kwargs)], max_steps=5, limit_val_batches=0)
    assert steps_kept(first) == [2, 4]
    resumed = ModelCheckpoint(dirpath=str(first if same_folder else second), **kwargs)
    fit(
        pl,
        tmp_path,
        [resumed],
        max_steps=8,
        limit_val_batches=0,
        ckpt_path=str(first / "epoch=0-step=4.ckpt"),
    )
    if same_folder:
        assert steps_kept(first) == [4, 6, 8]
        pointers = [n for n in names(first) if n.endswith(".ckpt")]
        assert len(pointers) == 3 and pointers[0] == "epoch=0-step=4.ckpt"  # and steps 6, 8
        assert load_checkpoint(str(first / "ckpt-4"))["global_step"] == 4
    else:
        assert steps_kept(first) == [2, 4] and steps_kept(second) == [6, 8]
