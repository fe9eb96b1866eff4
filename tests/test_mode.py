"""mode="auto" (SPEC §2.1): one case per rule of the name rule, and the manager's default."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ckpt_callbacks import CheckpointManager
from ckpt_callbacks._manager._mode import direction_from_name, resolve_mode


@pytest.mark.parametrize(
    ("monitor", "expected"),
    [
        ("loss", "min"),  # the loss, with and without val_
        ("val_loss", "min"),
        ("val_reconstruction_loss", "min"),  # any *_loss
        ("val_mean_squared_error", "min"),  # errors
        ("val_mean_absolute_percentage_error", "min"),
        ("val_kl_divergence", "min"),  # anything unrecognised
        ("accuracy", "max"),  # accuracy-like, any spelling Keras produces
        ("val_acc", "max"),
        ("val_sparse_categorical_accuracy", "max"),
        ("val_top_k_categorical_accuracy", "max"),
        ("val_auc", "max"),
        ("val_auc_1", "max"),
        ("val_precision", "max"),
        ("val_recall", "max"),
        ("val_f1_score", "max"),
        ("val_fbeta_score", "max"),
        ("val_mean_iou", "max"),
        ("val_r2_score", "max"),
        ("val_Accuracy", "max"),  # case-insensitive
        (None, "min"),
    ],
)
def test_auto_name_rule(monitor, expected):
    assert direction_from_name(monitor) == expected
    assert resolve_mode(monitor, "auto") == expected


@pytest.mark.parametrize("mode", ["min", "max"])
def test_an_explicit_mode_is_kept(mode):
    assert resolve_mode("val_accuracy", mode) == mode


def test_manager_defaults_to_auto_and_keeps_the_best_accuracy(tmp_path):
    """keep_best=1, monitor='val_accuracy', no mode: the highest accuracy survives rotation."""
    with CheckpointManager(str(tmp_path), max_to_keep=1, keep_best=1, monitor="val_accuracy") as mgr:
        for step, acc in [(64, 0.9453), (128, 0.957), (192, 0.93)]:
            mgr.save({"w": np.zeros(2)}, step=step, metrics={"val_accuracy": acc})
        assert [os.path.basename(p) for p in mgr.checkpoints] == ["ckpt-128", "ckpt-192"]


def test_mode_is_checked(tmp_path):
    with pytest.raises(ValueError, match="'auto', 'min' or 'max'.*mode='maximum'"):
        CheckpointManager(str(tmp_path), mode="maximum")
