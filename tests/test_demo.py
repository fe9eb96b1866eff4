"""The README's demo, core part: killed by SIGKILL mid-run, resumed, bit-identical to an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.py")


def test_core_demo_resumes_exactly(tmp_path):
    out = subprocess.run(
        [sys.executable, DEMO, "--only", "core", "--url", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "exit status -9" in out.stdout
    assert "core       resumed exactly: yes" in out.stdout
    assert "hourly" in out.stdout and "ckpt-60 *" in out.stdout


def test_lightning_demo_resumes_exactly_and_lists_its_metrics(tmp_path):
    out = subprocess.run(
        [sys.executable, DEMO, "--only", "lightning", "--url", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lightning  resumed exactly: yes" in out.stdout, out.stdout
    rows = [line for line in out.stdout.splitlines() if " recent " in line]
    assert rows and all("loss=" in line for line in rows), out.stdout
