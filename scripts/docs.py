"""Build the API reference, HTML generated from the docstrings by pdoc, without network.

    python scripts/docs.py [OUTDIR]      # default: docs/api (open docs/api/index.html)

Every public module of the package gets a page (a module or package whose dotted name has no part
starting with "_"). The build fails on a warning (a docstring pdoc cannot render: a broken
cross-reference, a bad annotation) and on a public module, class, function or method without a
docstring. Base classes from a framework's private modules are shown by their public name
(``keras.callbacks.Callback``, not ``keras.src.callbacks.callback.Callback``). The framework modules
import Keras (on its torch backend unless KERAS_BACKEND says otherwise), Lightning and torch, so those
must be installed (``scripts/docs.sh`` installs them and pdoc, nothing else).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "ckpt_callbacks"


def public_modules(root: str = ROOT) -> list[str]:
    """Dotted names of the package's public modules, found on disk (nothing is imported)."""
    out = []
    for directory, dirs, files in os.walk(os.path.join(root, PACKAGE)):
        rel = os.path.relpath(directory, root).replace(os.sep, ".")
        if any(part.startswith("_") for part in rel.split(".")):
            dirs[:] = []
            continue
        if "__init__.py" in files:
            out.append(rel)
        out += [f"{rel}.{f[:-3]}" for f in files if f.endswith(".py") and not f.startswith("_")]
    return sorted(out)


def main(argv: list[str]) -> int:
    out = os.path.abspath(argv[0]) if argv else os.path.join(ROOT, "docs", "api")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    # Frameworks run `uname -p` and the like at import; pdoc refuses that unless allowed (with a warning,
    # which -W error would turn into a failed build).
    env["PDOC_ALLOW_EXEC"] = "1"
    env.setdefault("KERAS_BACKEND", "torch")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [
        sys.executable,
        "-W",
        "error",
        "-W",
        "ignore::DeprecationWarning",  # the frameworks' own, at import: not about our docstrings
        os.path.abspath(__file__),
        "--build",
        out,
    ]
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    if rc == 0:
        print(f"API reference written to {os.path.join(out, 'index.html')}")
    return rc


# ---------------------------------------------------------------- in the build process


def build(out: str) -> int:
    from pathlib import Path

    import pdoc
    import pdoc.doc
    import pdoc.render

    _show_public_bases(pdoc.doc.Class)
    _inherit_hook_docs(pdoc.doc.Function)
    modules = public_modules()
    pdoc.render.configure(docformat="google", footer_text="ckpt_callbacks API reference")
    pdoc.pdoc(*modules, output_directory=Path(out))
    missing = undocumented(modules)
    if missing:
        print("Public names without a docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 1
    return 0


def undocumented(modules: list[str]) -> list[str]:
    """The public modules, classes, functions and methods of ``modules`` without a docstring of
    their own (a method documented by the framework method it overrides counts as documented)."""
    import pdoc.doc

    missing = []
    for name in modules:
        module = pdoc.doc.Module.from_name(name)
        if not module.docstring.strip():
            missing.append(name)
        exported = getattr(module.obj, "__all__", None)
        for member in module.members.values():
            public = member.name in exported if exported is not None else not member.name.startswith("_")
            if public and isinstance(member, (pdoc.doc.Class, pdoc.doc.Function)):
                missing += _undocumented(member, name)
    return missing


def _undocumented(doc, module: str) -> list[str]:
    import pdoc.doc

    if isinstance(doc, pdoc.doc.Function):
        return [] if doc.docstring.strip() else [f"{module}.{doc.qualname}"]
    out = [] if (doc.obj.__dict__.get("__doc__") or "").strip() else [f"{module}.{doc.qualname}"]
    for member in doc.own_members:
        if isinstance(member, pdoc.doc.Function) and not member.name.startswith("_"):
            out += _undocumented(member, module)
    return out


def _public_module(module: str, qualname: str) -> str | None:
    """The shortest public module that exports ``module.qualname`` under that name, when ``module`` is a
    private one (``keras.src.callbacks.callback`` -> ``keras.callbacks``); None to keep it."""
    parts = module.split(".")
    if not any(p == "src" or p.startswith("_") for p in parts):
        return None
    obj = sys.modules.get(module)
    for attr in qualname.split("."):
        obj = getattr(obj, attr, None)
    if obj is None:
        return None
    found = [
        name
        for name, candidate in list(sys.modules.items())
        if (name == parts[0] or name.startswith(parts[0] + "."))
        and not any(p == "src" or p.startswith("_") for p in name.split("."))
        and getattr(candidate, qualname, None) is obj
    ]
    return min(found, key=lambda n: (n.count("."), n)) if found else None


# Framework classes whose hooks our callbacks and plugins implement. The Lightning callback is written
# once for both package names, so its hooks inherit no docstring through its own bases.
_HOOK_BASES = [
    "lightning.pytorch:Callback",
    "lightning.fabric.plugins:CheckpointIO",
    "keras.callbacks:Callback",
]


def _hook_doc(name: str) -> str:
    import importlib

    for spec in _HOOK_BASES:
        module, _, cls = spec.partition(":")
        try:
            doc = getattr(getattr(importlib.import_module(module), cls), name, None).__doc__
        except (ImportError, AttributeError):
            continue
        if doc and doc.strip():
            import inspect

            return inspect.cleandoc(doc)
    return ""


def _inherit_hook_docs(cls: type) -> None:
    """pdoc's ``Function.docstring``; for an undocumented method of this package that implements a
    framework hook (``on_fit_start``, ``setup``), that hook's docstring."""
    original = cls.docstring.func

    def docstring(self) -> str:
        doc = original(self)
        if doc or not self.modulename.startswith(PACKAGE) or "." not in self.qualname:
            return doc
        return _hook_doc(self.name)

    prop = functools.cached_property(docstring)
    prop.__set_name__(cls, "docstring")
    cls.docstring = prop


def _show_public_bases(cls: type) -> None:
    """pdoc's ``Class.bases``, with base classes of private framework modules by their public name and
    without this package's private mixins."""
    original = cls.bases.func

    def bases(self) -> list[tuple[str, str, str]]:
        out = []
        for module, qualname, text in original(self):
            if module.startswith(PACKAGE + ".") and any(p.startswith("_") for p in module.split(".")):
                continue  # this package's private mixins are no part of the API
            public = _public_module(module, qualname)
            out.append((public, qualname, f"{public}.{qualname}") if public else (module, qualname, text))
        return out

    prop = functools.cached_property(bases)
    prop.__set_name__(cls, "bases")
    cls.bases = prop


if __name__ == "__main__":
    if sys.argv[1:2] == ["--build"]:
        sys.exit(build(sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
