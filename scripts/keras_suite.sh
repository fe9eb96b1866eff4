#!/usr/bin/env bash
# Keras' own BackupAndRestore and ModelCheckpoint tests, twice: stock, and with this library's callbacks in
# their place (scripts/keras_suite_plugin.py: ckpt_callbacks.keras.BackupAndRestore, and CheckpointCallback
# through an argument-mapping adapter for ModelCheckpoint). Not part of the normal suite.
#
#   scripts/keras_suite.sh PATH_TO_KERAS_CHECKOUT [extra pytest args]
#
# PATH_TO_KERAS_CHECKOUT: a checkout of github.com/keras-team/keras at the tag of the installed
# version (git checkout v3.15.1). Its test files are copied to a temporary directory and run there
# against the *installed* keras, on the backend KERAS_BACKEND names (default tensorflow).
# Output: one pytest log per run and the two summary lines (under $OUT_DIR, default ./keras-suite).
set -uo pipefail

src=${1:?usage: $0 PATH_TO_KERAS_CHECKOUT [pytest args]}
shift
extra=("$@")
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python}
out=${OUT_DIR:-$PWD/keras-suite}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tests=(keras/src/callbacks/backup_and_restore_test.py keras/src/callbacks/model_checkpoint_test.py)
for t in "${tests[@]}"; do cp "$src/$t" "$work/"; done

run() {  # $1: stock | ours
  local log="$out/$1.log"
  (cd "$work" &&
    CKPT_SUITE=$1 KERAS_BACKEND=${KERAS_BACKEND:-tensorflow} TF_CPP_MIN_LOG_LEVEL=3 \
      PYTHONPATH="$root:$here:${PYTHONPATH:-}" \
      timeout 1800 "$python" -m pytest -q -p no:cacheprovider -p keras_suite_plugin -o addopts= \
      -W ignore::DeprecationWarning "${tests[@]##*/}" "${extra[@]}" -rf) >"$log" 2>&1
  echo "$1: $(grep -hE '^(=+ )?[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tr '\n' ' ')"
}

run stock | tee "$out/summary.txt"
run ours | tee -a "$out/summary.txt"
# Tests that pass stock and fail with ours.
grep -h '^FAILED' "$out/stock.log" | sort -u >"$out/stock.failed"
grep -h '^FAILED' "$out/ours.log" | sort -u >"$out/ours.failed"
comm -13 "$out/stock.failed" "$out/ours.failed" | tee "$out/only-ours.failed"
