"""CheckpointCallback under ModelParallelStrategy (FSDP2 ``fully_shard``, 2 CPU processes, gloo).

Every rank writes its own shards through ``ckpt_callbacks.distributed``; a run SIGKILLed after a
save resumes bit-exact (weights, Adam state, schedulers), with dropout, so every rank's RNG matters.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from lightning_helpers import HERE, PYTHON, script_env

from ckpt_callbacks import get_checkpoint_state, load_checkpoint
from ckpt_callbacks._api._resolve import read_index

SCRIPT = os.path.join(HERE, "lightning_sharded_script.py")


def _run(
    ns: str, directory: str, max_steps: int, kill_at: int = 0, *extra: str
) -> subprocess.CompletedProcess:
    out = subprocess.run([PYTHON, SCRIPT, ns, directory, str(max_steps), str(kill_at), *extra],
                         env=script_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    if not kill_at:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _tensors(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{path}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{path}/{i}")
    elif isinstance(tree, torch.Tensor):
        yield path, tree


def _state(path: str) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)  # one process: full tensors assembled from both ranks' files
    return dict(_tensors({k: ckpt[k] for k in ("state_dict", "optimizer_states", "lr_schedulers")}))


@pytest.mark.slow
def test_model_parallel_kill_and_resume_is_bit_exact(pl, tmp_path):
    ns = "lightning" if pl.__name__.startswith("lightning") else "pytorch_lightning"
    _kill_and_resume(ns, tmp_path)


@pytest.mark.slow
def test_model_parallel_async_save_kill_and_resume_is_bit_exact(tmp_path):
    _kill_and_resume("lightning", tmp_path, "async")


@pytest.mark.slow
def test_model_parallel_without_distributed_checkpoint_resumes_bit_exact(pl, tmp_path):
    # save_distributed_checkpoint=False: Lightning's dump gathers full state dicts on rank 0 and
    # empty ones elsewhere; the checkpoint is still written sharded and resumes exactly.
    ns = "lightning" if pl.__name__.startswith("lightning") else "pytorch_lightning"
    _kill_and_resume(ns, tmp_path, "consolidated")


@pytest.mark.slow
def test_model_parallel_ckpt_path_last_resumes_bit_exact(tmp_path):
    _kill_and_resume("lightning", tmp_path, "last")


def _kill_and_resume(ns, tmp_path, *extra: str) -> None:
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    _run(ns, straight, 8, 0, *extra)

    # 3 batches per epoch and rank; saves at steps 2 and 4, then both ranks die at step 5 (mid-epoch).
    out = _run(ns, killed, 8, 5, *extra)
    assert out.returncode != 0 and "TRAINED" not in out.stdout
    # An async save of step 4 may still have been in flight when the ranks died.
    latest = get_checkpoint_state(killed).model_checkpoint_path
    step = int(latest.rsplit("-", 1)[1])
    assert step == 4 or ("async" in extra and step == 2), latest
    out = _run(ns, killed, 8, 0, *extra)
    assert f"START rank=0 step={step}" in out.stdout and f"START rank=1 step={step}" in out.stdout, (
        out.stdout[-2000:]
    )

    # SPEC §3 layout, each rank its own data file; retention (max_to_keep=2) removed every file of
    # the older steps but the data files the kept ones point into (incremental: e.g. RNG states
    # unchanged since an earlier save).
    for d in (straight, killed):
        named = {f["name"] for s in (6, 8) for f in read_index(os.path.join(d, f"ckpt-{s}"))["files"]}
        assert set(os.listdir(d)) == {
            "checkpoint",
            *(f"ckpt-{s}.{x}" for s in (6, 8) for x in
              ("data-00000-of-00002", "data-00001-of-00002", "index", "meta")),
            *named,
        }  # fmt: skip
        assert get_checkpoint_state(d).all_model_checkpoint_paths[-1].endswith("ckpt-8")

    a, b = _state(os.path.join(straight, "ckpt-8")), _state(os.path.join(killed, "ckpt-8"))
    assert a.keys() == b.keys()
    assert any("/state/" in k and k.endswith("exp_avg_sq") for k in a)  # Adam state is compared too
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # The comparison is not vacuous: training moved the weights between the last two saves.
    earlier = _state(os.path.join(straight, "ckpt-6"))
    assert not torch.equal(earlier["/state_dict/net.0.weight"], a["/state_dict/net.0.weight"])
