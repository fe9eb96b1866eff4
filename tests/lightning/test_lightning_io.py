"""FsspecCheckpointIO: our format at any fsspec URL, and Lightning's own ModelCheckpoint on top of it."""

from __future__ import annotations

import os
import uuid

import fsspec
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_helpers import TinyModel, make_loader, make_trainer, same_weights, weights

from ckpt_callbacks import list_variables, load_checkpoint
from ckpt_callbacks._api._resolve import read_meta
from ckpt_callbacks._cli._main import main as cli_main
from ckpt_callbacks.errors import CheckpointNotFoundError, IncompatibleCheckpointError
from ckpt_callbacks.lightning import FsspecCheckpointIO


@pytest.fixture(params=["local", "memory"])
def base(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "io")
        return
    url = f"memory://ckpt-io-{uuid.uuid4().hex[:8]}"
    yield url
    fsspec.filesystem("memory").rm(url.removeprefix("memory://"), recursive=True)


def names(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))


def sample_checkpoint(step: int = 10) -> dict:
    model = torch.nn.Linear(3, 2)
    return {
        "epoch": 0,
        "global_step": step,
        "state_dict": model.state_dict(),
        "optimizer_states": [torch.optim.Adam(model.parameters(), betas=(0.8, 0.9)).state_dict()],
        "hyper_parameters": {"lr": 0.1},
    }


def test_save_load_remove_round_trip(base):
    io = FsspecCheckpointIO()
    path = f"{base}/epoch=0-step=10.ckpt"
    ckpt = sample_checkpoint()
    io.save_checkpoint(ckpt, path)
    files = names(base)
    assert "epoch=0-step=10.ckpt" in files
    assert sum(f.endswith(".index") for f in files) == 1 and sum(".data-" in f for f in files) == 1
    loaded = io.load_checkpoint(path)
    assert same_weights(loaded["state_dict"], ckpt["state_dict"])
    assert loaded["optimizer_states"][0]["param_groups"][0]["betas"] == (0.8, 0.9)
    assert loaded["hyper_parameters"] == {"lr": 0.1} and loaded["global_step"] == 10
    (meta_name,) = [f for f in files if f.endswith(".meta")]
    meta = read_meta(f"{base}/{meta_name[: -len('.meta')]}")
    assert meta["framework"] == "lightning" and meta["step"] == 10
    assert meta["model"]["hparams"] == {"lr": 0.1} and meta["epoch"] == ckpt["epoch"]
    io.remove_checkpoint(path)
    assert names(base) == []
    with pytest.raises(CheckpointNotFoundError):
        io.load_checkpoint(path)


def test_resaving_a_path_replaces_it_and_cleans_up(base):
    io = FsspecCheckpointIO()
    path = f"{base}/last.ckpt"
    io.save_checkpoint(sample_checkpoint(1), path)
    fs, root = fsspec.core.url_to_fs(base)
    # leftovers of a save that crashed before its marker, plus files that are not ours
    fs.pipe_file(f"{root}/last.ckpt.0badc0de.data-00000-of-00001", b"partial")
    fs.pipe_file(f"{root}/last.ckpt.notes.txt", b"keep me")
    fs.pipe_file(f"{root}/other.ckpt.0badc0de.index", b"keep me")
    io.save_checkpoint(sample_checkpoint(2), path)
    assert io.load_checkpoint(path)["global_step"] == 2
    files = names(base)
    assert sum(f.startswith("last.ckpt.") and f.endswith(".index") for f in files) == 1
    assert "last.ckpt.0badc0de.data-00000-of-00001" not in files
    assert {"last.ckpt.notes.txt", "other.ckpt.0badc0de.index"} <= set(files)


def test_loads_core_checkpoint_paths_and_directories(tmp_path):
    from ckpt_callbacks import CheckpointManager
    from ckpt_callbacks.lightning._convert import to_tree

    with CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(to_tree(sample_checkpoint(5)), step=5)
        mgr.save(to_tree(sample_checkpoint(7)), step=7)
    io = FsspecCheckpointIO()
    assert io.load_checkpoint(str(tmp_path / "run" / "ckpt-5"))["global_step"] == 5
    assert io.load_checkpoint(str(tmp_path / "run" / "ckpt-5.index"))["global_step"] == 5
    assert io.load_checkpoint(str(tmp_path / "run"))["global_step"] == 7


def test_torch_save_files_need_allow_pickle(tmp_path):
    path = tmp_path / "legacy.ckpt"
    torch.save(sample_checkpoint(3), path)
    with pytest.raises(IncompatibleCheckpointError, match="allow_pickle=True"):
        FsspecCheckpointIO().load_checkpoint(path)
    assert FsspecCheckpointIO(allow_pickle=True).load_checkpoint(path, weights_only=False)["global_step"] == 3


