"""The save decision both framework callbacks share: pure, no framework, table-tested.

"Save now?" at a train-batch end is yes when

- the global optimizer step crossed a multiple of ``every_n_steps`` since the last batch end seen
  (crossed, not equal: Keras calls its batch hooks once per ``steps_per_execution`` steps, so the
  step may jump past the multiple), or
- at least ``every_n_seconds`` passed on the injected clock since the last save (or train start),

and never twice at one step: a step already saved is not saved again (an epoch-end or train-end
save right after a step save, a resume at the saved step). The counters travel in
``state_dict()`` / ``load_state_dict()`` (the Lightning callback's key names).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class SaveTrigger:
    """The step / time trigger and its counters.

    Call :meth:`start` when training starts, :meth:`batch_end` at each train-batch end (it says
    whether to save), :meth:`is_saved` before an epoch-end or train-end save, and :meth:`saved`
    once a save is made. Under data parallelism only rank 0 should read the clock: pass the
    broadcast answer of :meth:`time_due` to :meth:`batch_end` as ``time_due``.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.clock = clock
        self.last_saved_step: int | None = None
        self.last_step_seen = 0
        self.num_saves = 0
        self.last_save_time = 0.0

    def start(self, step: int) -> None:
        """Training (re)starts at ``step``: steps and seconds count from here."""
        self.last_step_seen = int(step)
        self.last_save_time = float(self.clock())

    def time_due(self) -> bool:
        """Whether ``every_n_seconds`` passed since the last save (or :meth:`start`)."""
        if not self.every_n_seconds:
            return False
        return float(self.clock()) - self.last_save_time >= self.every_n_seconds

    def step_crossed(self, step: int) -> bool:
        """Whether ``step`` is past a multiple of ``every_n_steps`` the last step seen was not."""
        n = self.every_n_steps
        return n is not None and n > 0 and step // n > self.last_step_seen // n

    def batch_end(self, step: int, *, time_due: bool | None = None) -> bool:
        """A train batch ended at global step ``step``: save now? Records ``step`` as seen."""
        crossed = self.step_crossed(step)
        due = self.time_due() if time_due is None else time_due
        self.last_step_seen = int(step)
        return (crossed or due) and not self.is_saved(step)

    def is_saved(self, step: int) -> bool:
        """Whether ``step`` is the step saved last (so not to be saved again)."""
        return step == self.last_saved_step

    def saved(self, step: int) -> None:
        """A save of ``step`` was made: the time trigger restarts, the count goes up."""
        self.last_saved_step = int(step)
        self.last_save_time = float(self.clock())
        self.num_saves += 1

    def resumed(self, step: int, num_saves: int = 0) -> None:
        """Training resumed from a checkpoint of ``step`` (itself saved: not saved again)."""
        self.last_saved_step = int(step)
        self.last_step_seen = int(step)
        self.num_saves = int(num_saves)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_saved_step": self.last_saved_step,
            "last_step_seen": self.last_step_seen,
            "num_saves": self.num_saves,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("last_saved_step")
        self.last_saved_step = None if saved is None else int(saved)
        self.last_step_seen = int(state.get("last_step_seen") or 0)
        self.num_saves = int(state.get("num_saves") or 0)
