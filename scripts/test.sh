#!/usr/bin/env bash
# Runs the checks, then the whole test suite (unit, integration with local S3/GCS servers, slow
# crash trials): ruff lint and format, mypy (configured in pyproject.toml), pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export TF_CPP_MIN_LOG_LEVEL=3 GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
python -m ruff check ckpt_callbacks tests integration scripts benchmarks
python -m ruff format --check ckpt_callbacks tests integration scripts benchmarks
python -m mypy
exec python -m pytest -q -p no:cacheprovider "$@"