def test_bad_arguments():
    with pytest.raises(TypeError, match="storage_options"):
        FsspecCheckpointIO(storage_options="anon")
    with pytest.raises(TypeError, match="storage_options"):
        FsspecCheckpointIO().save_checkpoint({}, "x.ckpt", storage_options=["a"])


def fit(base, tmp_path, max_epochs, ckpt_path=None, **mc_kwargs):
    torch.manual_seed(0)
    model = TinyModel()
    mc = ModelCheckpoint(dirpath=base, **mc_kwargs)
    trainer = make_trainer(str(tmp_path), [mc], plugins=[FsspecCheckpointIO()], max_epochs=max_epochs)
    trainer.fit(model, make_loader(), ckpt_path=ckpt_path)
    return trainer, mc, model


def test_model_checkpoint_top_k_last_and_resume(base, tmp_path):
    kw = dict(save_top_k=2, monitor="train_loss", mode="min", every_n_train_steps=2, save_last=True)
    trainer, mc, _ = fit(base, tmp_path, 2, **kw)
    files = names(base)
    markers = {f for f in files if f.endswith(".ckpt")}
    assert markers == {os.path.basename(p) for p in mc.best_k_models} | {"last.ckpt"}
    assert len(mc.best_k_models) == 2
    # every removed top-k checkpoint took its files along: one index per marker, nothing else
    assert sum(f.endswith(".index") for f in files) == len(markers)
    assert len(files) == 4 * len(markers)

    reference_trainer, _, reference = fit(f"{base}-ref", tmp_path / "ref", 3, **kw)
    # Lightning resolves "last" by listing the directory and drops the URL scheme of what it lists,
    # so for remote directories the path is given explicitly.
    last = "last" if "://" not in base else f"{base}/last.ckpt"
    resumed_trainer, _, resumed = fit(base, tmp_path, 3, ckpt_path=last, **kw)
    assert resumed_trainer.ckpt_path.endswith("last.ckpt")
    assert resumed_trainer.global_step == reference_trainer.global_step == 18
    assert same_weights(weights(resumed), weights(reference))
    best = resumed_trainer.checkpoint_callback.best_model_path
    [metrics] = resumed_trainer.validate(resumed, make_loader(), ckpt_path=best, verbose=False)
    assert resumed_trainer.ckpt_path == best and "val_loss" in metrics


def test_paths_lightning_reports_work_with_the_core_api_and_cli(base, tmp_path, capsys):
    """The path ModelCheckpoint reports (a marker file) is a checkpoint for every reader of the format."""
    trainer, mc, model = fit(base, tmp_path, 1, save_top_k=1, monitor="train_loss", save_last=True)
    for path in (mc.last_model_path, mc.best_model_path):
        state = load_checkpoint(path)
        assert state["global_step"] == trainer.global_step
        assert same_weights(state["state_dict"], weights(model))
        assert ("state_dict/net.0.weight", "float32", (8, 4)) in list_variables(path)
        assert read_meta(path)["step"] == trainer.global_step
        for command in (
            ["verify", path],
            ["inspect", path],
            ["export", path, "--to", "npz", str(tmp_path / "x.npz")],
        ):
            assert cli_main(command) == 0, capsys.readouterr()
    assert "OK" in capsys.readouterr().out


def test_model_checkpoint_save_last_link(tmp_path):
    base = str(tmp_path / "linked")
    trainer, mc, _ = fit(base, tmp_path, 1, save_top_k=1, monitor="train_loss", save_last="link")
    assert os.path.islink(os.path.join(base, "last.ckpt"))
    loaded = FsspecCheckpointIO().load_checkpoint(os.path.join(base, "last.ckpt"))
    assert loaded["global_step"] == trainer.global_step


def test_async_checkpoint_io_wrapper(tmp_path):
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    base = str(tmp_path / "async")
    torch.manual_seed(0)
    mc = ModelCheckpoint(dirpath=base, every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(
        str(tmp_path), [mc], plugins=[AsyncCheckpointIO(FsspecCheckpointIO())], max_epochs=1
    )
    trainer.fit(TinyModel(), make_loader())
    markers = sorted(f for f in os.listdir(base) if f.endswith(".ckpt"))
    assert markers == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=6.ckpt"]
    assert FsspecCheckpointIO().load_checkpoint(os.path.join(base, markers[-1]))["global_step"] == 6


def test_any_file_of_a_checkpoint_loads_it(base):
    """A directory listing hands out every file; each one of a checkpoint's files names that checkpoint."""
    io = FsspecCheckpointIO()
    io.save_checkpoint(sample_checkpoint(step=7), f"{base}/epoch=0-step=7.ckpt")
    for name in names(base):
        assert io.load_checkpoint(f"{base}/{name}")["global_step"] == 7, name
