"""What a newcomer meets with Lightning: metrics in `ckpt-callbacks ls`, warnings at their own line,
another tool's `.ckpt` named as such."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from lightning_helpers import make_loader, make_trainer, model_class

from ckpt_callbacks import IncompatibleCheckpointError
from ckpt_callbacks._cli._main import main
from ckpt_callbacks.lightning import CheckpointCallback, load_from_checkpoint


class _Logging:
    """Logs a scalar tensor, a float, a non-finite value and a vector (which is no metric)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        self.log("lr", 0.05)
        self.log("nan_metric", float("nan"))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_ls_shows_what_lightning_logged_at_the_save(tmp_path, pl, capsys):
    d = tmp_path / "run"
    trainer = make_trainer(str(tmp_path), [CheckpointCallback(d, save_every_n_steps=3)], pl=pl, max_steps=6)
    trainer.fit(model_class(pl, _Logging)(), make_loader())
    capsys.readouterr()
    assert main(["ls", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    metrics = [c["metrics"] for c in doc["checkpoints"]]
    assert [sorted(m) for m in metrics] == [["lr", "nan_metric", "train_loss"]] * 2, metrics
    assert all(isinstance(m["train_loss"], float) and m["lr"] == pytest.approx(0.05) for m in metrics)
    assert all(m["nan_metric"] == "nan" for m in metrics)  # strict JSON: non-finite as strings
    assert main(["ls", str(d)]) == 0
    assert "train_loss=" in capsys.readouterr().out


class Opaque:
    """A picklable object of no type the checkpoint can hold without pickle."""


class _Unsaveable:
    """Hyper-parameters that cannot be saved without pickle: a warning at every save's first sight."""

    def __init__(self, fn=None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_warning_during_fit_names_the_users_line(tmp_path, pl):
    trainer = make_trainer(
        str(tmp_path), [CheckpointCallback(tmp_path / "run", save_every_n_steps=3)], pl=pl, max_steps=3
    )
    model = model_class(pl, _Unsaveable)(fn=Opaque())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, make_loader())
    ours = [w for w in caught if "cannot be saved without pickle" in str(w.message)]
    assert ours, [str(w.message) for w in caught]
    assert {w.filename for w in ours} == {os.path.abspath(__file__)}, [(w.filename, w.lineno) for w in ours]


def test_a_torch_save_file_is_named_the_same_by_the_cli_and_load_from_checkpoint(tmp_path, pl, capsys):
    path = tmp_path / "last.ckpt"
    trainer = make_trainer(str(tmp_path), [], pl=pl, max_steps=1, enable_checkpointing=False)
    cls = model_class(pl)
    trainer.fit(cls(), make_loader())
    trainer.save_checkpoint(path)
    with pytest.raises(IncompatibleCheckpointError) as info:
        load_from_checkpoint(cls, path)
    message = str(info.value)
    assert "torch.save file" in message and "load_from_checkpoint(path)" in message
    for command in (["inspect"], ["verify"], ["ls"], ["gc"], ["export", "--to", "npz"]):
        capsys.readouterr()
        argv = [command[0], str(path), *command[1:]] + (
            [str(tmp_path / "o.npz")] if command[0] == "export" else []
        )
        assert main(argv) == 2, command
        assert capsys.readouterr().err.strip() == f"error: {message}"


def test_a_file_passed_as_the_directory_is_named_as_a_file(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="not a file") as info:
        CheckpointCallback(path)
    assert "existing file: a torch.save file" in str(info.value) and "Errno" not in str(info.value)
