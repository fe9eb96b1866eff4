"""``ckpt-callbacks export``: a checkpoint's tensors as safetensors, torch or npz, or (``--to ckpt``) a
self-contained copy of the checkpoint itself."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from .. import load_checkpoint
from .._api._resolve import copy_checkpoint, resolve_checkpoint
from .._format import _format as _fmt
from ._commands import EXIT_OK, UsageError, _readable
from ._output import _Progress


def _flat_tensors(tree: Any, prefix: str = "") -> dict[str, Any]:
    """name -> tensor for every array leaf, named by its key path."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat_tensors(v, f"{prefix}{k}/"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat_tensors(v, f"{prefix}{i}/"))
    elif isinstance(tree, np.ndarray) or type(tree).__module__ == "torch":
        out[prefix.rstrip("/")] = tree
    return out


def _select(everything: dict[str, Any], only: str, strip: str) -> dict[str, Any]:
    tensors = everything
    if only:
        tensors = {k: v for k, v in tensors.items() if k.startswith(only)}
    if strip:
        tensors = {k[len(strip) :]: v for k, v in tensors.items() if k.startswith(strip) and k != strip}
    if not tensors:
        available = sorted({k.split("/")[0] + "/" for k in everything})[:10]
        raise UsageError(
            f"No tensor name starts with {(strip or only)!r}. Top-level prefixes in this checkpoint: "
            f"{', '.join(available) or 'none'}."
        )
    return tensors


def cmd_export(args: argparse.Namespace) -> int:
    _readable(args.path, args.storage_options)
    path = resolve_checkpoint(args.path, args.storage_options, checkpoint=args.checkpoint)
    if (
        args.to == "ckpt"
    ):  # the whole checkpoint, tree and .meta included; --only / --strip-prefix do not apply
        if args.only or args.strip_prefix:
            raise UsageError("export --to ckpt copies the whole checkpoint: drop --only / --strip-prefix.")
        copy_checkpoint(path, args.out, args.storage_options)
        print(f"copied {path} to {args.out} (self-contained)")
        return EXIT_OK
    state = load_checkpoint(path, storage_options=args.storage_options, verify=True)
    tensors = _select(_flat_tensors(state), args.only, args.strip_prefix)
    progress = _Progress(len(tensors), f"export {args.to}")
    if args.to == "torch":
        try:
            import torch
        except ImportError:
            raise UsageError(
                "export --to torch needs PyTorch: pip install torch (or 'ckpt-callbacks[lightning]'); "
                "--to safetensors or --to npz need nothing more."
            ) from None
        from .._format import _torch

        out = {
            k: v if isinstance(v, torch.Tensor) else _torch.from_numpy(np.ascontiguousarray(v))
            for k, v in tensors.items()
        }
        torch.save(out, args.out)
    else:
        arrays = {k: v if isinstance(v, np.ndarray) else _to_numpy(v) for k, v in tensors.items()}
        if args.to == "npz":
            native = {}
            for k, a in arrays.items():
                if a.dtype.type.__module__ != "numpy":  # npz readers know no ml_dtypes: widen losslessly
                    print(f"note: {k} ({a.dtype.name}) is stored as float32 in the npz", file=sys.stderr)
                    a = a.astype(np.float32)
                native[k] = a
            np.savez(args.out, **native)
        else:
            entries = [_fmt.TensorEntry(k, a.dtype, a.shape, a) for k, a in arrays.items()]
            header, _ = _fmt.safetensors_header(entries)
            with open(args.out, "wb") as f:
                f.write(header)
                for e in entries:
                    for chunk in _fmt.iter_tensor_bytes(np.ascontiguousarray(e.source)):
                        f.write(chunk)
                    progress.advance(1)
    progress.close()
    print(f"wrote {len(tensors)} tensors to {args.out} ({args.to})")
    return EXIT_OK


def _to_numpy(t: Any) -> np.ndarray:
    from .._format import _torch

    return _torch.to_numpy(t)
