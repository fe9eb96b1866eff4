"""``ckpt-callbacks`` (also ``python -m ckpt_callbacks``): look at, check and export checkpoints.

Exit status (the table of ``ckpt-callbacks --help``): 0 success, 1 corruption found, 2 usage
errors, a missing path or backend, and another tool's files, named as such (one line on stderr, no
traceback). Core only: no framework is imported except ``torch`` by ``export --to torch``.

This module is the parser and the entry point (exceptions -> exit status); the commands are in
``_cli_commands``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .. import __version__
from ..errors import CheckpointError, CorruptCheckpointError
from ._commands import EXIT_CORRUPT, EXIT_OK, EXIT_USAGE, UsageError, cmd_gc, cmd_inspect, cmd_ls, cmd_verify
from ._export import cmd_export

# Which extra brings the fsspec backend of a URL scheme (the message for a missing one names it).
_BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (what is wrong, and where the help is), not argparse's usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------- helpers


def _options(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs; values that parse as JSON (numbers, booleans, objects) are taken as such.

    A dotted key nests: ``client_kwargs.endpoint_url=http://...``.
    """
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UsageError(f"--storage-option expects KEY=VALUE, e.g. anon=true. Received: {pair!r}.")
        key, value = pair.split("=", 1)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return out


# ---------------------------------------------------------------- entry point

_DESCRIPTION = """\
Inspect, verify, clean and export ckpt_callbacks checkpoints, on local disk or any fsspec URL
(s3://, gs://, memory://, ...).
"""

_EPILOG = """\
examples:
  ckpt-callbacks ls runs/mnist
  ckpt-callbacks inspect runs/mnist                 # the newest checkpoint, in brief
  ckpt-callbacks verify s3://bucket/run --storage-option anon=true
  ckpt-callbacks export runs/lit/last.ckpt --to safetensors --strip-prefix state_dict/ model.safetensors

'ckpt-callbacks COMMAND --help' describes each command.

exit status:
  0    success
  1    corruption found: a checksum, size or header of a checkpoint of this library is wrong (verify
       names the file and tensor)
  2    usage error; a path that does not exist, or holds no checkpoint; a missing storage backend or
       package; files of another tool (TensorFlow, torch.save / Lightning .ckpt, Keras .keras /
       .weights.h5, safetensors, Orbax), named as such with what reads them, never called corrupt
  130  interrupted (Ctrl-C)
"""

_STORAGE_HELP = (
    "fsspec storage option for the URL's filesystem, repeatable. VALUE is parsed as JSON when it can be "
    "(numbers, true/false, objects), else taken as a string; a dotted KEY nests "
    "(client_kwargs.endpoint_url=http://127.0.0.1:9000 -> {'client_kwargs': {'endpoint_url': ...}})"
)

_PATH_HELP = (
    "a checkpoint: its path without suffix (runs/a/ckpt-100), its .index file, a marker file written by "
    "FsspecCheckpointIO (runs/lit/last.ckpt), or a directory (its newest valid checkpoint)"
)

_CHOICE_HELP = (
    "for a directory: its newest valid checkpoint (latest, the default) or the best one its manager kept "
    "by keep_best (best)"
)

