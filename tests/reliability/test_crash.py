"""Crash consistency (README, "Guarantees"): real processes SIGKILLed at random moments and at every step.

A zygote child imports the library once and forks a worker per trial (see ``_crash_child.py``), so a
trial costs a fork, not an interpreter start. After each kill ``verify_after_crash`` checks the state
file, every listed checkpoint bit for bit, retention against an independent TF-rules model, foreign
files, and that the next manager start removes exactly the interrupted save's leftovers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest
import rel_harness
import rel_workload as wl
from rel_harness import verify_after_crash

from ckpt_callbacks import CheckpointManager

pytestmark = pytest.mark.timeout(600)
zygote = rel_harness.zygote  # the fixture


def _journal(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [int(x) for x in f.read().split()]


def _random_kills(zygote, tmp_path, trials: int, seed: int) -> dict:
    directory = str(tmp_path / "run")
    journal = str(tmp_path / "journal")
    wl.write_foreign_files(directory)
    rng = random.Random(seed)
    stats = {"trials": 0, "with_leftovers": 0, "saves": 0, "async_trials": 0}
    latest = 0
    for trial in range(trials):
        async_save = trial % 4 == 3
        zygote.run(dir=directory, mode="loop", journal=journal, **{"async": async_save})
        # Many kills land in the manager start (lock, state, cleanup), most in a save.
        time.sleep(rng.choice([0.0, 0.005, 0.02]) + rng.uniform(0.0, 0.12))
        status = zygote.kill()
        assert status["signal"] == signal.SIGKILL, f"worker exited on its own: {status}"
        # Committed: every journaled step, and whatever the state file named after the last trial
        # (a save can commit and be killed before its journal line). At most one more can be.
        committed = max(max(_journal(journal), default=0), latest)
        result = verify_after_crash(directory, committed, committed + 1)
        latest = result["latest"]
        stats["trials"] += 1
        stats["with_leftovers"] += result["leftovers"] > 0
        stats["async_trials"] += async_save
    stats["saves"] = latest
    return stats


def test_random_sigkill_short(zygote, tmp_path):
    stats = _random_kills(zygote, tmp_path, trials=25, seed=1)
    assert stats["saves"] > 0
    print("random SIGKILL (short):", stats)


@pytest.mark.slow
def test_random_sigkill_200_trials(zygote, tmp_path):
    stats = _random_kills(zygote, tmp_path, trials=500, seed=2)
    # The kills must land both between and inside saves for the test to mean anything.
    assert stats["with_leftovers"] >= 10, stats
    assert stats["saves"] >= 50, stats
    print("random SIGKILL:", stats)


# ---------------------------------------------------------------- deterministic: every hook event


def _prepare(directory: str, steps, leftovers_of: int | None = None) -> None:
    """Commit ``steps`` with the children's configuration; optionally add an interrupted save's files."""
    wl.write_foreign_files(directory)
    box = [steps[0]]
    mgr = CheckpointManager(
        directory,
        prefix=wl.PREFIX,
        max_to_keep=wl.MAX_TO_KEEP,
        keep_checkpoint_every_n_hours=wl.HOURS,
        clock=lambda: wl.clock_for(box[0]),
    )
    for s in steps:
        box[0] = s
        mgr.save(wl.state_for(s), step=s)
    mgr.close()
    if leftovers_of is not None:
        # The files an interrupted save of step `leftovers_of` leaves: data and meta committed by
        # os.replace, the index still a temp file, plus a half-written state-file temp.
        scratch = directory + "-scratch"
        CheckpointManager(scratch, max_to_keep=None).save(wl.state_for(leftovers_of), step=leftovers_of)
        name = f"{wl.PREFIX}-{leftovers_of}"
        for f in wl.checkpoint_files(scratch, name):
            target = f if not f.endswith(".index") else f".{f}.tmp-0123abcd"
            shutil.copy(os.path.join(scratch, f), os.path.join(directory, target))
        with open(os.path.join(directory, ".checkpoint.tmp-89abcdef"), "wb") as fh:
            fh.write(b'model_checkpoint_path: "ckpt-')
        shutil.rmtree(scratch)


SCENARIOS = {
    # one save that drops a checkpoint (and preserves none)
    "save_and_delete": dict(prepared=[1, 2, 3], leftovers_of=None, save=[4]),
    # start on an interrupted save's leftovers, then two saves: one preserves hourly, one deletes
    "cleanup_then_two_saves": dict(prepared=list(range(1, 61)), leftovers_of=61, save=[61, 62]),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_sigkill_at_every_step_of_the_commit_protocol(zygote, tmp_path, scenario):
    sc = SCENARIOS[scenario]
    template = str(tmp_path / "template")
    _prepare(template, sc["prepared"], sc["leftovers_of"])
    last_committed = sc["prepared"][-1]

    count_dir = str(tmp_path / "count")
    shutil.copytree(template, count_dir)
    events_file = str(tmp_path / "events.json")
    zygote.run(dir=count_dir, mode="count", save_steps=sc["save"], events=events_file)
    assert zygote.wait()["status"] == 0
    with open(events_file) as f:
        events = json.load(f)
    points = {e for e in events if e.startswith("point:")}
    assert {
        "point:before_data",
        "point:after_data",
        "point:after_meta",
        "point:after_index",
        "point:before_state",
        "point:after_state",
        "point:before_delete",
        "point:after_delete",
    } <= points
    assert any(e.startswith("os.replace:.ckpt-") for e in events)
    verify_after_crash(count_dir, sc["save"][-1], sc["save"][-1])

    latest_seen = set()
    for i, event in enumerate(events):
        d = str(tmp_path / f"crash-{i}")
        shutil.copytree(template, d)
        zygote.run(dir=d, mode="crash_at", save_steps=sc["save"], event=i)
        status = zygote.wait()
        assert status["signal"] == signal.SIGKILL, f"event {i} ({event}) did not crash: {status}"
        try:
            result = verify_after_crash(d, last_committed, sc["save"][-1])
        except AssertionError as e:
            raise AssertionError(f"after SIGKILL at event {i}: {event}: {e}") from e
        latest_seen.add(result["latest"])
        shutil.rmtree(d)
    # the crash sweep covered "not yet committed" and "committed" for every save
    assert latest_seen == {last_committed, *sc["save"]}
    print(f"{scenario}: {len(events)} SIGKILL points, all consistent")
