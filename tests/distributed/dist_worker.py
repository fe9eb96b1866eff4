"""One rank of a sharded-checkpoint test: ``python dist_worker.py SCENARIO RANK WORLD PORT DIR OUT``.

Real processes on the gloo backend over loopback, FSDP2 ``fully_shard`` models and DTensor state
dicts. Each rank writes ``OUT/rank<r>.json`` (what happened) and, where a test compares tensors,
``OUT/<tag>-rank<r>.pt`` (full tensors of the state, gathered). Collectives time out after
``PG_TIMEOUT`` seconds, so a dead peer never hangs a rank longer than that.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import sys
import traceback

import torch
import torch.distributed as dist
from torch.distributed._tensor import DTensor, Shard, distribute_tensor
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckpt_callbacks.distributed as cd
from ckpt_callbacks.distributed import _dcp

PG_TIMEOUT = 20


def build(world: int, seed: int = 0):
    """The same FSDP2 model + Adam on every rank, and one column-sharded DTensor of our own."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    cols = distribute_tensor(torch.zeros(4, 6), mesh, [Shard(1)])
    return model, optim, cols


def train(model, optim, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 8, generator=g)
        model(x).pow(2).mean().backward()
        optim.step()
        optim.zero_grad()


def state_of(model, optim, cols, extra: dict | None = None) -> dict:
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, "cols": cols, "extra": dict(extra or {})}


def full(state: dict) -> dict:
    """Every tensor of the state gathered to a full CPU tensor, by flattened name."""
    flat, _ = flatten_state_dict(state)
    out = {}
    for k, v in flat.items():
        if isinstance(v, DTensor):
            v = v.full_tensor()
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
    return out


def apply(model, optim, state: dict) -> None:
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])


def main() -> None:
    scenario, rank, world, port, directory, out = sys.argv[1:7]
    rank, world = int(rank), int(world)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT)
    )
    result: dict = {"rank": rank}
    try:
        SCENARIOS[scenario](rank, world, directory, out, result)
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a dead peer
        pass


def save_and_restore(rank, world, directory, out, result):
    """Steps 1..3 through a manager (max_to_keep=2), a rank-1 failure at step 4, then a fresh model
    restored from the newest checkpoint."""
    model, optim, cols = build(world)
    mgr = cd.manager(directory, max_to_keep=2)
    saved = {}
    for step in (1, 2, 3):
        train(model, optim, 1)
        with torch.no_grad():
            cols.copy_(
                distribute_tensor(torch.arange(24.0).reshape(4, 6) * step, cols.device_mesh, [Shard(1)])
            )
        state = state_of(model, optim, cols, {"step": step, "note": "ok"})
        # The manager's own save() is the same collective as cd.save (both ways, mixed).
        save = mgr.save if step == 2 else functools.partial(cd.save, mgr)
        path = save(state, step, metrics={"loss": 1.0 / step})
        saved[step] = full(state)
        result.setdefault("paths", []).append(path)
        result.setdefault("listed", []).append([os.path.basename(p) for p in mgr.checkpoints])
    torch.save(saved[3], os.path.join(out, f"step3-rank{rank}.pt"))

    # Rank 1 fails while writing step 4: every rank raises, nothing is committed.
    if rank == 1:

        def fail(where, r):
            if where == "before_data":
                raise OSError(28, "No space left on device (simulated)")

        _dcp._crash_point = fail
    try:
        cd.save(mgr, state_of(model, optim, cols, {"step": 4}), 4)
        result["step4"] = "saved"
    except Exception as e:  # noqa: BLE001
        result["step4"] = f"{type(e).__name__}: {e}"
    _dcp._crash_point = lambda where, r: None
    result["latest_after_failure"] = os.path.basename(mgr.latest_checkpoint or "")
    dist.barrier()

    model2, optim2, cols2 = build(world, seed=123)
    state2 = state_of(model2, optim2, cols2, {"step": -1, "note": ""})
    assert mgr.restore(into=state2) is state2  # the manager's own restore(into=): a collective too
    result["restored"] = os.path.basename(cd.restore(mgr, state2) or "")
    apply(model2, optim2, state2)
    got = full(state_of(model2, optim2, cols2))
    want = saved[3]
    result["mismatch"] = sorted(
        k for k in want if k not in got or not torch.equal(got[k], want[k]) or got[k].dtype != want[k].dtype
    )
    result["extra"] = state2["extra"]
    result["compared"] = len(want)
    mgr.close()


