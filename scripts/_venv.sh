# Sourced by the demo and test scripts: creates or updates .venv with the pinned dependencies.
# Re-installs only when requirements.lock or pyproject.toml changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
STAMP=.venv/.ckpt_callbacks-installed
WANT="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "Setting up .venv (pinned dependencies from requirements.lock) ..." >&2
  pip_install() {
    # Some machines list package mirrors that do not exist; pip warns once per package about them.
    local rc=0
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1 \
      | { grep -v "is ignored: it is neither" || true; } >&2 || rc=$?
    return "$rc"
  }
  pip_install --upgrade pip
  pip_install -r requirements.lock
  pip_install --no-deps -e .
  echo "$WANT" > "$STAMP"
fi
export PATH="$ROOT/.venv/bin:$PATH"
