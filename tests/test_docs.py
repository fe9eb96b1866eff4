"""The documentation: the API reference builds from the docstrings with warnings as errors, and the
docs are self-contained (no reference to a document the repository does not ship)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + [os.path.join("docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))]


@pytest.mark.slow
def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("pdoc")
    pytest.importorskip("keras")
    pytest.importorskip("lightning")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "docs.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning: " not in out.stderr, out.stderr[-3000:]
    pages = {
        name: (tmp_path / name).read_text()
        for name in [
            "index.html",
            "ckpt_callbacks.html",
            "ckpt_callbacks/errors.html",
            "ckpt_callbacks/keras.html",
            "ckpt_callbacks/lightning.html",
        ]
    }
    core = pages["ckpt_callbacks.html"]
    for name in [
        "load_checkpoint",
        "save_checkpoint",
        "list_variables",
        "get_checkpoint_state",
        "latest_checkpoint",
        "CheckpointManager",
        "restore_with_path",
        "wait_until_finished",
    ]:
        assert f'id="{name}"' in core or f'id="CheckpointManager.{name}"' in core, name
    assert 'id="CheckpointCallback"' in pages["ckpt_callbacks/keras.html"]
    assert 'id="FsspecCheckpointIO"' in pages["ckpt_callbacks/lightning.html"]
    assert 'id="ModelCheckpoint"' in pages["ckpt_callbacks/lightning.html"]
    for name, html in pages.items():
        assert not re.search(r"SPEC\b", html), f"{name} cites a document the repository does not ship"


@pytest.mark.parametrize("path", DOC_FILES)
def test_docs_cite_no_document_outside_the_repository(path):
    text = open(os.path.join(ROOT, path), encoding="utf-8").read()
    assert not re.search(r"\bSPEC\b", text), f"{path} cites SPEC, which the repository does not ship"
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):  # relative Markdown links
        linked = os.path.normpath(os.path.join(ROOT, os.path.dirname(path), target))
        assert os.path.exists(linked) or target.startswith("docs/api"), f"{path} links to missing {target}"
