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
    # Every public module has its page: found on disk here, independently of the build script's list.
    public = ["ckpt_callbacks"] + [
        f"ckpt_callbacks.{n.removesuffix('.py')}"
        for n in sorted(os.listdir(os.path.join(ROOT, "ckpt_callbacks")))
        if not n.startswith(("_", "."))
        and (n.endswith(".py") or os.path.isdir(os.path.join(ROOT, "ckpt_callbacks", n)))
    ]
    assert "ckpt_callbacks.distributed" in public
    pages = {"index.html": (tmp_path / "index.html").read_text()}
    for module in public:
        page = tmp_path / (module.replace(".", "/") + ".html")
        assert page.exists(), f"no API reference page for the public module {module}"
        pages[str(page.relative_to(tmp_path))] = page.read_text()
    # Base classes by their public names, never a framework's private module.
    assert ">keras.callbacks.Callback<" in pages["ckpt_callbacks/keras.html"]
    assert all("keras.src" not in html and "ckpt_callbacks._" not in html for html in pages.values())
    assert 'id="StorageWriter"' in pages["ckpt_callbacks/distributed.html"]
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


def test_a_public_name_without_a_docstring_fails_the_reference_build(tmp_path, monkeypatch):
    pytest.importorskip("pdoc")
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text(
        '"""A documented module."""\n\n\ndef documented():\n    """Yes."""\n\n\ndef bare():\n    pass\n\n\n'
        "class Bare:\n    def method(self):\n        pass\n\n    def _private(self):\n        pass\n\n\n"
        "def _hidden():\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import docs

    assert docs.undocumented(["pkgx"]) == ["pkgx.bare", "pkgx.Bare", "pkgx.Bare.method"]
    assert "ckpt_callbacks.distributed" in docs.public_modules()
