#!/usr/bin/env bash
# Runs the whole test suite (unit, integration with local S3/GCS servers, slow crash trials).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export TF_CPP_MIN_LOG_LEVEL=3 GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
exec python -m pytest -q -p no:cacheprovider "$@"
