"""Build the API reference, HTML generated from the docstrings by pdoc, without network.

    python scripts/docs.py [OUTDIR]      # default: docs/api (open docs/api/index.html)

Warnings are errors: a docstring pdoc cannot render (a broken cross-reference, a bad annotation)
fails the build. The framework modules import Keras (on its torch backend unless KERAS_BACKEND says
otherwise) and Lightning, so both must be installed.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The public modules: what `import` statements in the README and docs name.
MODULES = ["ckpt_callbacks", "ckpt_callbacks.errors", "ckpt_callbacks.keras", "ckpt_callbacks.lightning"]


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
        "-m",
        "pdoc",
        "--docformat",
        "google",
        "--footer-text",
        "ckpt_callbacks API reference",
        "-o",
        out,
        *MODULES,
    ]
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    if rc == 0:
        print(f"API reference written to {os.path.join(out, 'index.html')}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
