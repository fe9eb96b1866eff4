"""Each private Lightning API ``ckpt_callbacks.lightning._compat`` relies on, checked in both namespaces.

If Lightning renames or changes one of these, the test of that use fails here, by name, instead of a
silent fallback at training time.
"""

from __future__ import annotations

import ast
import inspect
import os
import re

import pytest
import torch
from lightning_helpers import make_loader, make_trainer, model_class

from ckpt_callbacks.lightning import _compat

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "ckpt_callbacks", "lightning")  # fmt: skip


@pytest.fixture
def trainer(pl, tmp_path):
    t = make_trainer(str(tmp_path), [], pl=pl, max_steps=2, limit_val_batches=0)
    t.fit(model_class(pl)(), make_loader())
    return t


def test_checkpoint_connector_dump_and_restore(pl, trainer):
    checkpoint = _compat.dump_checkpoint(trainer)
    assert checkpoint["global_step"] == 2 and "state_dict" in checkpoint and "loops" in checkpoint
    connector = trainer._checkpoint_connector
    for name in ("restore_model", "restore_datamodule", "restore_callbacks"):
        assert callable(getattr(connector, name)), name
    assert hasattr(connector, "_ckpt_path") and hasattr(connector, "_loaded_checkpoint")


def test_migrate_checkpoint(pl):
    ns = _compat.namespace_of(pl.Trainer)
    current = {"global_step": 1, "state_dict": {}, "pytorch-lightning_version": pl.__version__}
    assert _compat.migrate_checkpoint(ns, current, None)["global_step"] == 1
    old = {"global_step": 1, "pytorch-lightning_version": "1.9.0", "state_dict": {}, "loops": {}}
    migrated = _compat.migrate_checkpoint(ns, old, None)  # Lightning's upgrades ran (and stamped it)
    assert migrated["pytorch-lightning_version"] == pl.__version__ and migrated["global_step"] == 1


def test_fit_loop_data_and_sampler_epoch(pl, tmp_path):
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(_compat.fit_data(trainer))

    trainer = make_trainer(str(tmp_path), [Probe()], pl=pl, max_steps=1, limit_val_batches=0)
    trainer.fit(model_class(pl)(), make_loader())
    loader, fetcher, stateful = seen[0]
    assert type(loader).__name__ == "CombinedLoader" and stateful is False
    assert fetcher is not None and hasattr(fetcher, "iterator")
    sampler = torch.utils.data.DistributedSampler(range(4), num_replicas=1, rank=0)
    dl = torch.utils.data.DataLoader(range(4), sampler=sampler)
    _compat.set_sampler_epoch(trainer, dl, 3)
    assert sampler.epoch == 3


def test_load_state(pl):
    cls = model_class(pl)
    model = cls(lr=0.3)
    checkpoint = {"state_dict": model.state_dict(), cls.CHECKPOINT_HYPER_PARAMS_KEY: {"lr": 0.3}}
    loaded = _compat.load_state(cls, checkpoint, None)
    assert type(loaded) is cls and loaded.hparams.lr == 0.3
    saving = _compat.submodule(_compat.namespace_of(cls), "pytorch", "core.saving")
    assert callable(saving.load_hparams_from_yaml) and callable(saving.load_hparams_from_tags_csv)


def test_hpc_versions_read_the_digits_after_ckpt_in_every_name(pl, trainer, tmp_path):
    d = tmp_path / "hpc"
    d.mkdir()
    (d / "hpc_ckpt_2.ckpt").write_bytes(b"")
    (d / "hpc_ckpt+_2.ckpt.0123abcd.data-00000-of-00001").write_bytes(b"")  # our side-file spelling
    assert trainer._checkpoint_connector.hpc_save_path(str(d)).endswith("hpc_ckpt_3.ckpt")
    (d / f"x.{_compat.HPC_NAME_KEY}77").write_bytes(b"")  # the assumption: any name with "ckpt_" counts
    assert trainer._checkpoint_connector.hpc_save_path(str(d)).endswith("hpc_ckpt_78.ckpt")


def test_bases_and_state_key(pl):
    for role in ("callback", "checkpoint_io"):
        assert isinstance(_compat.base_class(role, _compat.namespace_of(pl.Trainer)), type)
    assert callable(pl.callbacks.ModelCheckpoint._generate_state_key)
    assert "_find_last_checkpoints" in vars(pl.callbacks.ModelCheckpoint)


def test_model_checkpoint_seams_of_the_drop_in(pl, tmp_path):
    """What ``ckpt_callbacks.lightning.ModelCheckpoint`` overrides or calls on Lightning's class."""
    base = pl.callbacks.ModelCheckpoint
    for name in ("_save_checkpoint", "_save_topk_checkpoint", "_remove_checkpoint", "file_exists",
                 "_get_metric_interpolated_filepath_name", "_monitor_candidates", "_find_last_checkpoints",
                 "on_validation_end", "on_exception", "on_train_end", "load_state_dict"):  # fmt: skip
        assert callable(getattr(base, name)), name
    assert isinstance(vars(base)["_link_checkpoint"], staticmethod)
    cb = base(dirpath=None)
    trainer = make_trainer(str(tmp_path), [cb], pl=pl, max_steps=1)
    assert _compat.resolve_ckpt_dir(cb, trainer) == os.path.join(str(tmp_path), "checkpoints")
    _compat.warn_if_dir_not_empty(cb, str(tmp_path))
    with pytest.raises(Exception) as info:
        base(save_top_k=-2)
    error = _compat.as_value_error(info.value)
    assert isinstance(error, ValueError) and isinstance(error, type(info.value))


def test_private_lightning_names_are_used_only_in_compat():
    """No ``_``-prefixed import from Lightning, and no private Trainer attribute, outside _compat.py."""
    private_attr = re.compile(
        r"\.(_checkpoint_connector|_combined_loader|_data_fetcher|_load_state|_pl_migrate)"
    )
    for name in sorted(os.listdir(PACKAGE)):
        if not name.endswith(".py") or name == "_compat.py":
            continue
        source = open(os.path.join(PACKAGE, name)).read()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in (
                "lightning", "pytorch_lightning", "lightning_fabric"
            ):  # fmt: skip
                assert not any(a.name.startswith("_") for a in node.names), (name, node.module)
        assert not private_attr.search(source), (name, private_attr.search(source).group(0))


def test_compat_does_nothing_at_import():
    source = inspect.getsource(_compat)
    top_imports = [n for n in ast.parse(source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [n for n in top_imports if "lightning" in ast.dump(n)]
