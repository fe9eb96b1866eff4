#!/usr/bin/env bash
# Runs the demo: train, checkpoint, interrupt, resume, list what is on storage.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
export TF_CPP_MIN_LOG_LEVEL=3
exec python -m ckpt_callbacks._demo "$@"
