"""A real Trainer.fit with a frozen backbone: later checkpoints point into the first one's data file
for the frozen weights, and resume / load_from_checkpoint restore them exactly (SPEC §3.1)."""

from __future__ import annotations

import os

import torch
from lightning_helpers import make_loader, make_trainer, model_class

from ckpt_callbacks._checkpoint._checkpoint_read import read_index
from ckpt_callbacks._manager._state import read_state
from ckpt_callbacks._storage import Storage
from ckpt_callbacks.lightning import CheckpointCallback, load_from_checkpoint


class _FrozenBackbone:
    """A frozen 4 -> 256 backbone (most of the bytes) and a trained 256 -> 1 head."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = torch.nn.Linear(4, 256)
        self.backbone.requires_grad_(False)
        self.head = torch.nn.Linear(256, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(torch.relu(self.backbone(x))), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.head.parameters(), lr=self.hparams.lr)


def test_fit_with_a_frozen_backbone_writes_it_once_and_resumes_exactly(pl, tmp_path):
    cls = model_class(pl, _FrozenBackbone)
    d = str(tmp_path / "ckpts")
    torch.manual_seed(0)
    model = cls()
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    cb = CheckpointCallback(d, save_every_n_steps=2, max_to_keep=2)
    make_trainer(str(tmp_path), [cb], pl=pl, max_epochs=1).fit(model, make_loader())

    storage = Storage(d)
    state, records, _ = read_state(storage)
    latest = state.model_checkpoint_path
    index = read_index(storage, latest)
    where = {n: index["files"][t["file"]]["name"] for n, t in index["tensors"].items() if "file" in t}
    frozen_files = {f for n, f in where.items() if "backbone" in n}
    assert frozen_files == {"ckpt-2.data-00000-of-00001"}  # written by the first save only
    assert all(f.startswith(latest + ".") for n, f in where.items() if "head" in n)
    assert {r.name: r.refs for r in records}[latest] == ("ckpt-2.data-00000-of-00001",)
    assert "ckpt-2.index" not in os.listdir(d) and "ckpt-2.data-00000-of-00001" in os.listdir(d)

    torch.manual_seed(1)  # another initialisation: the resume must bring the frozen weights back
    resumed = cls()
    cb2 = CheckpointCallback(d, save_every_n_steps=2, max_to_keep=2)
    make_trainer(str(tmp_path), [cb2], pl=pl, max_epochs=2).fit(resumed, make_loader())
    for k, v in resumed.backbone.state_dict().items():
        assert torch.equal(v, frozen[k])
    loaded = load_from_checkpoint(cls, d)
    assert torch.equal(loaded.head.weight, resumed.head.weight)
    assert torch.equal(loaded.backbone.weight, frozen["weight"])