_COMMANDS: dict[str, dict[str, str]] = {
    "ls": {
        "help": "list the checkpoints of a directory",
        "description": """\
List the checkpoints of a directory: step, save time, size on storage, why it is kept, metrics.

kept-because:
  recent   among the newest max_to_keep checkpoints (the rotation window)
  hourly   preserved by keep_checkpoint_every_n_hours (never rotated away)
  best     out of the window, kept by keep_best as one of the best by the monitored metric
  marker   named by a marker file of Lightning's ModelCheckpoint saving through FsspecCheckpointIO
           (shown as 'MARKER -> CHECKPOINT'; ModelCheckpoint decides what it keeps)
'*' marks the newest checkpoint, the one restore() and load_checkpoint(DIRECTORY) read.
""",
        "epilog": """\
examples:
  ckpt-callbacks ls runs/mnist
  ckpt-callbacks ls s3://bucket/run --storage-option profile=training --json
  ckpt-callbacks ls lightning_logs/version_0/checkpoints     # ModelCheckpoint + FsspecCheckpointIO
""",
    },
    "inspect": {
        "help": "summary (or, with --full, every tensor, the tree and meta) of one checkpoint",
        "description": """\
Show one checkpoint, like TensorFlow's inspect_checkpoint. By default a summary: tensor count and total
bytes, framework, epoch, step, metrics, and the top level of the state tree. --full lists every tensor
(name, dtype, shape, bytes), the whole tree and the meta JSON.
""",
        "epilog": """\
examples:
  ckpt-callbacks inspect runs/mnist                       # the newest checkpoint of a directory
  ckpt-callbacks inspect runs/mnist/ckpt-1000 --full
  ckpt-callbacks inspect runs/mnist --checkpoint best     # the best one kept by keep_best
  ckpt-callbacks inspect gs://bucket/run/ckpt-1000 --json --storage-option project=my-project
""",
    },
    "verify": {
        "help": "check every checksum; exit status 1 on any corruption",
        "description": """\
Read every file of one checkpoint, or of every checkpoint of a directory (those its 'checkpoint' state
file lists and those marker files name), and check every checksum. Each corrupt checkpoint is reported
with the file and tensor at fault; the exit status is 1 if any is corrupt.
""",
        "epilog": """\
examples:
  ckpt-callbacks verify runs/mnist
  ckpt-callbacks verify runs/mnist/ckpt-1000
  ckpt-callbacks verify s3://bucket/run --json
""",
    },
    "gc": {
        "help": "remove leftovers of interrupted saves",
        "description": """\
Remove what interrupted saves left behind: temporary files, and checkpoint files of PREFIX that no state
file lists (only files this format wrote, recognised by name and content; nothing else is touched). On S3
also aborts pending multipart uploads of such files. Do not run it while a run is saving into the
directory: the writer lock refuses a second writer.
""",
        "epilog": """\
examples:
  ckpt-callbacks gc runs/mnist
  ckpt-callbacks gc s3://bucket/run --prefix model
""",
    },
    "export": {
        "help": "write the tensors as safetensors, torch or npz",
        "description": """\
Write the tensors of one checkpoint (its checksums verified) to a single file other tools read:
safetensors, a torch state dict (torch.save; needs PyTorch) or numpy .npz. Tensors are named by their
key path in the state tree, '/'-joined: a Lightning checkpoint's weights are 'state_dict/<param>',
a Keras one's are under 'model/'. Non-tensor leaves (numbers, strings) are not exported.

--only PREFIX keeps the tensors whose name starts with PREFIX, names unchanged.
--strip-prefix PREFIX keeps the same tensors and removes PREFIX from their names, so that
  'state_dict/layer.weight' becomes 'layer.weight' and module.load_state_dict() takes the file as is.
""",
        "epilog": """\
examples:
  ckpt-callbacks export runs/lit/last.ckpt --to torch --strip-prefix state_dict/ weights.pt
      then: model.load_state_dict(torch.load("weights.pt"))
  ckpt-callbacks export runs/mnist --to safetensors model.safetensors
  ckpt-callbacks export runs/mnist --checkpoint best --to safetensors best.safetensors
  ckpt-callbacks export runs/mnist/ckpt-1000 --to npz --only model/ arrays.npz
""",
    },
}


