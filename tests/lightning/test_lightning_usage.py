"""Lightning as its users use it, under both package names (the ``pl`` fixture).

Both namespaces, ``load_from_checkpoint``, typed hparams (OmegaConf, Counter, ...), SLURM requeue,
``ckpt_path`` over plain HTTP, ``best_model_path`` after fit / validate / test, and the strategy guard.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import functools
import http.server
import os
import subprocess
import sys
import threading
import uuid

import fsspec
import pytest
import torch
from lightning_helpers import ROOT, _TinyModel, make_loader, make_trainer, model_class, same_weights, weights
from omegaconf import DictConfig, ListConfig, OmegaConf

from ckpt_callbacks import load_checkpoint
from ckpt_callbacks.errors import CheckpointNotFoundError
from ckpt_callbacks.lightning import CheckpointCallback, FsspecCheckpointIO, _sharded, load_from_checkpoint
from ckpt_callbacks.lightning._callback import check_strategy


class StepAtStart:
    """Mixin recording the global step at train start (where a resume put it)."""

    def on_train_start(self):
        self.start_step = self.trainer.global_step


class _Recording(StepAtStart, _TinyModel):
    def on_load_checkpoint(self, checkpoint):
        self.loaded_from_step = checkpoint["global_step"]


def fit(pl, tmp_path, callbacks, model=None, ckpt_path=None, **kwargs):
    model = model if model is not None else model_class(pl, _Recording)()
    trainer = make_trainer(str(tmp_path), callbacks, pl=pl, **kwargs)
    trainer.fit(model, make_loader(), make_loader(), ckpt_path=ckpt_path)
    return trainer, model


# ----------------------------------------------------------------------------- 1. both namespaces


def test_callback_and_plugin_are_accepted_and_ckpt_path_last_resumes(pl, tmp_path):
    d = str(tmp_path / "run")
    trainer, _ = fit(pl, tmp_path, [CheckpointCallback(d, save_every_n_steps=3)], max_epochs=1)
    assert isinstance(trainer.checkpoint_callback, pl.callbacks.ModelCheckpoint)
    cb = CheckpointCallback(d, save_every_n_steps=3, resume=False)
    trainer, model = fit(pl, tmp_path, [cb], ckpt_path="last", max_epochs=2)
    assert model.start_step == 6 and model.loaded_from_step == 6 and trainer.global_step == 12

    m = str(tmp_path / "mc")
    mc = pl.callbacks.ModelCheckpoint(dirpath=m, save_last=True)
    trainer, _ = fit(pl, tmp_path, [mc], plugins=[FsspecCheckpointIO()], max_epochs=1)
    assert isinstance(trainer.strategy.checkpoint_io, FsspecCheckpointIO)
    assert load_checkpoint(os.path.join(m, "last.ckpt"))["global_step"] == 6  # our format, pickle-free
    mc = pl.callbacks.ModelCheckpoint(dirpath=m, save_last=True)
    _, model = fit(pl, tmp_path, [mc], plugins=[FsspecCheckpointIO()], ckpt_path="last", max_epochs=2)
    assert model.start_step == 6


@pytest.mark.parametrize("first", ["pytorch_lightning", "lightning"])
def test_import_binds_only_the_namespace_in_use(first, tmp_path):
    other = "lightning" if first == "pytorch_lightning" else "pytorch_lightning"
    code = f"""
import sys, pickle
import ckpt_callbacks.lightning as cl
assert "lightning" not in sys.modules and "pytorch_lightning" not in sys.modules, "eager import"
import {first} as pl_ns
pl = pl_ns if {first!r} == "pytorch_lightning" else pl_ns.pytorch
cb = cl.CheckpointCallback({str(tmp_path)!r}, save_every_n_steps=1)
io = cl.FsspecCheckpointIO()
assert {other!r} not in sys.modules, "the other namespace was imported"
assert isinstance(cb, pl.callbacks.ModelCheckpoint) and isinstance(cb, cl.CheckpointCallback)
assert type(pickle.loads(pickle.dumps(cb))) is type(cb) and type(pickle.loads(pickle.dumps(io))) is type(io)
pl.Trainer(callbacks=[cb], plugins=[io], logger=False, enable_checkpointing=True)
print("OK")
"""
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_a_callback_made_before_its_trainers_package_was_imported_fails_loudly(tmp_path):
    code = f"""
import lightning.pytorch as L
from ckpt_callbacks.lightning import CheckpointCallback
cb = CheckpointCallback({str(tmp_path)!r}, save_every_n_steps=1)
import pytorch_lightning as pl
from pytorch_lightning.demos.boring_classes import BoringModel
model = BoringModel()
trainer = pl.Trainer(callbacks=[cb], max_steps=1, logger=False, enable_progress_bar=False)
try:
    trainer.fit(model)
