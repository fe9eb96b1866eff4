"""CheckpointCallback with real Trainer.fit runs: triggers, retention, resume, errors."""

from __future__ import annotations

import os
import shutil
import uuid

import fsspec
import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.parsing import AttributeDict
from lightning_helpers import TinyModel, make_loader, make_trainer, same_weights, weights

from ckpt_callbacks import CheckpointManager, get_checkpoint_state, load_checkpoint
from ckpt_callbacks._api._resolve import read_meta
from ckpt_callbacks.errors import CheckpointWriteError
from ckpt_callbacks.lightning import CheckpointCallback, FsspecCheckpointIO


def steps_of(directory: str) -> list[int]:
    state = get_checkpoint_state(directory)
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths] if state else []


def our_state(checkpoint: dict) -> dict:
    [state] = [v for k, v in checkpoint["callbacks"].items() if k.startswith("CheckpointCallback")]
    return state


def run(tmp_path, cb, max_epochs=1, model=None, ckpt_path=None, extra_callbacks=(), **trainer_kwargs):
    torch.manual_seed(0)
    model = model or TinyModel()
    trainer = make_trainer(str(tmp_path), [*extra_callbacks, cb], max_epochs=max_epochs, **trainer_kwargs)
    trainer.fit(model, make_loader(), ckpt_path=ckpt_path)
    return trainer, model


def test_step_saves_rotation_meta_and_counters(tmp_path):
    d = str(tmp_path / "run")
    trainer, model = run(tmp_path, CheckpointCallback(d, save_every_n_steps=4, max_to_keep=2), max_epochs=3)
    assert trainer.global_step == 18
    assert steps_of(d) == [16, 18]  # saves at 4, 8, 12, 16 and at train end (18); the newest 2 kept
    assert sorted(f for f in os.listdir(d) if f.endswith(".index")) == ["ckpt-16.index", "ckpt-18.index"]
    state = load_checkpoint(os.path.join(d, "ckpt-18"))
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters"):
        assert key in state
    assert same_weights(state["state_dict"], weights(model))
    counters = our_state(state)
    assert counters["num_saves"] == 5 and counters["last_saved_step"] == 18
    assert set(counters["rng"][0]["save"]) >= {"torch", "numpy", "python"}
    meta = read_meta(os.path.join(d, "ckpt-18"))
    assert meta["framework"] == "lightning" and meta["epoch"] == state["epoch"] == 3 and meta["step"] == 18
    assert meta["model"]["class_path"].endswith("TinyModel") and meta["model"]["hparams"]["lr"] == 0.05
    assert "train_loss" in meta["metrics"]


def test_epoch_end_and_step_saves_never_twice_at_one_step(tmp_path):
    d = str(tmp_path / "run")
    cb = CheckpointCallback(d, save_every_n_steps=6, save_on_epoch_end=True, max_to_keep=None)
    run(tmp_path, cb, max_epochs=3)
    assert steps_of(d) == [6, 12, 18] and cb._trigger.num_saves == 3


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    d = str(tmp_path / "run")
    cb = CheckpointCallback(d, save_every_n_steps=2, save_on_train_end=False, max_to_keep=None)
    trainer, _ = run(tmp_path, cb, max_epochs=2, accumulate_grad_batches=2)
    assert trainer.global_step == 6 and steps_of(d) == [2, 4, 6]


