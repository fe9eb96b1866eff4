"""Resume reads the checkpoint's weights straight into the live module's Parameters (SPEC §2.1)."""

from __future__ import annotations

import os

import torch
from lightning_helpers import _TinyModel, make_loader, make_trainer, model_class

from ckpt_callbacks import load_checkpoint
from ckpt_callbacks.lightning import CheckpointCallback


class _Watched(_TinyModel):
    """Records, when Lightning hands it the resumed checkpoint, whether its values are the module's
    own Parameters, their memory addresses and their values then (before ``load_state_dict``)."""

    def on_load_checkpoint(self, checkpoint):
        own = self.state_dict(keep_vars=True)
        self.same_objects = all(checkpoint["state_dict"].get(k) is v for k, v in own.items())
        self.ptrs_at_load = {k: v.data_ptr() for k, v in own.items()}
        self.values_at_load = {k: v.detach().clone() for k, v in own.items()}

    def on_train_start(self):
        self.start_step = self.trainer.global_step
        self.values_at_start = {k: v.detach().clone() for k, v in self.state_dict().items()}


class _Extra(_Watched):
    """A module with a buffer the checkpoints lack (outside the optimizer), loaded non-strictly."""

    def __init__(self) -> None:
        super().__init__()
        self.strict_loading = False
        self.register_buffer("extra", torch.full((3,), 7.0))


def test_resume_restores_into_the_parameters_memory(pl, tmp_path):
    d = str(tmp_path / "run")
    make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=1).fit(
        model_class(pl, _Watched)(), make_loader()
    )
    saved = load_checkpoint(os.path.join(d, "ckpt-6"))["state_dict"]

    model = model_class(pl, _Watched)()
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert not all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())  # fresh init
    trainer = make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=2)
    trainer.fit(model, make_loader())

    assert model.same_objects  # the checkpoint's tensors are the Parameters themselves: read in place
    assert model.ptrs_at_load == ptrs
    assert all(torch.equal(model.values_at_load[k], saved[k]) for k in saved)
    assert model.start_step == 6 and saved.keys() == model.values_at_start.keys()
    assert all(torch.equal(model.values_at_start[k], saved[k]) for k in saved)  # bit-exact
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs


def test_resume_of_a_module_with_extra_keys_falls_back_to_the_normal_load(pl, tmp_path):
    d = str(tmp_path / "run")
    make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=1).fit(
        model_class(pl, _Watched)(), make_loader()
    )
    saved = load_checkpoint(os.path.join(d, "ckpt-6"))["state_dict"]

    model = model_class(pl, _Extra)()
    trainer = make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=2)
    trainer.fit(model, make_loader())

    assert not model.same_objects  # not in place: the strict check refused before writing anything
    assert model.start_step == 6
    assert all(torch.equal(model.values_at_start[k], saved[k]) for k in saved)
    assert torch.equal(model.values_at_start["extra"], torch.full((3,), 7.0))


def test_async_callback_prepares_snapshot_buffers_after_the_first_step(pl, tmp_path):
    from ckpt_callbacks._callbacks import _callback_config

    cb = CheckpointCallback(str(tmp_path / "run"), save_every_n_steps=3, async_save=True)
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            # Lightning runs checkpoint callbacks last: look at the next batch, after the first step's hooks.
            if batch_idx == 1:
                mgr = cb._mgr
                mgr._buffers.wait()  # the preparation runs in the background; join it to look
                seen.append((mgr in _callback_config._PREPARED, mgr._buffers.get("state_dict/net.0.weight")))

    model = model_class(pl, _Watched)()
    make_trainer(str(tmp_path), [cb, Probe()], pl=pl, max_epochs=1).fit(model, make_loader())
    prepared, buffer = seen[0]
    assert prepared and buffer is not None and buffer.shape == tuple(model.net[0].weight.shape)
    saved = load_checkpoint(str(tmp_path / "run" / "ckpt-6"))["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