except TypeError as e:
    assert "Import 'pytorch_lightning' before creating the CheckpointCallback" in str(e), e
    print("REFUSED")
"""
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "REFUSED" in out.stdout, out.stderr[-2000:]


# ----------------------------------------------------------------------------- 2. load_from_checkpoint


class _Loadable(_TinyModel):
    def on_load_checkpoint(self, checkpoint):
        self.hook_saw_step = checkpoint["global_step"]


def _marker_run(pl, tmp_path, base):
    mc = pl.callbacks.ModelCheckpoint(dirpath=base, save_last=True)
    trainer, model = fit(pl, tmp_path, [mc], model=model_class(pl, _Loadable)(lr=0.01), plugins=[FsspecCheckpointIO()],
                         max_epochs=1)  # fmt: skip
    return model


@pytest.mark.parametrize("form", ["prefix", "index", "directory", "marker", "memory_url"])
def test_load_from_checkpoint_every_path_form(pl, tmp_path, form):
    cls = model_class(pl, _Loadable)
    d = str(tmp_path / "run")
    if form in ("marker", "memory_url"):
        base = f"memory://lfc-{uuid.uuid4().hex[:8]}" if form == "memory_url" else d
        trained = _marker_run(pl, tmp_path, base)
        path = f"{base}/last.ckpt"
    else:
        _, trained = fit(pl, tmp_path, [CheckpointCallback(d, save_every_n_steps=3)], model=cls(lr=0.01),
                         max_epochs=1)  # fmt: skip
        path = {"prefix": f"{d}/ckpt-6", "index": f"{d}/ckpt-6.index", "directory": d}[form]
    model = load_from_checkpoint(cls, path)
    assert type(model) is cls and model.hparams.lr == 0.01 and model.hook_saw_step == 6
    assert same_weights(weights(model), weights(trained))


def test_load_from_checkpoint_semantics(pl, tmp_path):
    cls = model_class(pl, _Loadable)
    d = str(tmp_path / "run")
    fit(pl, tmp_path, [CheckpointCallback(d, save_every_n_steps=3)], model=cls(lr=0.01), max_epochs=1)
    model = load_from_checkpoint(cls, d, map_location="cpu", lr=0.5)  # keyword overrides the saved hparam
    assert model.hparams.lr == 0.5 and next(model.parameters()).device.type == "cpu"
    hparams_file = tmp_path / "hparams.yaml"
    hparams_file.write_text("lr: 0.25\ndropout: 0.0\n")
    assert load_from_checkpoint(cls, d, hparams_file=str(hparams_file)).hparams.lr == 0.25

    class Wider(_Loadable):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.extra = torch.nn.Linear(2, 2)

    wider = type("Wider", (Wider, pl.LightningModule), {})
    with pytest.raises(RuntimeError, match="extra"):
        load_from_checkpoint(wider, d)
    assert load_from_checkpoint(wider, d, strict=False).hparams.lr == 0.01
    with pytest.raises(CheckpointNotFoundError, match="No ckpt_callbacks checkpoint"):
        load_from_checkpoint(cls, str(tmp_path / "nowhere"))


class _DataModule:
    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self):
        return make_loader()

    def state_dict(self):
        return {"seen": 3}

    def load_state_dict(self, state_dict):
        self.loaded_state = state_dict


def test_datamodule_load_from_checkpoint(pl, tmp_path):
    dm_cls = type("DataModule", (_DataModule, pl.LightningDataModule), {})
    d = str(tmp_path / "run")
    trainer = make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_epochs=1,
                           limit_val_batches=0)  # fmt: skip
    trainer.fit(model_class(pl)(), datamodule=dm_cls(batch_size=4))
    dm = load_from_checkpoint(dm_cls, d)
    assert type(dm) is dm_cls and dm.hparams.batch_size == 4 and dm.loaded_state == {"seen": 3}


# ----------------------------------------------------------------------------- 3. hparams


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Optim:
    name: str = "adam"
    betas: tuple = (0.9, 0.99)


class _Typed(_TinyModel):
    def __init__(self, cfg=None, counts=None, groups=None, ordered=None, color=None, shape=None, tags=None,
                 optim=None, args=None, lr=0.05):  # fmt: skip
        super().__init__(lr=lr)
        self.save_hyperparameters()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 4]),
        }


def test_hparams_round_trip_with_their_types(pl, tmp_path):
    cls = model_class(pl, _Typed)
    cfg = OmegaConf.create({"lr": 0.1, "scaled": "${lr}", "layers": [4, 8], "nested": {"k": [1, {"a": 2}]}})
    groups = collections.defaultdict(list, {"a": [1]})
    hp = dict(cfg=cfg, counts=collections.Counter({"x": 2}), groups=groups, ordered=collections.OrderedDict(b=1, a=2),
              color=Color.RED, shape=(1, 2), tags={"s", "t"}, optim=Optim(), args=argparse.Namespace(depth=3))  # fmt: skip
    d = str(tmp_path / "run")
    fit(pl, tmp_path, [CheckpointCallback(d, save_every_n_steps=3)], model=cls(**hp), max_epochs=1)
    got = load_from_checkpoint(cls, d).hparams
    assert type(got) is type(cls(**hp).hparams)  # the namespace's AttributeDict
    assert type(got.cfg) is DictConfig and type(got.cfg.layers) is ListConfig and got.cfg.nested.k[1].a == 2
    assert OmegaConf.to_container(got.cfg, resolve=False)["scaled"] == "${lr}" and got.cfg.scaled == 0.1
    assert type(got.counts) is collections.Counter and got.counts == {"x": 2}
    assert type(got.groups) is collections.defaultdict and got.groups.default_factory is list
    assert type(got.ordered) is collections.OrderedDict and list(got.ordered) == ["b", "a"]
    assert got.color is Color.RED and got.shape == (1, 2) and got.tags == {"s", "t"}
    assert got.optim == Optim() and type(got.args) is argparse.Namespace and got.args.depth == 3
    state = load_checkpoint(f"{d}/ckpt-6")
    from ckpt_callbacks.lightning._convert import from_tree

    milestones = from_tree(state)["lr_schedulers"][0]["milestones"]
    assert type(milestones) is collections.Counter and milestones == {2: 1, 4: 2}


def test_a_whole_dictconfig_as_hparams(pl, tmp_path):
    class Hydra(_TinyModel):
        def __init__(self, cfg):
            super().__init__(lr=cfg.lr)
            self.save_hyperparameters(cfg)

    cls = type("Hydra", (Hydra, pl.LightningModule), {})
    d = str(tmp_path / "run")
    cfg = OmegaConf.create({"lr": 0.02, "sizes": [1, 2], "alias": "${lr}"})
    fit(pl, tmp_path, [CheckpointCallback(d, save_every_n_steps=3)], model=cls(cfg), max_epochs=1)
    cb = CheckpointCallback(d, save_every_n_steps=3)
    model = cls(OmegaConf.create({"lr": 0.02}))
    fit(pl, tmp_path, [cb], model=model, max_epochs=2)  # a resume: the config still reads as attributes
    assert model.trainer.global_step == 12
    from ckpt_callbacks.lightning._convert import from_tree

    first = from_tree(load_checkpoint(f"{d}/ckpt-6"))
    assert type(first["hyper_parameters"]) is DictConfig and first["hyper_parameters"].alias == 0.02
    assert OmegaConf.to_container(first["hyper_parameters"])["alias"] == "${lr}"
    assert first["hparams_type"] is DictConfig
    assert load_from_checkpoint(cls, d).hparams.lr == 0.02


class _WithBackbone(_TinyModel):
    def __init__(self, backbone, lr=0.05):
        super().__init__(lr=lr)
        self.save_hyperparameters()
        self.backbone = backbone


def test_a_module_in_hparams_never_stops_training(pl, tmp_path):
    cls = model_class(pl, _WithBackbone)
    d = str(tmp_path / "run")
    with pytest.warns(UserWarning, match=r"\['backbone'\].*torch\.nn.*ignore=.*allow_pickle=True") as record:
        fit(pl, tmp_path, [CheckpointCallback(d, save_every_n_steps=2)], model=cls(backbone=torch.nn.Linear(1, 1)),
            max_epochs=1)  # fmt: skip
    assert sum("cannot be saved without pickle" in str(w.message) for w in record) == 1  # once, not per save
    with pytest.raises(
        TypeError, match=r"missing from the checkpoint: state\['hyper_parameters'\]\['backbone'\]"
    ):
        load_from_checkpoint(cls, d)
    model = load_from_checkpoint(cls, d, backbone=torch.nn.Linear(1, 1))
    assert model.hparams.lr == 0.05


# ----------------------------------------------------------------------------- 4. SLURM requeue


def test_slurm_requeue_hpc_with_the_plugin(pl, tmp_path):
    root = str(tmp_path / "root")
    trainer, _ = fit(pl, tmp_path, [], plugins=[FsspecCheckpointIO()], default_root_dir=root, max_epochs=1,
                     enable_checkpointing=False)  # fmt: skip
    connector = trainer._checkpoint_connector
    for _ in range(2):  # hpc_ckpt_1.ckpt, then hpc_ckpt_2.ckpt: our side files never add digits
        trainer.save_checkpoint(connector.hpc_save_path(root))
    assert connector.hpc_save_path(root).endswith("hpc_ckpt_3.ckpt")
    assert not [n for n in os.listdir(root) if "ckpt_" in n and not n.startswith("hpc_ckpt_")]
    _, model = fit(pl, tmp_path, [], plugins=[FsspecCheckpointIO()], default_root_dir=root, max_epochs=2,
                   enable_checkpointing=False, ckpt_path="hpc")  # fmt: skip
    assert model.start_step == 6


# ----------------------------------------------------------------------------- 5. http without ranges


class _NoRangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves whole files only: a Range header is ignored (200 with the full body)."""

    def log_message(self, *args):
        pass