def load_into(rank, world, directory, out, result):
    """dcp.load of the checkpoint ``directory`` (a checkpoint path) into this world's model, and the
    full tensors dumped; then a save of it at this world size into ``out/resaved``."""
    import torch.distributed.checkpoint as dcp

    model, optim, cols = build(world, seed=7)
    state = state_of(model, optim, cols, {"step": -1, "note": ""})
    dcp.load(state, storage_reader=cd.StorageReader(directory))
    apply(model, optim, state)
    torch.save(full(state_of(model, optim, cols)), os.path.join(out, f"loaded-rank{rank}.pt"))
    result["extra"] = state["extra"]
    dcp.save(
        state_of(model, optim, cols, state["extra"]),
        storage_writer=cd.StorageWriter(os.path.join(out, "resaved", "ckpt-3")),
    )


def killed(rank, world, directory, out, result):
    """Step 1 commits; rank 1 is SIGKILLed while writing step 2."""
    model, optim, cols = build(world)
    mgr = cd.manager(directory, max_to_keep=3)
    cd.save(mgr, state_of(model, optim, cols), 1)
    if rank == 1:

        def die(where, r):
            if where == "after_data":
                os.kill(os.getpid(), signal.SIGKILL)

        _dcp._crash_point = die
    train(model, optim, 1)
    cd.save(mgr, state_of(model, optim, cols), 2)
    result["step2"] = "saved"


def s3(rank, world, directory, out, result):
    """Two ranks save to S3 (one streamed upload each), then the same state again (nothing uploaded
    again but two empty data files), load back, and a single process reads it."""
    import torch.distributed.checkpoint as dcp

    endpoint = os.environ["S3_ENDPOINT"]
    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    model, optim, cols = build(world)
    train(model, optim, 2)
    state = state_of(model, optim, cols, {"note": "s3"})
    mgr = cd.manager(directory, max_to_keep=1, storage_options=opts)
    cd.save(mgr, state, 1)
    cd.save(mgr, state, 2)  # unchanged: points into step 1's data files; retention drops the rest of step 1
    torch.save(full(state), os.path.join(out, f"s3-rank{rank}.pt"))
    model2, optim2, cols2 = build(world, seed=5)
    state2 = state_of(model2, optim2, cols2, {"note": ""})
    dcp.load(state2, storage_reader=cd.StorageReader(directory + "/ckpt-2", storage_options=opts))
    apply(model2, optim2, state2)
    got, want = full(state_of(model2, optim2, cols2)), full(state)
    result["mismatch"] = sorted(k for k in want if not torch.equal(got[k], want[k]))
    result["extra"] = state2["extra"]
    mgr.close()