class TwoOptimizerModel(TinyModel):
    """Manual optimization with two optimizers: global_step advances by 2 per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.mse_loss(self.net(x), y))
            opt.step()

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.net[0].parameters(), lr=0.01),
            torch.optim.SGD(self.net[3].parameters(), lr=0.01),
        ]


def test_interval_boundaries_crossed_between_hooks_trigger_once(tmp_path):
    d = str(tmp_path / "run")
    cb = CheckpointCallback(d, save_every_n_steps=3, save_on_train_end=False, max_to_keep=None)
    trainer, _ = run(tmp_path, cb, model=TwoOptimizerModel(), max_epochs=1)
    assert trainer.global_step == 12
    assert steps_of(d) == [4, 6, 10, 12]  # steps seen: 2, 4, 6, 8, 10, 12; boundaries 3, 6, 9, 12


class AdvanceClock(L.Callback):
    """Ten fake seconds per optimizer step (``tests/conftest.py``'s FakeClock)."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.start = clock.now

    def on_train_batch_end(self, trainer, *args) -> None:
        self.clock.now = self.start + 10.0 * trainer.global_step


def test_time_trigger_uses_the_injected_clock(tmp_path, fake_clock):
    d = str(tmp_path / "run")
    clock, start = fake_clock, fake_clock.now
    cb = CheckpointCallback(d, save_every_n_seconds=25, max_to_keep=None, clock=clock)
    run(tmp_path, cb, extra_callbacks=[AdvanceClock(clock)], max_epochs=-1, max_steps=10)
    assert steps_of(d) == [3, 6, 9, 10]
    assert get_checkpoint_state(d).all_model_checkpoint_timestamps[0] == start + 30.0


def test_resume_by_default_and_ckpt_path_last(tmp_path):
    d = str(tmp_path / "run")
    _, reference = run(tmp_path / "ref", CheckpointCallback(str(tmp_path / "ref-run")), max_epochs=2)
    run(tmp_path, CheckpointCallback(d, save_on_epoch_end=True), max_epochs=1)
    trainer, resumed = run(tmp_path, CheckpointCallback(d, save_on_epoch_end=True), max_epochs=2)
    assert trainer.ckpt_path == os.path.join(d, "ckpt-6") and trainer.global_step == 12
    assert same_weights(weights(resumed), weights(reference))

    cb = CheckpointCallback(d, resume=False, save_on_epoch_end=True)
    trainer, _ = run(tmp_path, cb, max_epochs=3, ckpt_path="last")
    assert trainer.ckpt_path == os.path.join(d, "ckpt-12.index") and trainer.global_step == 18
    assert cb._trigger.num_saves == 3  # restored counter (2 saves before) + the save at step 18

    trainer, _ = run(
        tmp_path / "fresh",
        CheckpointCallback(d, resume=False, save_every_n_steps=1000, save_on_train_end=False),
        max_epochs=1,
    )
    assert trainer.ckpt_path is None and trainer.global_step == 6


class StepAccuracyModel(TinyModel):
    """Logs a "train_acc" that grows with every step: the best by it is the newest."""

    def training_step(self, batch, batch_idx):
        self.log("train_acc", float(self.global_step))
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize(("mode", "best"), [("auto", 6), ("max", 6), ("min", 1)])
def test_mode_auto_ranks_an_accuracy_by_its_largest_value(tmp_path, mode, best):
    # Steps 1..6 log train_acc 0..5 (logged before the optimizer step): auto, like Keras, maximises it.
    d = str(tmp_path / "run")
    cb = CheckpointCallback(
        d, save_every_n_steps=1, max_to_keep=1, keep_best=1, monitor="train_acc", mode=mode
    )
    run(tmp_path, cb, model=StepAccuracyModel(), max_epochs=1)
    assert set(steps_of(d)) == {best, 6}
    assert cb.best_model_path == os.path.join(d, f"ckpt-{best}")


def test_default_mode_is_auto_and_minimises_val_loss():
    import inspect

    assert inspect.signature(CheckpointCallback).parameters["mode"].default == "auto"
    assert CheckpointCallback("run")._resolved_mode == "min"


def test_an_unwritable_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cb = CheckpointCallback(str(blocker / "run"), save_every_n_steps=1, resume=False)
    model = TinyModel()
    trainer = make_trainer(str(tmp_path), [cb], max_epochs=1)
    with pytest.raises(CheckpointWriteError, match="Cannot write checkpoints to .*before training"):
        trainer.fit(model, make_loader())
    assert trainer.global_step == 0


def test_keep_best_sets_best_model_path_for_test_best(tmp_path):
    d = str(tmp_path / "run")
    cb = CheckpointCallback(d, save_every_n_steps=1, max_to_keep=1, keep_best=1, monitor="train_loss")
    trainer, model = run(tmp_path, cb, max_epochs=1)
    assert cb.last_model_path == os.path.join(d, "ckpt-6")
    best_step = int(cb.best_model_path.rsplit("-", 1)[1])
    assert set(steps_of(d)) == {best_step, 6}
    [metrics] = trainer.test(model, make_loader(), ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == cb.best_model_path and "test_loss" in metrics


def test_explicit_checkpoint_paths_load(tmp_path):
    d = str(tmp_path / "run")
    run(tmp_path, CheckpointCallback(d, save_every_n_steps=2, max_to_keep=None), max_epochs=1)
    trainer, _ = run(
        tmp_path, CheckpointCallback(d, resume=False), max_epochs=1, ckpt_path=os.path.join(d, "ckpt-4")
    )
    assert trainer.ckpt_path.endswith("ckpt-4") and trainer.global_step == 6
    # without the callback, through the plugin
    torch.manual_seed(0)
    trainer = make_trainer(
        str(tmp_path), [], plugins=[FsspecCheckpointIO()], max_epochs=2, enable_checkpointing=False
    )
    trainer.fit(TinyModel(), make_loader(), ckpt_path=d)
    assert trainer.global_step == 12


@pytest.fixture
def memory_dir():
    url = f"memory://lightning-{uuid.uuid4().hex[:8]}/run"
    yield url
    fs = fsspec.filesystem("memory")
    if fs.exists(url.removeprefix("memory://").rsplit("/", 1)[0]):
        fs.rm(url.removeprefix("memory://").rsplit("/", 1)[0], recursive=True)


def test_async_save_memory_url_prefix_and_storage_options(tmp_path, memory_dir):
    kw = dict(save_every_n_steps=3, async_save=True, prefix="run", storage_options={}, max_to_keep=3)
    _, first = run(tmp_path, CheckpointCallback(memory_dir, **kw), max_epochs=1)
    with CheckpointManager(memory_dir, prefix="run") as mgr:
        assert [p.rsplit("/", 1)[1] for p in mgr.checkpoints] == ["run-3", "run-6"]
        assert same_weights(mgr.restore()["state_dict"], weights(first))
    trainer, _ = run(tmp_path, CheckpointCallback(memory_dir, **kw), max_epochs=2)
    bare = memory_dir.removeprefix("memory://")
    assert trainer.ckpt_path.endswith(f"{bare}/run-6") and trainer.global_step == 12
    trainer, _ = run(
        tmp_path, CheckpointCallback(memory_dir, resume=False, **kw), max_epochs=3, ckpt_path="last"
    )
    assert trainer.ckpt_path.endswith(f"{bare}/run-12.index") and trainer.global_step == 18


class Opaque:
    def __init__(self, value: int) -> None:
        self.value = value


class ConfiguredModel(TinyModel):
    def __init__(self, cfg=None) -> None:
        super().__init__()
        self.save_hyperparameters()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["extra"] = {"shapes": torch.Size([2, 3]), "cfg": AttributeDict(depth=2), "pair": (1, "a")}

    def on_load_checkpoint(self, checkpoint):
        self.loaded_extra = checkpoint["extra"]


def test_unencodable_hparams_are_left_out_with_one_warning(tmp_path):
    cb = CheckpointCallback(str(tmp_path / "run"), save_every_n_steps=2)
    with pytest.warns(UserWarning, match=r"state\['hyper_parameters'\]\['cfg'\].*ignore=.*allow_pickle=True"):
        run(tmp_path, cb, model=ConfiguredModel(cfg=Opaque(1)), max_epochs=1)
    state = load_checkpoint(get_checkpoint_state(str(tmp_path / "run")).model_checkpoint_path)
    assert "cfg" not in state["hyper_parameters"] and state["global_step"] == 6


class OpaqueState(TinyModel):
    def on_save_checkpoint(self, checkpoint):
        checkpoint["extra"] = Opaque(1)


def test_unencodable_state_outside_hparams_raises_type_error_naming_the_key(tmp_path):
    cb = CheckpointCallback(str(tmp_path / "run"), save_every_n_steps=2)
    with pytest.raises(TypeError, match=r"state\['extra'\].*allow_pickle=True"):
        run(tmp_path, cb, model=OpaqueState(), max_epochs=1)
    assert get_checkpoint_state(str(tmp_path / "run")) is None


def test_allow_pickle_and_module_checkpoint_hooks(tmp_path):
    d = str(tmp_path / "run")
    run(
        tmp_path, CheckpointCallback(d, allow_pickle=True), model=ConfiguredModel(cfg=Opaque(7)), max_epochs=1
    )
    model = ConfiguredModel(cfg=Opaque(0))
    run(tmp_path, CheckpointCallback(d, allow_pickle=True), model=model, max_epochs=2)
    assert (
        model.loaded_extra["shapes"] == torch.Size([2, 3])
        and type(model.loaded_extra["shapes"]) is torch.Size
    )
    assert type(model.loaded_extra["cfg"]) is AttributeDict and model.loaded_extra["pair"] == (1, "a")
    hparams = load_checkpoint(os.path.join(d, "ckpt-12"), allow_pickle=True)["hyper_parameters"]
    assert hparams["cfg"].value == 0


def test_save_optimizer_false_resumes_with_fresh_optimizer(tmp_path):
    d = str(tmp_path / "run")
    run(tmp_path, CheckpointCallback(d, save_optimizer=False), max_epochs=1)
    assert "optimizer_states" not in load_checkpoint(os.path.join(d, "ckpt-6"))
    trainer, _ = run(tmp_path, CheckpointCallback(d, save_optimizer=False), max_epochs=2)
    assert trainer.global_step == 12


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    d = str(tmp_path / "run")
    run(tmp_path, CheckpointCallback(d, save_every_n_steps=3), max_epochs=1)
    data = os.path.join(d, "ckpt-6.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) - 4)
        f.write(b"\xff\xff\xff\xff")
    shutil.copytree(d, d + "-copy")
    with pytest.warns(UserWarning, match="ckpt-6"):
        trainer, _ = run(tmp_path, CheckpointCallback(d, save_every_n_steps=3), max_epochs=2)
    assert trainer.ckpt_path == os.path.join(d, "ckpt-3")
    with pytest.warns(UserWarning, match="ckpt-6"):
        trainer, _ = run(
            tmp_path, CheckpointCallback(d + "-copy", resume=False), max_epochs=2, ckpt_path="last"
        )
    assert trainer.ckpt_path == os.path.join(d + "-copy", "ckpt-3.index") and trainer.global_step == 12


class FailAt(L.Callback):
    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == 4:
            raise RuntimeError("boom")


def test_exception_releases_manager_and_io_then_resume_in_same_process(tmp_path):
    from ckpt_callbacks.lightning._io import _DispatchingCheckpointIO

    d = str(tmp_path / "run")
    cb = CheckpointCallback(d, save_every_n_steps=3)
    torch.manual_seed(0)
    trainer = make_trainer(str(tmp_path), [FailAt(), cb], max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyModel(), make_loader())
    assert cb._mgr is None and not isinstance(trainer.strategy.checkpoint_io, _DispatchingCheckpointIO)
    trainer, _ = run(tmp_path, CheckpointCallback(d, save_every_n_steps=3), max_epochs=1)
    assert trainer.ckpt_path == os.path.join(d, "ckpt-3") and trainer.global_step == 6


def test_precision_plugin_state_is_saved_and_restored(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    def plugin():
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))

    d = str(tmp_path / "run")
    run(tmp_path, CheckpointCallback(d), max_epochs=1, plugins=[plugin()])
    saved = load_checkpoint(os.path.join(d, "ckpt-6"))["MixedPrecision"]
    assert saved["scale"] == 1024.0 and saved["_growth_tracker"] == 6
    trainer, _ = run(tmp_path, CheckpointCallback(d), max_epochs=2, plugins=[plugin()])
    assert trainer.precision_plugin.scaler.state_dict()["_growth_tracker"] == 12  # continued, not restarted


def test_callback_pickles_without_live_resources(tmp_path):
    import pickle

    cb = CheckpointCallback(str(tmp_path / "run"), save_every_n_steps=2)
    run(tmp_path, cb, max_epochs=1)
    clone = pickle.loads(pickle.dumps(cb))
    assert (
        clone._trigger.num_saves == cb._trigger.num_saves == 3
        and clone._mgr is None
        and clone.directory == cb.directory
    )


def test_fast_dev_run_neither_saves_nor_resumes(tmp_path):
    d = str(tmp_path / "run")
    run(tmp_path, CheckpointCallback(d, save_every_n_steps=1), max_epochs=1, fast_dev_run=2)
    assert not os.path.exists(os.path.join(d, "checkpoint"))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"save_every_n_steps": 0}, ValueError, "save_every_n_steps must be an int >= 1"),
        ({"save_every_n_steps": True}, ValueError, "save_every_n_steps"),
        ({"save_every_n_seconds": -1}, ValueError, "save_every_n_seconds"),
        ({"max_to_keep": 0}, ValueError, "max_to_keep"),
        ({"keep_checkpoint_every_n_hours": 0}, ValueError, "keep_checkpoint_every_n_hours"),
        ({"keep_best": 2, "monitor": None}, ValueError, "monitor"),
        ({"mode": "up"}, ValueError, "mode"),
        ({"prefix": "a/b"}, ValueError, "prefix"),
        ({"storage_options": "anon"}, TypeError, "storage_options"),
        ({"resume": "yes"}, TypeError, "resume"),
        ({"clock": 5}, TypeError, "clock"),
    ],
)
def test_constructor_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        CheckpointCallback("runs/a", **kwargs)
    with pytest.raises(ValueError, match="directory"):
        CheckpointCallback("")