def test_ckpt_path_over_http_without_range_support(pl, tmp_path):
    d = tmp_path / "run"
    fit(pl, tmp_path, [CheckpointCallback(str(d), save_every_n_steps=3)], max_epochs=1)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_NoRangeHandler, directory=str(d))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ckpt-6"
        _, model = fit(pl, tmp_path, [], plugins=[FsspecCheckpointIO()], ckpt_path=url, max_epochs=2,
                       enable_checkpointing=False)  # fmt: skip
        assert model.start_step == 6
        assert load_from_checkpoint(model_class(pl, _Recording), url).hparams.lr == 0.05
    finally:
        server.shutdown()
        server.server_close()
        fsspec.filesystem("http").clear_instance_cache()


# ----------------------------------------------------------------------------- 6. best_model_path


@pytest.mark.parametrize("keep_best", [None, 1])
def test_best_model_path_after_fit_validate_and_test(pl, tmp_path, keep_best):
    d = str(tmp_path / "run")
    cb = CheckpointCallback(d, save_every_n_steps=2, max_to_keep=1, keep_best=keep_best, monitor="val_loss")
    trainer, model = fit(pl, tmp_path, [cb], max_epochs=3, val_check_interval=2)
    assert os.path.exists(cb.best_model_path + ".index")
    if keep_best:
        assert cb.best_model_score is not None
    best = cb.best_model_path
    trainer.validate(model, make_loader(), ckpt_path="best")
    assert cb.best_model_path == best
    for _ in range(2):
        trainer.test(model, make_loader(), ckpt_path="best")
        assert cb.best_model_path == best and os.path.exists(best + ".index")
    # A resumed run reports checkpoints that exist, not those of the state it saved.
    cb2 = CheckpointCallback(d, save_every_n_steps=2, max_to_keep=1, keep_best=keep_best, monitor="val_loss")
    trainer2, model2 = fit(pl, tmp_path, [cb2], max_epochs=3, val_check_interval=2)
    assert os.path.exists(cb2.best_model_path + ".index")
    trainer2.test(model2, make_loader(), ckpt_path="best")


