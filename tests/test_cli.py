"""The command line: every command, its help and its exit status, through the real entry point.

Exit status: 0 ok, 1 corruption, 2 usage error, nothing found or another tool's files (one line on stderr,
no traceback).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import ckpt_callbacks
from ckpt_callbacks import CheckpointManager
from ckpt_callbacks._cli._main import _options, main

COMMANDS = ["ls", "inspect", "verify", "gc", "export"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_callbacks", *args], capture_output=True, text=True)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    clock = iter(float(t) for t in range(0, 10**6, 1800)).__next__
    with CheckpointManager(
        str(d), max_to_keep=2, keep_best=1, monitor="loss", keep_checkpoint_every_n_hours=1, clock=clock
    ) as mgr:
        for i, loss in enumerate([0.5, 3.0, 2.0, 1.0, 4.0, 5.0], start=1):
            state = {
                "model": {"w": np.full((4, 4), i, np.float32), "b": np.arange(3, dtype=np.int64) + i},
                "epoch": i,
            }
            mgr.save(state, step=i * 100, metrics={"loss": loss})
    return d


def test_ls_table_and_json(run_dir):
    out = cli("ls", str(run_dir))
    assert out.returncode == 0, out.stderr
    assert "kept-because" in out.stdout and "ckpt-600 *" in out.stdout
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert rows["600"][5] == "recent" and rows["500"][5] == "recent"
    assert rows["200"][5] == "hourly" and rows["100"][5] == "best"
    doc = json.loads(cli("ls", str(run_dir), "--json").stdout)
    assert doc["latest"] == "ckpt-600"
    reasons = {c["step"]: c["kept_because"] for c in doc["checkpoints"]}
    # Every checkpoint once: 100 (loss 0.5) is the best; 200 and 400 were preserved an hour apart
    # (1800 s saves); 500 and 600 are the max_to_keep=2 window; 300 was rotated away.
    assert reasons == {100: "best", 200: "hourly", 400: "hourly", 500: "recent", 600: "recent"}
    assert [c["step"] for c in doc["checkpoints"] if c["latest"]] == [600]
    assert all(c["size"] > 0 and "loss" in c["metrics"] for c in doc["checkpoints"])


def test_ls_of_a_state_file_tensorflow_wrote(run_dir):
    """Without our retention comment line: the TF fields alone (older than last_preserved = hourly)."""
    state = run_dir / "checkpoint"
    lines = [line for line in state.read_text().splitlines() if not line.startswith("#")]
    state.write_text("\n".join(lines) + "\n")
    assert main(["ls", str(run_dir)]) == 0
    doc = json.loads(cli("ls", str(run_dir), "--json").stdout)
    reasons = {c["step"]: c["kept_because"] for c in doc["checkpoints"]}
    assert reasons[600] == "recent" and reasons[500] == "recent" and reasons[400] == "hourly"


def test_inspect_is_compact_by_default(run_dir):
    out = cli("inspect", str(run_dir / "ckpt-600"))
    assert out.returncode == 0, out.stderr
    assert "2 tensors, 88 B" in out.stdout and "metrics: loss=5" in out.stdout
    assert "model  dict of 2, 2 tensors, 88 B" in out.stdout and "epoch  6" in out.stdout
    assert "model/w" not in out.stdout  # the per-tensor table is --full's
    full = cli("inspect", str(run_dir / "ckpt-600"), "--full")
    assert "model/w  float32  (4, 4)  64 B" in full.stdout and "'epoch': 6" in full.stdout
    assert '"format_version"' in full.stdout
    assert cli("inspect", str(run_dir)).stdout.splitlines()[0] == out.stdout.splitlines()[0]


def test_inspect_json(run_dir):
    doc = json.loads(cli("inspect", str(run_dir / "ckpt-600"), "--json").stdout)
    assert doc["tensor_count"] == 2 and doc["total_bytes"] == 88 and doc["step"] == 600
    assert doc["meta"]["metrics"] == {"loss": 5.0} and "library" not in doc["meta"]
    assert {t["key"]: t["tensors"] for t in doc["top_level"]} == {"model": 2, "epoch": 0}
    assert "tensors" not in doc
    full = json.loads(cli("inspect", str(run_dir / "ckpt-600"), "--json", "--full").stdout)
    assert {t["name"]: t["shape"] for t in full["tensors"]} == {"model/b": [3], "model/w": [4, 4]}
    assert full["meta"]["library"]["ckpt_callbacks"] == ckpt_callbacks.__version__ and "tree" in full


def test_verify_ok_then_corrupt_names_file_and_tensor(run_dir):
    assert cli("verify", str(run_dir)).returncode == 0
    data = run_dir / "ckpt-600.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # last byte of the last tensor, "model/b"
    data.write_bytes(bytes(raw))
    out = cli("verify", str(run_dir))
    assert out.returncode == 1
    assert (
        "CORRUPT" in out.stdout and "model/b" in out.stdout and "ckpt-600.data-00000-of-00001" in out.stdout
    )
    assert cli("verify", str(run_dir / "ckpt-500")).returncode == 0
    assert cli("verify", str(run_dir / "ckpt-600")).returncode == 1


def test_verify_json(run_dir):
    out = cli("verify", str(run_dir), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and doc["ok"] and doc["corrupt"] == 0 and len(doc["checkpoints"]) == 5
    data = run_dir / "ckpt-500.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-1] + bytes([data.read_bytes()[-1] ^ 1]))
    out = cli("verify", str(run_dir), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and not doc["ok"] and doc["corrupt"] == 1
    (bad,) = [c for c in doc["checkpoints"] if not c["ok"]]
    assert bad["checkpoint"].endswith("ckpt-500") and "model/b" in bad["problem"]


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    return out.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "{tmp}/nothing"],
        ["verify", "{tmp}/nothing"],
        ["inspect", "{tmp}/ckpt-1"],
        ["export", "{tmp}/ckpt-1", "--to", "npz", "{tmp}/o.npz"],
        ["gc", "{tmp}/nothing"],
        ["bogus"],
        [],
        ["ls"],
        ["export", "{tmp}", "--to", "hdf5", "o"],
        ["ls", "{tmp}", "--storage-option", "novalue"],
    ],
)
def test_usage_and_not_found_exit_2_with_one_line(tmp_path, argv):
    argv = [a.format(tmp=tmp_path) for a in argv]
    one_line_error(cli(*argv))
    assert main(argv) == 2


@pytest.mark.parametrize(
    ("url", "module", "extra"), [("s3://bucket/run", "s3fs", "s3"), ("gs://b/run", "gcsfs", "gcs")]
)
def test_missing_fsspec_backend_names_the_extra(url, module, extra):
    """A process where the backend cannot be imported, as on a machine without it installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from ckpt_callbacks._cli._main import main\n"
        f"sys.exit(main(['ls', {url!r}]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert f"pip install 'ckpt-callbacks[{extra}]'" in one_line_error(out)


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ckpt-callbacks {ckpt_callbacks.__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_describes_arguments_with_examples(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"ckpt-callbacks {command} " in text.split("examples:")[1]
    assert "--storage-option KEY=VALUE" in text and "dotted KEY nests" in text
    for option in {
        "ls": ["--json"],
        "inspect": ["--full", "--json"],
        "verify": ["--json"],
        "gc": ["--prefix"],
        "export": ["--to", "--only", "--strip-prefix"],
    }[command]:
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        assert len(line.split()) > 1 or option == "--to", line  # the option is described


def test_top_level_help_lists_commands_and_exit_status():
    out = cli("--help")
    assert out.returncode == 0
    assert all(c in out.stdout for c in COMMANDS)
    table = out.stdout.split("exit status:\n", 1)[1]
    codes = [line.split()[0] for line in table.splitlines() if line[:3].strip().isdigit()]
    assert codes == ["0", "1", "2", "130"], table
    assert "corruption found" in table and "never called corrupt" in table and "does not exist" in table


def test_gc_removes_only_leftovers(run_dir):
    (run_dir / "ckpt-700.data-00000-of-00001").write_bytes(
        (run_dir / "ckpt-600.data-00000-of-00001").read_bytes()
    )
    (run_dir / ".ckpt-800.index.tmp-0123abcd").write_bytes(b"partial")
    (run_dir / "notes.txt").write_text("mine")
    before = {p.name for p in run_dir.iterdir()}
    out = cli("gc", str(run_dir))
    assert out.returncode == 0 and "2 leftover file(s) removed" in out.stdout
    after = {p.name for p in run_dir.iterdir()}
    assert before - after == {"ckpt-700.data-00000-of-00001", ".ckpt-800.index.tmp-0123abcd"}


def test_gc_of_a_missing_directory_is_a_usage_error(tmp_path):
    out = cli("gc", str(tmp_path / "nope"))
    assert out.returncode == 2 and "No checkpoint directory" in out.stderr
    assert not (tmp_path / "nope").exists()


def test_verify_names_the_tensors_a_truncation_cut(run_dir):
    data = run_dir / "ckpt-600.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-10])
    out = cli("verify", str(run_dir / "ckpt-600"))
    assert out.returncode == 1
    assert "ckpt-600.data-00000-of-00001" in out.stdout and "truncated" in out.stdout
    assert "'model/w'" in out.stdout or "'model/b'" in out.stdout, out.stdout


@pytest.mark.parametrize("to", ["safetensors", "npz", "torch"])
def test_export(run_dir, tmp_path, to):
    out_file = tmp_path / f"weights.{to}"
    assert main(["export", str(run_dir / "ckpt-600"), "--to", to, str(out_file)]) == 0
    if to == "safetensors":
        loaded = load_file(str(out_file))
    elif to == "npz":
        loaded = dict(np.load(str(out_file)))
    else:
        import torch

        loaded = {k: v.numpy() for k, v in torch.load(str(out_file), weights_only=True).items()}
    assert set(loaded) == {"model/w", "model/b"}
    np.testing.assert_array_equal(loaded["model/w"], np.full((4, 4), 6, np.float32))


@pytest.mark.parametrize("to", ["safetensors", "npz"])
def test_export_only_keeps_names_and_strip_prefix_removes_the_prefix(run_dir, tmp_path, to):
    def exported(*flags: str) -> dict:
        out_file = tmp_path / f"w.{to}"
        assert main(["export", str(run_dir), "--to", to, *flags, str(out_file)]) == 0
        return load_file(str(out_file)) if to == "safetensors" else dict(np.load(str(out_file)))

    assert set(exported("--only", "model/")) == {"model/w", "model/b"}
    stripped = exported("--strip-prefix", "model/")
    assert set(stripped) == {"w", "b"}
    np.testing.assert_array_equal(stripped["b"], np.arange(3) + 6)  # the latest, step 600
    assert "model/" in one_line_error(cli("export", str(run_dir), "--to", to, "--strip-prefix", "x/", "o"))


def test_storage_options_parse():
    assert _options(["anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "key=abc"]) == {
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "key": "abc",
    }


@pytest.mark.parametrize("field", ["model_checkpoint_path", "all_model_checkpoint_paths"])
def test_state_file_naming_outside_paths_is_corruption(tmp_path, field):
    (tmp_path / "checkpoint").write_text(f'{field}: "../victim"\n')
    assert cli("ls", str(tmp_path)).returncode == 1
    assert cli("verify", str(tmp_path)).returncode == 1


def test_lightning_model_checkpoint_directory(tmp_path):
    """A directory Lightning's ModelCheckpoint wrote through FsspecCheckpointIO: marker files, no
    state file. ls lists them by marker name, verify checks them, export feeds load_state_dict."""
    pytest.importorskip("lightning")
    import warnings

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from ckpt_callbacks.lightning import FsspecCheckpointIO

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    base = tmp_path / "lit"
    g = torch.Generator().manual_seed(0)
    data = DataLoader(
        TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)), batch_size=8
    )
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[FsspecCheckpointIO()],
        callbacks=[ModelCheckpoint(dirpath=str(base), save_top_k=-1, save_last=True)],
    )
    model = Tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, data)

    doc = json.loads(cli("ls", str(base), "--json").stdout)
    markers = {c["checkpoint"]: c for c in doc["checkpoints"]}
    assert set(markers) == {"epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"}
    assert markers["last.ckpt"]["step"] == 4 and markers["last.ckpt"]["target"].startswith("last.ckpt.")
    assert all(c["kept_because"] == "marker" and c["size"] > 0 and c["time"] for c in doc["checkpoints"])
    table = cli("ls", str(base)).stdout
    assert "epoch=1-step=4.ckpt -> epoch=1-step=4.ckpt." in table

    verified = cli("verify", str(base))
    assert verified.returncode == 0 and verified.stdout.count("OK") == 3
    summary = cli("inspect", str(base / "last.ckpt")).stdout
    assert "framework: lightning" in summary and "state_dict" in summary and "epoch: 1" in summary

    out_file = tmp_path / "weights.pt"
    assert (
        main(
            [
                "export",
                str(base / "last.ckpt"),
                "--to",
                "torch",
                "--strip-prefix",
                "state_dict/",
                str(out_file),
            ]
        )
        == 0
    )
    fresh = Tiny()
    fresh.load_state_dict(torch.load(str(out_file), weights_only=True))  # strict: every key matches
    for k, v in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_checkpoint_choice_latest_or_best_for_a_directory(run_dir, tmp_path):
    """run_dir keeps the best by loss (keep_best=1): step 100, loss 0.5; the newest is 600."""
    best = json.loads(cli("inspect", str(run_dir), "--checkpoint", "best", "--json").stdout)
    latest = json.loads(cli("inspect", str(run_dir), "--checkpoint", "latest", "--json").stdout)
    assert (best["step"], latest["step"]) == (100, 600)
    assert json.loads(cli("inspect", str(run_dir), "--json").stdout)["step"] == 600  # latest by default
    out = cli("verify", str(run_dir), "--checkpoint", "best", "--json")
    assert [c["checkpoint"] for c in json.loads(out.stdout)["checkpoints"]] == [str(run_dir / "ckpt-100")]
    out = cli("export", str(run_dir), "--checkpoint", "best", "--to", "npz", str(tmp_path / "best.npz"))
    assert out.returncode == 0, out.stderr
    assert (np.load(tmp_path / "best.npz")["model/w"] == 1).all()  # step 100 saved w = 1
    one_line_error(
        cli("inspect", str(run_dir / "ckpt-600"), "--checkpoint", "best")
    )  # one checkpoint: no choice
    with CheckpointManager(str(tmp_path / "plain")) as mgr:  # no keep_best: no best checkpoint
        mgr.save({"w": np.zeros(2)}, step=1)
    assert "best" in one_line_error(cli("inspect", str(tmp_path / "plain"), "--checkpoint", "best"))
