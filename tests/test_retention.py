"""Retention policies as tables (README, "Retention, with a worked example"): pure functions of records."""

from __future__ import annotations

import pytest

from ckpt_callbacks._manager._retention import BestN, EveryNHours, LatestN, Record, Retention

H = 3600.0


def records(*specs):
    """specs: (step, hours, status, metric)."""
    return [Record(f"ckpt-{s}", s, h * H, st, m) for s, h, st, m in specs]


def run(policy: Retention, saves, last_preserved=-1.0):
    """Apply retention after each save of (step, hours, metric); return survivors and last_preserved."""
    kept: list[Record] = []
    for step, hours, metric in saves:
        decision = policy.apply(
            [*kept, Record(f"ckpt-{step}", step, hours * H, "active", metric)], last_preserved
        )
        kept, last_preserved = decision.kept, decision.last_preserved
    return [r.step for r in kept], {r.step: r.status for r in kept}, last_preserved


@pytest.mark.parametrize(
    "n, steps, survivors",
    [
        (1, [1, 2, 3], [3]),
        (2, [1, 2, 3, 4], [3, 4]),
        (5, [1, 2, 3], [1, 2, 3]),
        (None, [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]),
    ],
)
def test_latest_n(n, steps, survivors):
    assert run(Retention(LatestN(n)), [(s, s / 10, None) for s in steps])[0] == survivors


@pytest.mark.parametrize(
    "hours, saves, survivors, preserved",
    [
        # one save every 20 minutes, max_to_keep=2, one kept per hour (TF: measured from last_preserved=-1s)
        (1.0, [(s, s / 3, None) for s in range(1, 10)], [3, 6, 8, 9], [3, 6]),
        # every 2 hours: fewer preserved
        (2.0, [(s, s / 3, None) for s in range(1, 10)], [6, 8, 9], [6]),
        # saves far apart: every checkpoint leaving the window is preserved
        (0.5, [(s, s, None) for s in range(1, 6)], [1, 2, 3, 4, 5], [1, 2, 3]),
    ],
)
def test_every_n_hours(hours, saves, survivors, preserved):
    steps, status, _ = run(Retention(LatestN(2), EveryNHours(hours)), saves)
    assert steps == survivors
    assert [s for s, st in status.items() if st == "hourly"] == preserved


@pytest.mark.parametrize(
    "mode, metrics, survivors",
    [
        ("min", [5, 1, 4, 3, 6, 7], [2, 4, 5, 6]),  # best two by min: steps 2 (1) and 4 (3)
        ("max", [5, 1, 4, 3, 6, 7], [5, 6]),  # best two by max are the newest two: nothing else survives
        ("max", [9, 1, 8, 3, 6, 7], [1, 3, 5, 6]),
        ("min", [None, None, 2, None], [3, 4]),  # no metric: never "best"
    ],
)
def test_keep_best(mode, metrics, survivors):
    policy = Retention(LatestN(2), None, BestN(2, "loss", mode))
    saves = [(i + 1, i, m) for i, m in enumerate(metrics)]
    assert run(policy, saves)[0] == survivors


def test_best_and_hourly_compose():
    policy = Retention(LatestN(1), EveryNHours(1.0), BestN(1, "loss"))
    steps, status, last = run(policy, [(1, 0.0, 9.0), (2, 0.1, 1.0), (3, 1.5, 5.0), (4, 1.6, 4.0)])
    assert steps == [2, 3, 4]
    assert status == {2: "best", 3: "hourly", 4: "active"}
    assert last == 1.5 * H


def test_newest_and_protected_never_deleted():
    policy = Retention(LatestN(1), protected=frozenset({"ckpt-1"}))
    decision = policy.apply(records((1, 0, "active", None), (2, 1, "active", None)), -1.0)
    assert [r.step for r in decision.kept] == [1, 2]


def test_dropping_best_is_reconsidered_when_a_better_one_arrives():
    policy = Retention(LatestN(1), None, BestN(1, "loss"))
    steps, _, _ = run(policy, [(1, 0, 1.0), (2, 1, 5.0), (3, 2, 0.5), (4, 3, 9.0)])
    assert steps == [3, 4]


def test_hourly_decision_is_made_once_per_checkpoint():
    """A best-kept checkpoint is not re-offered to the hourly policy later (TF sweeps each once)."""
    policy = Retention(LatestN(1), EveryNHours(1.0), BestN(1, "loss"))
    steps, status, _ = run(policy, [(1, 0.0, 0.1), (2, 0.2, 5.0), (3, 3.0, 6.0)])
    assert status[1] == "best" and 2 not in status and status[3] == "active"


@pytest.mark.parametrize(
    "mode, metrics, top",
    [
        ("max", [0.5, 0.9, 0.9, 0.7], 2),  # a later save tagged with the same value does not win
        ("min", [3.0, 1.0, 1.0, 1.0], 2),
        ("min", [None, 2.0, None], 2),  # saves without the value never rank
        ("min", [None, None], None),
    ],
)
def test_best_ties_go_to_the_checkpoint_that_scored_first(mode, metrics, top):
    rs = [Record(f"ckpt-{i + 1}", i + 1, float(i), "active", m) for i, m in enumerate(metrics)]
    best = BestN(1, "m", mode)
    assert best.top(rs) == (f"ckpt-{top}" if top else None)
    policy = Retention(LatestN(1), None, best)
    steps, _, _ = run(policy, [(i + 1, i, m) for i, m in enumerate(metrics)])
    if top is not None:
        assert top in steps