# ----------------------------------------------------------------------------- 7. strategy guard


def _sharded_strategies(pl):
    strategies = pl.strategies
    fsdp = strategies.FSDPStrategy()
    deepspeed = object.__new__(strategies.DeepSpeedStrategy)  # its __init__ needs the deepspeed package
    model_parallel = strategies.ModelParallelStrategy()
    return [fsdp, deepspeed, model_parallel]


def test_strategy_guard(pl):
    for strategy in _sharded_strategies(pl):
        with pytest.raises(ValueError, match=f"Received: strategy={type(strategy).__name__}"):
            check_strategy(strategy)
        check_strategy(strategy, sharded=True)  # the seam a sharded save path relaxes
    check_strategy(pl.strategies.DDPStrategy())
    check_strategy(pl.strategies.SingleDeviceStrategy(torch.device("cpu")))


def test_setup_takes_the_sharded_path_for_model_parallel_only(pl):
    # What CheckpointCallback.setup does: check_strategy(strategy, sharded=_sharded.applies(strategy)).
    # ModelParallelStrategy saves through ckpt_callbacks.distributed (test_lightning_sharded.py);
    # FSDPStrategy and DeepSpeedStrategy are still refused with the ValueError naming them.
    fsdp, deepspeed, model_parallel = _sharded_strategies(pl)
    assert _sharded.applies(model_parallel)
    check_strategy(model_parallel, sharded=_sharded.applies(model_parallel))
    for strategy in (fsdp, deepspeed):
        assert not _sharded.applies(strategy)
        with pytest.raises(ValueError, match=f"Received: strategy={type(strategy).__name__}"):
            check_strategy(strategy, sharded=_sharded.applies(strategy))
    assert not _sharded.applies(pl.strategies.DDPStrategy())