def async_save(rank, world, directory, out, result):
    """async_save=True: step 1 commits; step 2's write is held (every rank's write waits on an event)
    while the training thread trains on and runs collectives of the default group; then step 2
    commits the state as it was at save(). Step 3: rank 1's write fails, raised by
    wait_until_finished on both ranks. Then a fresh model is restored from step 2."""
    import threading

    model, optim, cols = build(world)
    mgr = cd.manager(directory, max_to_keep=3, async_save=True)
    cd.save(mgr, state_of(model, optim, cols, {"step": 1}), 1)
    mgr.wait_until_finished()

    release, writing = threading.Event(), threading.Event()

    def hold(where, r):
        if where == "before_data":
            writing.set()
            assert release.wait(60), "the training thread never released the write"

    _dcp._crash_point = hold
    train(model, optim, 1)
    state = state_of(model, optim, cols, {"step": 2})
    want = full(state)
    cd.save(mgr, state, 2)  # returns after the staging copy
    assert writing.wait(60), "the background write never started"
    # Training goes on while step 2 is being written: parameters change in place, and the
    # training collectives (default group) run while the save's collectives (its own group) wait.
    train(model, optim, 2)
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    dist.barrier()
    result["all_reduce"] = total.item()
    result["latest_while_writing"] = os.path.basename(mgr.latest_checkpoint or "")
    release.set()
    mgr.wait_until_finished()
    result["latest_after_wait"] = os.path.basename(mgr.latest_checkpoint or "")
    _dcp._crash_point = lambda where, r: None

    if rank == 1:

        def fail(where, r):
            if where == "before_data":
                raise OSError(28, "No space left on device (simulated)")

        _dcp._crash_point = fail
    cd.save(mgr, state_of(model, optim, cols, {"step": 3}), 3)
    try:
        mgr.wait_until_finished()
        result["step3"] = "saved"
    except Exception as e:  # noqa: BLE001
        result["step3"] = f"{type(e).__name__}: {e}"
    _dcp._crash_point = lambda where, r: None
    result["latest_after_failure"] = os.path.basename(mgr.latest_checkpoint or "")

    model2, optim2, cols2 = build(world, seed=123)
    state2 = state_of(model2, optim2, cols2, {"step": -1})
    result["restored"] = os.path.basename(cd.restore(mgr, state2) or "")
    apply(model2, optim2, state2)
    got = full(state_of(model2, optim2, cols2))
    result["mismatch"] = sorted(
        k for k in want if k not in got or not torch.equal(got[k], want[k]) or got[k].dtype != want[k].dtype
    )
    result["compared"] = len(want)
    result["extra"] = state2["extra"]

    # A background failure is also raised by the next save (which then saves nothing) and by close.
    def fail(where, r):
        if where == "before_data" and rank == 1:
            raise OSError(5, "I/O error (simulated)")

    _dcp._crash_point = fail
    cd.save(mgr, state_of(model, optim, cols, {"step": 4}), 4)
    try:
        cd.save(mgr, state_of(model, optim, cols, {"step": 5}), 5)
        result["step5"] = "saved"
    except Exception as e:  # noqa: BLE001
        result["step5"] = f"{type(e).__name__}: {e}"
    cd.save(mgr, state_of(model, optim, cols, {"step": 6}), 6)
    try:
        mgr.close()
        result["close"] = "closed"
    except Exception as e:  # noqa: BLE001
        result["close"] = f"{type(e).__name__}: {e}"
    _dcp._crash_point = lambda where, r: None


def raw_failure(rank, world, directory, out, result):
    """Raw dcp.save: rank 1 fails writing ckpt-5 (rank 0's data file is finished by then, and DCP
    tells the writer nothing more); then the same save retried."""
    import torch.distributed.checkpoint as dcp

    model, optim, cols = build(world)
    path = os.path.join(directory, "ckpt-5")
    if rank == 1:

        def fail(where, r):
            if where == "before_data":
                dist.barrier()  # rank 0 has written its data file
                raise OSError(28, "No space left on device (simulated)")

        _dcp._crash_point = fail
    elif rank == 0:
        _dcp._crash_point = lambda where, r: dist.barrier() if where == "after_data" else None
    try:
        dcp.save(state_of(model, optim, cols), storage_writer=cd.StorageWriter(path))
        result["first"] = "saved"
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        result["first"] = type(e).__name__
    _dcp._crash_point = lambda where, r: None
    dist.barrier()
    result["after_failure"] = sorted(os.listdir(directory))


def raw_retry(rank, world, directory, out, result):
    """Raw dcp.save of ckpt-5 again, at this world size."""
    import torch.distributed.checkpoint as dcp

    model, optim, cols = build(world)
    dcp.save(state_of(model, optim, cols), storage_writer=cd.StorageWriter(os.path.join(directory, "ckpt-5")))
    dist.barrier()
    result["after_retry"] = sorted(os.listdir(directory))