# What each command runs, and the help of its --json flag (export has none).
_FUNCS = {"ls": cmd_ls, "inspect": cmd_inspect, "verify": cmd_verify, "gc": cmd_gc, "export": cmd_export}
_JSON_HELP = {
    "ls": "print a JSON document instead of the table",
    "inspect": "print JSON: the summary, or with --full also tensors, files, tree and the whole meta",
    "verify": 'print {"ok", "corrupt", "checkpoints": [{checkpoint, ok, problem}]}',
}


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="ckpt-callbacks", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=raw)
    parser.add_argument("--version", action="version", version=f"ckpt-callbacks {__version__}")
    common = _Parser(add_help=False)
    common.add_argument(
        "--storage-option", action="append", default=[], metavar="KEY=VALUE", help=_STORAGE_HELP
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {
        name: sub.add_parser(name, parents=[common], formatter_class=raw, **_COMMANDS[name])
        for name in _FUNCS
    }
    _add_arguments(commands)
    for name, func in _FUNCS.items():
        if name in _JSON_HELP:  # last, so that --help lists it after the command's own options
            commands[name].add_argument("--json", action="store_true", help=_JSON_HELP[name])
        commands[name].set_defaults(func=func)
    return parser


def _add_arguments(commands: dict[str, argparse.ArgumentParser]) -> None:
    """The arguments of each command but --storage-option (shared) and --json (added by build_parser)."""
    commands["ls"].add_argument("directory", help="a checkpoint directory: local path or fsspec URL")

    p = commands["inspect"]
    p.add_argument("path", help=_PATH_HELP)
    p.add_argument("--full", action="store_true", help="every tensor, the whole state tree and the meta JSON")
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest", help=_CHOICE_HELP)

    all_of_dir = _PATH_HELP.replace("(its newest valid checkpoint)", "(all its checkpoints)")
    commands["verify"].add_argument("path", help=all_of_dir)
    commands["verify"].add_argument(
        "--checkpoint",
        choices=["latest", "best"],
        default=None,
        help="for a directory, verify only its newest checkpoint (latest) or the best one its manager kept "
        "by keep_best (best); default: every checkpoint of the directory",
    )

    p = commands["gc"]
    p.add_argument("directory", help="a checkpoint directory: local path or fsspec URL")
    p.add_argument(
        "--prefix",
        default="ckpt",
        help="checkpoint name prefix the run was saved with (CheckpointManager(prefix=...)); default: ckpt",
    )

    p = commands["export"]
    p.add_argument("path", help=_PATH_HELP)
    p.add_argument(
        "--to",
        choices=["safetensors", "torch", "npz", "ckpt"],
        required=True,
        help="the output file format; ckpt: a self-contained copy of the checkpoint (OUT: a checkpoint "
        "path, local or fsspec URL), with the tensors it shares with earlier checkpoints included",
    )
    p.add_argument("--only", default="", metavar="PREFIX", help="only tensors whose name starts with PREFIX")
    p.add_argument(
        "--strip-prefix",
        default="",
        metavar="PREFIX",
        help="only tensors whose name starts with PREFIX, written without it (e.g. state_dict/)",
    )
    p.add_argument("--checkpoint", choices=["latest", "best"], default="latest", help=_CHOICE_HELP)
    p.add_argument("out", help="the file to write (local path; with --to ckpt a checkpoint path or URL)")


def _missing_package(e: ImportError, args: argparse.Namespace) -> str:
    """One line naming what to install: the extra of a URL's fsspec backend, or the missing module."""
    url = str(getattr(args, "path", None) or getattr(args, "directory", None) or "")
    scheme = url.split("://", 1)[0].split("::")[-1] if "://" in url else ""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    if scheme in _BACKEND_EXTRAS and e.name in (None, "s3fs", "gcsfs", "aiobotocore", "botocore"):
        extra = _BACKEND_EXTRAS[scheme]
        return (
            f"error: {scheme}:// URLs need the {extra} extra, which is not installed ({reason}): "
            f"pip install 'ckpt-callbacks[{extra}]'"
        )
    if scheme and e.name is None:  # fsspec's own message for an unknown or uninstalled protocol
        return f"error: no fsspec backend for {scheme}:// URLs is installed ({reason})"
    return f"error: a package this needs is not installed ({reason})"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 corruption, 2 usage, not found, or
    another tool's files: see the epilog's table)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and usage errors (2, one line from argparse)
        return int(e.code or 0)
    try:
        args.storage_options = _options(args.storage_option) or None
        return args.func(args)
    except CorruptCheckpointError as e:
        print(f"CORRUPT: {e}", file=sys.stderr)
        return EXIT_CORRUPT
    except BrokenPipeError:  # `ckpt-callbacks ls ... | head`: the reader has what it wanted
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushed at exit, which must not raise again
        return EXIT_OK
    except ImportError as e:
        print(_missing_package(e, args), file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
