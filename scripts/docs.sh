#!/usr/bin/env bash
# Builds the API reference (HTML from the docstrings, with pdoc) into docs/api, or into "$1".
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec python scripts/docs.py "$@"