def plain_manager(rank, world, directory, out, result):
    """A plain CheckpointManager made on every rank (sync, then async_save=True), as a user writes
    it: saves of DTensor state are collectives, retention and the state file are rank 0's, and
    restore(into=) / load_checkpoint(into=) fill a fresh sharded model. A rank's own single-process
    save into its own directory still works (its writer lock is taken then)."""
    from ckpt_callbacks import CheckpointManager, load_checkpoint

    model, optim, cols = build(world)
    saved = {}
    for async_save in (False, True):
        sub = os.path.join(directory, "async" if async_save else "sync")
        mgr = CheckpointManager(sub, max_to_keep=2, async_save=async_save)
        for step in (1, 2, 3):
            train(model, optim, 1)
            state = state_of(model, optim, cols, {"step": step})
            mgr.save(state, step)
            saved[(async_save, step)] = full(state)
        mgr.wait_until_finished()
        result[f"listed_{async_save}"] = [os.path.basename(p) for p in mgr.checkpoints]
        model2, optim2, cols2 = build(world, seed=123)
        state2 = state_of(model2, optim2, cols2, {"step": -1})
        assert mgr.restore(into=state2) is state2
        result[f"resumed_{async_save}"] = mgr.resumed_from
        apply(model2, optim2, state2)
        got, want = full(state_of(model2, optim2, cols2)), saved[(async_save, 3)]
        result[f"mismatch_{async_save}"] = sorted(k for k in want if not torch.equal(got[k], want[k]))
        result[f"extra_{async_save}"] = state2["extra"]
        # An explicit older checkpoint, through the manager and through load_checkpoint.
        state3 = state_of(*build(world, seed=5), {"step": -1})
        mgr.restore("ckpt-2", into=state3)  # a name in the manager's directory
        state4 = state_of(*build(world, seed=6), {"step": -1})
        assert load_checkpoint(sub, into=state4) is state4
        result[f"explicit_{async_save}"] = [state3["extra"]["step"], state4["extra"]["step"]]
        mgr.close()
    own = CheckpointManager(os.path.join(out, f"own-rank{rank}"))
    own.save({"rank": torch.tensor([rank])}, 1)
    result["own"] = os.path.basename(own.latest_checkpoint)
    own.close()
    torch.save(saved[(False, 3)], os.path.join(out, f"sync3-rank{rank}.pt"))


def frozen_and_head(mesh, seed: int):
    """FSDP2 model: a frozen first layer (512 KiB, never trained) and a small trained head; Adam."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 6))
    model[0].requires_grad_(False)
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)


def incremental(rank, world, directory, out, result):
    """:func:`frozen_and_head` saved at steps 1-3 through a manager (max_to_keep=2), sync then
    async_save=True (each in its own directory); then a fresh model restored from step 3. And a
    manager with ``incremental=False``."""
    mesh = init_device_mesh("cpu", (world,))
    for async_save in (False, True):
        model, optim = frozen_and_head(mesh, 0)
        g = torch.Generator().manual_seed(1)
        sub = os.path.join(directory, "async" if async_save else "sync")
        mgr = cd.manager(sub, max_to_keep=2, async_save=async_save)
        for step in (1, 2, 3):
            model(torch.randn(4, 256, generator=g)).pow(2).mean().backward()
            optim.step()
            optim.zero_grad()
            msd, osd = get_state_dict(model, optim)
            state = {"model": msd, "optim": osd, "extra": {"step": step}}
            cd.save(mgr, state, step)
            if step == 2 and not async_save:
                # A new manager, as after a restart: step 3 compares with step 2's index (its
                # chunks), not with the writer's memory; its start-up sweep keeps step 1's files.
                mgr.close()
                mgr = cd.manager(sub, max_to_keep=2)
        mgr.wait_until_finished()
        want = full(state)
        result[f"listed_{async_save}"] = [os.path.basename(p) for p in mgr.checkpoints]
        model2, optim2 = frozen_and_head(mesh, 123)
        msd, osd = get_state_dict(model2, optim2)
        state2 = {"model": msd, "optim": osd, "extra": {"step": -1}}
        result[f"restored_{async_save}"] = os.path.basename(cd.restore(mgr, state2) or "")
        apply(model2, optim2, state2)
        msd, osd = get_state_dict(model2, optim2)
        got = full({"model": msd, "optim": osd})
        result[f"mismatch_{async_save}"] = sorted(
            k for k in want if k not in got or not torch.equal(got[k], want[k])
        )
        result[f"compared_{async_save}"] = len(want)
        result[f"extra_{async_save}"] = state2["extra"]
        mgr.close()
        torch.save(want, os.path.join(out, f"incremental-{'async' if async_save else 'sync'}-rank{rank}.pt"))
    # incremental=False: the same model saved twice, written twice
    model, _ = frozen_and_head(mesh, 0)
    with cd.manager(os.path.join(directory, "full"), incremental=False) as mgr:
        for step in (1, 2):
            cd.save(mgr, {"model": get_model_state_dict(model)}, step)


SCENARIOS = {
    "plain_manager": plain_manager,
    "raw_failure": raw_failure,
    "raw_retry": raw_retry,
    "async_save": async_save,
    "save_and_restore": save_and_restore,
    "load_into": load_into,
    "killed": killed,
    "s3": s3,
    "incremental": incremental,
}

if __name__ == "__main__":
    main()
