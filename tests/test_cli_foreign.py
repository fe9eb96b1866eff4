"""The command line on other tools' files: every command names what they are and what reads them, with
exit status 2, never 1 (corruption) and never an empty listing; a missing path is said so."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

COMMANDS = ["ls", "inspect", "verify", "gc", "export"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_callbacks", *args], capture_output=True, text=True)


def run(command: str, path: str, tmp_path) -> subprocess.CompletedProcess:
    extra = ["--to", "npz", str(tmp_path / "out.npz")] if command == "export" else []
    return cli(command, path, *extra)


def snapshot(root) -> dict[str, bytes]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def tensorflow_manager_directory(d) -> str:
    tf = pytest.importorskip("tensorflow")
    manager = tf.train.CheckpointManager(
        tf.train.Checkpoint(v=tf.Variable([1.0, 2.0])), str(d), max_to_keep=2
    )
    for step in (1, 2):
        manager.save(checkpoint_number=step)
    return str(d)


def tensorflow_prefix(d) -> str:
    return os.path.join(tensorflow_manager_directory(d), "ckpt-2")


def torch_save_file(d) -> str:
    torch = pytest.importorskip("torch")
    os.makedirs(d)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, os.path.join(d, "last.ckpt"))
    return os.path.join(d, "last.ckpt")


def lightning_checkpoints_directory(d) -> str:
    torch = pytest.importorskip("torch")
    os.makedirs(d)
    for step in (3, 6):
        torch.save({"state_dict": {}}, os.path.join(d, f"epoch=0-step={step}.ckpt"))
    return str(d)


def _keras():
    keras = pytest.importorskip("keras")
    return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])


def keras_archive(d) -> str:
    os.makedirs(d)
    _keras().save(os.path.join(d, "model.keras"))
    return os.path.join(d, "model.keras")


def keras_weights(d) -> str:
    os.makedirs(d)
    _keras().save_weights(os.path.join(d, "model.weights.h5"))
    return os.path.join(d, "model.weights.h5")


def safetensors_file(d) -> str:
    from safetensors.numpy import save_file

    os.makedirs(d)
    save_file({"w": np.zeros(2, np.float32)}, os.path.join(d, "model.safetensors"))
    return os.path.join(d, "model.safetensors")


def orbax_manager_directory(d) -> str:
    ocp = pytest.importorskip("orbax.checkpoint")
    with ocp.CheckpointManager(str(d)) as mgr:
        mgr.save(5, args=ocp.args.StandardSave({"w": np.zeros(2, np.float32)}))
        mgr.wait_until_finished()
    return str(d)


# (how to make it, what the message says it is, what the message says reads it)
FOREIGN = {
    "tensorflow-directory": (
        tensorflow_manager_directory,
        "TensorFlow checkpoint",
        "tf.train.latest_checkpoint",
    ),
    "tensorflow-prefix": (tensorflow_prefix, "TensorFlow checkpoint", "tf.train.load_checkpoint"),
    "torch-save": (torch_save_file, "torch.save file", "load_from_checkpoint(path)"),
    "lightning-directory": (lightning_checkpoints_directory, "torch.save file", "torch.load(path)"),
    "keras-archive": (keras_archive, "Keras model archive", "keras.models.load_model(path)"),
    "keras-weights": (keras_weights, "HDF5 file", "model.load_weights(path)"),
    "safetensors": (safetensors_file, "safetensors file", "safetensors.safe_open"),
    "orbax": (orbax_manager_directory, "Orbax checkpoint", "orbax.checkpoint"),
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_every_command_names_another_tools_files_with_exit_status_2(tmp_path, kind):
    make, what, reader = FOREIGN[kind]
    path = make(tmp_path / "theirs")
    before = snapshot(tmp_path / "theirs")
    for command in COMMANDS:
        out = run(command, path, tmp_path)
        assert out.returncode == 2, (command, out.returncode, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        message = out.stderr
        assert (
            what in message
            and reader in message
            and "not a ckpt_callbacks checkpoint"
            in message.replace("not ckpt_callbacks ones", "not a ckpt_callbacks checkpoint")
        ), (command, message)
        assert "CORRUPT" not in message and "corrupt" not in message.lower(), message
    assert snapshot(tmp_path / "theirs") == before  # nothing read was changed, nothing added
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_a_path_that_does_not_exist_is_said_so(tmp_path, command):
    out = run(command, str(tmp_path / "no" / "such" / "path"), tmp_path)
    assert out.returncode == 2 and "does not exist" in out.stderr, out.stderr
    assert not (tmp_path / "no").exists()


def test_our_own_directories_and_files_are_not_called_foreign(tmp_path):
    """A state file TensorFlow's format allows, a marker directory and a checkpoint prefix stay ours."""
    from ckpt_callbacks import CheckpointManager

    with CheckpointManager(str(tmp_path / "run")) as mgr:
        mgr.save({"w": np.zeros(2, np.float32)}, step=1)
    for path in (tmp_path / "run", tmp_path / "run" / "ckpt-1", tmp_path / "run" / "ckpt-1.index"):
        out = cli("verify", str(path))
        assert out.returncode == 0 and "OK" in out.stdout, out.stderr
