"""A problem is reported once: as a warning, not also as a log line (or the other way round)."""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ckpt_callbacks import CheckpointManager


def test_restore_skipping_a_corrupt_checkpoint_reports_it_once(tmp_path, caplog):
    d = tmp_path / "run"
    with CheckpointManager(str(d), max_to_keep=3) as mgr:
        for step in (1, 2):
            mgr.save({"w": np.full(8, step, np.float32)}, step=step)
    data = d / "ckpt-2.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with (
        warnings.catch_warnings(record=True) as caught,
        caplog.at_level(logging.DEBUG, logger="ckpt_callbacks"),
        CheckpointManager(str(d), max_to_keep=3) as mgr,
    ):
        warnings.simplefilter("always")
        path, state = mgr.restore_with_path()
    assert path.endswith("ckpt-1") and state["w"][0] == 1
    reports = [str(w.message) for w in caught if "ckpt-2" in str(w.message)]
    reports += [r.getMessage() for r in caplog.records if "ckpt-2" in r.getMessage()]
    assert len(reports) == 1 and "falling back to an older one" in reports[0], reports
