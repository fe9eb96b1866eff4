"""The save trigger both callbacks share, as a table: each row a sequence of batch ends."""

from __future__ import annotations

import pytest

from ckpt_callbacks._callbacks._trigger import SaveTrigger

# (every_n_steps, every_n_seconds, [(global step at a batch end, seconds passed before it)], steps saved)
TABLE = [
    pytest.param(3, None, [(s, 0) for s in range(1, 10)], [3, 6, 9], id="steps: every multiple"),
    pytest.param(
        3,
        None,
        [(2, 0), (4, 0), (6, 0), (8, 0), (10, 0), (12, 0)],
        [4, 6, 10, 12],
        id="steps: crossed, not equal (steps_per_execution=2)",
    ),
    pytest.param(5, None, [(4, 0), (9, 0), (14, 0)], [9, 14], id="steps: a jump past a multiple saves once"),
    pytest.param(2, None, [(2, 0), (2, 0), (2, 0)], [2], id="steps: never twice at one step"),
    pytest.param(100, None, [(7, 0), (99, 0)], [], id="steps: no multiple reached"),
    pytest.param(
        None,
        10.0,
        [(1, 4), (2, 4), (3, 4), (4, 4), (5, 4), (6, 4)],
        [3, 6],
        id="seconds: from start, then from the last save",
    ),
    pytest.param(None, 10.0, [(1, 10)], [1], id="seconds: exactly N is due"),
    pytest.param(None, 10.0, [(1, 9.99)], [], id="seconds: just under N is not"),
    pytest.param(None, 5.0, [(1, 6), (1, 6)], [1], id="seconds: never twice at one step"),
    pytest.param(4, 30.0, [(1, 10), (2, 10), (3, 11), (4, 1), (5, 1)], [3, 4], id="either trigger saves"),
    pytest.param(None, None, [(s, 1000) for s in range(1, 20)], [], id="no trigger: never"),
]


@pytest.mark.parametrize("every_n_steps, every_n_seconds, batch_ends, saved", TABLE)
def test_batch_end_decisions(fake_clock, every_n_steps, every_n_seconds, batch_ends, saved):
    trigger = SaveTrigger(every_n_steps, every_n_seconds, clock=fake_clock)
    trigger.start(0)
    made = []
    for step, dt in batch_ends:
        fake_clock.advance(dt)
        if trigger.batch_end(step):
            trigger.saved(step)
            made.append(step)
    assert made == saved
    assert trigger.num_saves == len(saved)
    assert trigger.last_saved_step == (saved[-1] if saved else None)


@pytest.mark.parametrize(
    "start, resumed_at, next_steps, saved",
    [
        pytest.param(0, 6, [7, 8, 9, 10, 11, 12], [9, 12], id="resume counts multiples from the saved step"),
        pytest.param(0, 9, [9, 10, 12], [12], id="the resumed step itself is not saved again"),
    ],
)
def test_resume(fake_clock, start, resumed_at, next_steps, saved):
    trigger = SaveTrigger(3, None, clock=fake_clock)
    trigger.start(start)
    trigger.resumed(resumed_at, num_saves=2)
    made = [s for s in next_steps if trigger.batch_end(s) and (trigger.saved(s) or True)]
    assert made == saved and trigger.num_saves == 2 + len(saved)


def test_is_saved_guards_epoch_and_train_end_saves(fake_clock):
    trigger = SaveTrigger(2, None, clock=fake_clock)
    trigger.start(0)
    assert trigger.batch_end(2)
    trigger.saved(2)
    assert trigger.is_saved(2) and not trigger.is_saved(3)


def test_time_due_from_rank_zero_overrides_the_local_clock(fake_clock):
    """Under DDP only rank 0 reads the clock; the others pass its broadcast answer."""
    trigger = SaveTrigger(None, 10.0, clock=fake_clock)
    trigger.start(0)
    assert trigger.batch_end(1, time_due=True)
    fake_clock.advance(100)
    assert not trigger.batch_end(2, time_due=False)


def test_counters_round_trip_through_state_dict(fake_clock_cls):
    clock = fake_clock_cls()
    a = SaveTrigger(3, 60.0, clock=clock)
    a.start(0)
    for step in range(1, 8):
        if a.batch_end(step):
            a.saved(step)
    state = a.state_dict()
    assert state == {"last_saved_step": 6, "last_step_seen": 7, "num_saves": 2}
    b = SaveTrigger(3, 60.0, clock=clock)
    b.load_state_dict(state)
    assert b.state_dict() == state
    b.start(7)  # what a callback does at train start, after the framework loaded its state
    assert [s for s in (8, 9) if b.batch_end(s)] == [9]


def test_an_empty_state_dict_is_a_fresh_start():
    trigger = SaveTrigger(3)
    trigger.load_state_dict({})
    assert trigger.state_dict() == {"last_saved_step": None, "last_step_seen": 0, "num_saves": 0}
