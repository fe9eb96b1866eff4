#!/usr/bin/env bash
# Builds the API reference (HTML from the docstrings, with pdoc) into docs/api, or into "$1".
#
# Uses .venv when it exists and has what the reference imports (the test environment does). Otherwise
# makes .venv-docs with only that: pdoc, the core's dependencies, Keras, torch and Lightning, at the
# versions requirements.lock pins (no TensorFlow, JAX, storage servers or test tools).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
NEEDS="import pdoc, fsspec, numpy, ml_dtypes, xxhash, keras, torch, lightning"
if [ -x .venv/bin/python ] && .venv/bin/python -c "$NEEDS" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY=.venv-docs/bin/python
  STAMP=.venv-docs/.ckpt_callbacks-installed
  WANT="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
  if [ ! -x "$PY" ]; then
    "${PYTHON:-python3}" -m venv .venv-docs
  fi
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "Setting up .venv-docs (what the API reference needs, pinned by requirements.lock) ..." >&2
    "$PY" -m pip install -q --disable-pip-version-check -c requirements.lock \
      pdoc fsspec numpy ml_dtypes xxhash keras torch lightning
    echo "$WANT" > "$STAMP"
  fi
fi
exec "$PY" scripts/docs.py "$@"
