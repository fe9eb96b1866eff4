"""Tiny models, data and trainers shared by the Lightning tests and their subprocess scripts."""

from __future__ import annotations

import os
import sys
import warnings

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*litlogger.*")

N_SAMPLES = 48
BATCH = 8  # 6 batches per epoch


class _TinyModel:
    """Linear-ReLU-Dropout-Linear regressor with Adam and a StepLR schedule."""

    def __init__(self, dropout: float = 0.0, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(8, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return {
            "optimizer": opt,
            "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
        }


TinyModel = type("TinyModel", (_TinyModel, L.LightningModule), {"__module__": __name__})
_MODELS: dict = {}


def model_class(pl, mixin: type = _TinyModel) -> type:
    """``mixin`` (TinyModel by default) as a LightningModule of namespace ``pl`` (cached)."""
    key = (pl.__name__, mixin)
    if key not in _MODELS:
        if mixin is _TinyModel and pl.LightningModule is L.LightningModule:
            _MODELS[key] = TinyModel
        else:
            _MODELS[key] = type(
                mixin.__name__.lstrip("_"), (mixin, pl.LightningModule), {"__module__": __name__}
            )
    return _MODELS[key]


def make_loader(shuffle: bool = False) -> DataLoader:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_SAMPLES, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=shuffle)


def make_trainer(root: str, callbacks: list, pl=None, **kwargs) -> L.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return (pl or L).Trainer(callbacks=callbacks, **options)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    env["PYTHONWARNINGS"] = "ignore"
    env.pop("LOCAL_RANK", None)
    return env


PYTHON = sys.executable
