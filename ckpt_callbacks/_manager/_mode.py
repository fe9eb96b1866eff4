"""``mode="auto"``: whether a larger or a smaller monitored metric is better, from its name.

Keras 3's callbacks (``ModelCheckpoint``, ``EarlyStopping``) decide ``"auto"`` as follows: ``loss`` and
``val_loss`` are minimised; any other name is looked up among the model's compiled metric objects and
follows that metric's direction; a name that matches none is an error. The core has no model, so it
uses the name rule Keras 2 used (documented on `CheckpointManager`), extended to the metric families Keras 3 marks as
"up": a name (``val_`` prefix removed) containing one of :data:`MAX_NAME_PARTS` is maximised,
anything else (losses, errors, distances) minimised. The Keras callback first asks the model's metric
objects, exactly as Keras does, and falls back to this rule.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("ckpt_callbacks")

MODES = ("auto", "min", "max")

# Lower-case substrings of a metric name that mean "higher is better": accuracy ("acc" also covers
# "accuracy", "top_k_categorical_accuracy"), AUC, precision / recall (and "precision_at_recall"...),
# F-scores, IoU, R², correlations: every Keras 3 metric class with direction "up".
MAX_NAME_PARTS = (
    "acc",
    "auc",
    "precision",
    "recall",
    "f1",
    "fbeta",
    "f_beta",
    "fmeasure",
    "iou",
    "r2",
    "sensitivity",
    "specificity",
    "pearson",
    "concordance",
)


def direction_from_name(monitor: str | None) -> str:
    """``"max"`` or ``"min"`` for a metric name, by the rule in the module docstring."""
    if not monitor:
        return "min"
    name = monitor.lower()
    name = name[len("val_") :] if name.startswith("val_") else name
    if name == "loss" or name.endswith("_loss") or "error" in name:
        return "min"
    return "max" if any(part in name for part in MAX_NAME_PARTS) else "min"


def resolve_mode(monitor: str | None, mode: str) -> str:
    """``mode`` itself when it is ``"min"`` or ``"max"``; for ``"auto"``, the direction of ``monitor``."""
    return direction_from_name(monitor) if mode == "auto" else mode


class MonitoredMetric:
    """A save's ``metrics[monitor]`` as the number ``keep_best`` ranks by, or None when it lacks it.

    Saves between evaluations legitimately lack it (the callbacks leave a validation metric out of
    saves made where it was not measured), so this is said once, and only while no save has carried
    it: a monitor that is never logged means keep_best keeps nothing.
    """

    def __init__(self, monitor: str | None, keep_best: int | None) -> None:
        self.monitor, self.keep_best, self.warned, self.seen = monitor, keep_best, False, False

    def __call__(self, metrics: dict[str, Any] | None) -> float | None:
        if not self.monitor or not metrics or self.monitor not in metrics:
            if self.keep_best and not self.warned and not self.seen:
                self.warned = True
                logger.warning(
                    "keep_best=%d ranks checkpoints by metrics[%r], and no save has carried it so far "
                    "(this one has: %s). A save without it is kept only by max_to_keep / hourly retention, "
                    "which is expected between evaluations; if %r is never logged, log it or change monitor.",
                    self.keep_best,
                    self.monitor,
                    sorted(metrics or {}),
                    self.monitor,
                )
            return None
        self.seen = True
        try:
            return float(metrics[self.monitor])
        except (TypeError, ValueError):
            raise TypeError(
                f"metrics[{self.monitor!r}] must be a number. Received: {metrics[self.monitor]!r}."
            ) from None
