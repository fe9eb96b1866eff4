"""Retention: which checkpoints survive a save. Pure functions of records; no I/O.

The rules (README, "Retention") are TensorFlow ``CheckpointManager``'s, plus ``keep_best``:

- ``LatestN``: the newest N "active" checkpoints form the window.
- A checkpoint that leaves the window is offered, once, to ``EveryNHours``: preserved forever if its
  timestamp is at least N hours after ``last_preserved_timestamp`` (which then moves to it).
- Otherwise it survives while ``BestN`` ranks it among the best K by ``metrics[monitor]``.

"Keep the last 5 plus one per hour plus the best 3" is ``Retention(LatestN(5), EveryNHours(1), BestN(3, ...))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace


@dataclass
class Record:
    """One kept checkpoint as retention sees it."""

    name: str
    step: int
    timestamp: float
    status: str = "active"  # "active" (in the max_to_keep window), "hourly" or "best"
    metric: float | None = None
    shards: int | None = None
    # Data files of other checkpoints this one points into (incremental saves); None: unknown (a
    # record rebuilt from TensorFlow's fields only), read from its index when it matters.
    refs: tuple[str, ...] | None = ()


@dataclass(frozen=True)
class LatestN:
    """The newest ``n`` active checkpoints; ``None`` keeps every checkpoint active."""

    n: int | None

    def window(self, active: Sequence[Record]) -> tuple[list[Record], list[Record]]:
        """Split active records (oldest first) into (leaving the window, staying in it)."""
        if self.n is None or len(active) <= self.n:
            return [], list(active)
        cut = len(active) - self.n
        return list(active[:cut]), list(active[cut:])


@dataclass(frozen=True)
class EveryNHours:
    """TensorFlow's ``keep_checkpoint_every_n_hours``: one checkpoint per N hours, forever."""

    hours: float
    reason: str = "hourly"

    def preserve(self, record: Record, last_preserved: float) -> bool:
        return record.timestamp - self.hours * 3600.0 >= last_preserved


@dataclass(frozen=True)
class BestN:
    """The best ``k`` checkpoints by ``metrics[monitor]`` (lower is better for mode="min")."""

    k: int
    monitor: str
    mode: str = "min"
    reason: str = "best"

    def ranked(self, records: Sequence[Record]) -> list[Record]:
        """The records that carry a score, best first."""
        scored = [r for r in records if r.metric is not None and not math.isnan(r.metric)]
        sign = 1.0 if self.mode == "min" else -1.0
        # Ties go to the checkpoint that scored first, as Keras' and Lightning's monitors (a strict
        # improvement is needed to replace the best): a later save tagged with the same value never
        # displaces the checkpoint the value was measured at.
        scored.sort(
            key=lambda r: (sign * (r.metric if r.metric is not None else math.nan), r.step, r.timestamp)
        )
        return scored

    def best(self, records: Sequence[Record]) -> set[str]:
        return {r.name for r in self.ranked(records)[: self.k]}

    def top(self, records: Sequence[Record]) -> str | None:
        """The name of the best record, or None when none carries a score."""
        ranked = self.ranked(records)
        return ranked[0].name if ranked else None


@dataclass(frozen=True)
class Decision:
    kept: list[Record]
    deleted: list[Record]
    last_preserved: float


@dataclass(frozen=True)
class Retention:
    """The composition applied after every committed save."""

    latest: LatestN
    hourly: EveryNHours | None = None
    best: BestN | None = None
    protected: frozenset[str] = field(default_factory=frozenset)

    def apply(self, records: Sequence[Record], last_preserved: float) -> Decision:
        """Records are every kept checkpoint, oldest first, the new one last."""
        active = [r for r in records if r.status == "active"]
        leaving, _ = self.latest.window(active)
        updated: dict[str, Record] = {}
        for r in leaving:  # oldest first, like TensorFlow's sweep
            if self.hourly is not None and self.hourly.preserve(r, last_preserved):
                last_preserved = r.timestamp
                updated[r.name] = replace(r, status="hourly")
            else:
                updated[r.name] = replace(r, status="best")  # candidate: survives only if best
        candidates = [updated.get(r.name, r) for r in records]
        best = self.best.best(candidates) if self.best is not None else set()
        newest = records[-1].name if records else None
        kept, deleted = [], []
        for r in candidates:
            if r.status != "best" or r.name in best or r.name == newest:
                kept.append(r)
            elif r.name in self.protected:  # the checkpoint this run resumed from
                kept.append(r)
            else:
                deleted.append(r)
        return Decision(kept, deleted, last_preserved)
