#!/usr/bin/env bash
# Runs the demo: train, checkpoint, interrupt, resume, list what is on storage.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0
exec python examples/demo.py "$@"
