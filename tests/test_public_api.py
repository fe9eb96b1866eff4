"""The public surface: exported names, framework-free import, the error tree."""

from __future__ import annotations

import subprocess
import sys

import pytest

import ckpt_callbacks
from ckpt_callbacks import errors


def test_all_matches_public_names():
    public = {name for name in vars(ckpt_callbacks) if not name.startswith("_")}
    submodules = {"distributed", "errors", "keras", "lightning"}
    assert sorted(ckpt_callbacks.__all__) == ckpt_callbacks.__all__
    assert set(ckpt_callbacks.__all__) == public - submodules


def test_import_pulls_in_no_framework_or_cloud_backend():
    code = (
        "import sys, ckpt_callbacks, ckpt_callbacks.errors\n"
        "heavy = {'torch', 'tensorflow', 'keras', 'lightning', 'pytorch_lightning', 's3fs', 'gcsfs'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "cls, builtin",
    [
        (errors.CheckpointNotFoundError, FileNotFoundError),
        (errors.CorruptCheckpointError, ValueError),
        (errors.IncompatibleCheckpointError, ValueError),
        (errors.CheckpointWriteError, OSError),
    ],
)
def test_error_tree(cls, builtin):
    assert issubclass(cls, errors.CheckpointError) and issubclass(cls, builtin)
    assert getattr(ckpt_callbacks, cls.__name__) is cls


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_to_keep": 0}, "max_to_keep must be an int >= 1 or None. Received: max_to_keep=0"),
        ({"max_to_keep": 2.5}, "max_to_keep=2.5"),
        ({"keep_checkpoint_every_n_hours": -1}, "keep_checkpoint_every_n_hours=-1"),
        ({"keep_best": 2}, "monitor=None"),
        ({"mode": "lowest"}, "mode='lowest'"),
        ({"prefix": "../x"}, "prefix='../x'"),
    ],
)
def test_constructor_validates(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=__import__("re").escape(match)):
        ckpt_callbacks.CheckpointManager(str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    "directory, kwargs, received",
    [
        (None, {}, "directory=None"),
        ("", {}, "directory=''"),
        ("d", {"storage_options": "anon"}, "storage_options='anon'"),
        ("d", {"async_save": "yes"}, "async_save='yes'"),
        ("d", {"allow_pickle": 1}, "allow_pickle=1"),
        ("d", {"max_to_keep": "5"}, "max_to_keep='5'"),
        ("d", {"keep_checkpoint_every_n_hours": float("inf")}, "keep_checkpoint_every_n_hours=inf"),
        ("d", {"keep_best": 0, "monitor": "loss"}, "keep_best=0"),
        ("d", {"mode": "lowest"}, "mode='lowest'"),
        ("d", {"clock": 5}, "clock=5"),
    ],
)
def test_constructor_errors_say_what_expected_received_and_fix(tmp_path, directory, kwargs, received):
    """Bad input: what happened, what was expected, the received value, how to fix it; nothing created."""
    where = None if directory is None else ("" if directory == "" else str(tmp_path / directory))
    with pytest.raises((ValueError, TypeError)) as info:
        ckpt_callbacks.CheckpointManager(where, **kwargs)
    message = str(info.value)
    assert " must be " in message and f"Received: {received}" in message
    assert any(fix in message for fix in ("Use ", "Pass ")), message
    if "=" in received and received.split("=")[0] in {
        "storage_options",
        "async_save",
        "allow_pickle",
        "clock",
    }:
        assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)
    assert not (tmp_path / "d").exists()


def test_unsupported_storage_library_error_lives_in_the_tree_and_where_it_was():
    from ckpt_callbacks._storage import UnsupportedStorageLibraryError as from_storage
    from ckpt_callbacks._storage._compat import UnsupportedStorageLibraryError as from_compat

    cls = errors.UnsupportedStorageLibraryError
    assert from_storage is cls and from_compat is cls
    assert issubclass(cls, RuntimeError) and not issubclass(cls, errors.CheckpointError)
    assert "UnsupportedStorageLibraryError(RuntimeError)" in errors.__doc__


def test_lightning_exports():
    lightning = pytest.importorskip("ckpt_callbacks.lightning")
    assert lightning.__all__ == [
        "CheckpointCallback",
        "FsspecCheckpointIO",
        "ModelCheckpoint",
        "load_from_checkpoint",
    ]
    assert all(getattr(lightning, name) is not None for name in lightning.__all__)
    # Lightning's own ModelCheckpoint arguments, in order and with its defaults, then ours as keywords.
    import inspect

    from lightning.pytorch.callbacks import ModelCheckpoint as Stock

    stock = inspect.signature(Stock).parameters
    drop_in = inspect.signature(lightning.ModelCheckpoint).parameters
    assert [(p.name, p.default) for p in list(drop_in.values())[: len(stock)]] == [
        (p.name, p.default) for p in stock.values()
    ]
    assert all(p.kind is p.KEYWORD_ONLY for p in list(drop_in.values())[len(stock) :])


def test_keras_public_names_and_drop_in_signatures():
    pytest.importorskip("keras")
    import inspect

    import keras

    import ckpt_callbacks.keras as ck

    assert ck.__all__ == [
        "BackupAndRestore",
        "CheckpointCallback",
        "ResumableDataset",
        "load_model",
        "restore",
    ]
    assert set(ck.__all__) <= set(vars(ck))
    # Keras' own BackupAndRestore arguments, in order and with its defaults, then ours as keywords.
    theirs = inspect.signature(keras.callbacks.BackupAndRestore).parameters
    ours = inspect.signature(ck.BackupAndRestore).parameters
    assert [(p.name, p.default) for p in list(ours.values())[: len(theirs)]] == [
        (p.name, p.default) for p in theirs.values()
    ]
    assert all(p.kind is p.KEYWORD_ONLY for p in list(ours.values())[len(theirs) :])
    callback = inspect.signature(ck.CheckpointCallback).parameters
    assert {"save_freq", "save_best_only", "initial_value_threshold"} <= set(callback)
    for fn in (ck.restore, ck.load_model):
        assert inspect.signature(fn).parameters["checkpoint"].default == "latest"
