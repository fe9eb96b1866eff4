"""Crash-test child: a zygote that imports everything once and forks one worker per trial.

Protocol (one JSON object per line on stdin; answers on stdout):

    {"cmd": "run", "dir": ..., "mode": "loop" | "count" | "crash_at", ...}  ->  {"pid": worker pid}
    {"cmd": "kill"}   SIGKILL the worker now (if still running), reap it  ->  {"status": wait status}
    {"cmd": "wait"}   reap the worker                                     ->  {"status": wait status}

The zygote is the worker's parent, so it kills and reaps it without any pid-reuse race. Workers:

- ``loop``: open a manager on ``dir`` and save steps latest+1, latest+2, ... forever, appending each
  step to ``dir``/../journal once ``save`` (and, for async, ``wait_until_finished``) returned.
- ``count``: run ``save_steps`` with every hook point recorded, write the event list to ``events``.
- ``crash_at``: the same, but SIGKILL itself right before hook event number ``event``.

Hook points are the ``_crash_point`` seams of the commit protocol plus every ``os`` call the local
storage makes (open, write, fsync, replace, remove, unlink), so a crash lands before or after each
data write, meta, index, state file and each deletion.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import rel_workload as wl

from ckpt_callbacks import CheckpointManager
from ckpt_callbacks._checkpoint import _checkpoint_io

_OS_HOOKS = ("open", "write", "fsync", "replace", "remove", "unlink", "ftruncate", "pwrite")


def _install_hooks(on_event) -> None:
    _checkpoint_io._crash_point = lambda name: on_event(f"point:{name}")
    for fn_name in _OS_HOOKS:
        real = getattr(os, fn_name)

        def hooked(*args, __real=real, __name=fn_name, **kwargs):
            on_event(f"os.{__name}:{_describe(args)}")
            return __real(*args, **kwargs)

        setattr(os, fn_name, hooked)


def _describe(args) -> str:
    if args and isinstance(args[0], str):
        return os.path.basename(args[0])
    return "fd"


def _manager_for(directory: str, step_box: list[int], async_save: bool = False) -> CheckpointManager:
    return CheckpointManager(
        directory,
        prefix=wl.PREFIX,
        max_to_keep=wl.MAX_TO_KEEP,
        keep_checkpoint_every_n_hours=wl.HOURS,
        async_save=async_save,
        clock=lambda: wl.clock_for(step_box[0]),
    )


def _latest_step(mgr: CheckpointManager) -> int:
    latest = mgr.latest_checkpoint
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def _loop(cmd: dict) -> None:
    directory = cmd["dir"]
    journal = os.open(cmd["journal"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    step_box = [0]
    # The clock reads the step about to be saved; before the manager exists that is not known yet,
    # so peek at the state file the way the manager will.
    from ckpt_callbacks import latest_checkpoint

    latest = latest_checkpoint(directory)
    step_box[0] = (int(latest.rsplit("-", 1)[1]) if latest else 0) + 1
    mgr = _manager_for(directory, step_box, async_save=cmd.get("async", False))
    step = _latest_step(mgr) + 1
    while True:
        step_box[0] = step
        mgr.save(wl.state_for(step), step=step)
        mgr.wait_until_finished()
        os.write(journal, f"{step}\n".encode())
        step += 1


def _scripted(cmd: dict) -> None:
    """Open a manager (events counted from here: the leftovers cleanup is covered) and save."""
    events: list[str] = []
    target = cmd.get("event", -1)

    def on_event(name: str) -> None:
        events.append(name)
        if len(events) - 1 == target:
            os.kill(os.getpid(), signal.SIGKILL)

    steps = cmd["save_steps"]
    step_box = [steps[0] if steps else 1]
    _install_hooks(on_event)
    mgr = _manager_for(cmd["dir"], step_box)
    for step in steps:
        step_box[0] = step
        mgr.save(wl.state_for(step), step=step)
    mgr.close()
    if cmd["mode"] == "count":
        with open(cmd["events"], "w") as f:
            json.dump(events, f)


def _worker(cmd: dict) -> None:
    try:
        if cmd["mode"] == "loop":
            _loop(cmd)
        else:
            _scripted(cmd)
    except BaseException:
        import traceback

        traceback.print_exc()
        os._exit(3)
    os._exit(0)


def main() -> None:
    out = sys.stdout
    pid = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "run":
            out.flush()
            pid = os.fork()
            if pid == 0:
                sys.stdin.close()
                _worker(cmd)
            out.write(json.dumps({"pid": pid}) + "\n")
        elif cmd["cmd"] in ("kill", "wait"):
            if cmd["cmd"] == "kill":
                os.kill(pid, signal.SIGKILL)  # a zombie is still ours: no pid-reuse race
            _, status = os.waitpid(pid, 0)
            out.write(
                json.dumps(
                    {"status": status, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}
                )
                + "\n"
            )
            pid = None
        out.flush()


if __name__ == "__main__":
    main()
