#!/usr/bin/env bash
# Lightning's own checkpoint tests, twice: stock, and with FsspecCheckpointIO as the default
# CheckpointIO of every Trainer (scripts/lightning_suite_plugin.py). Not part of the normal suite.
#
#   scripts/lightning_suite.sh PATH_TO_LIGHTNING_CHECKOUT [extra pytest args]
#
# PATH_TO_LIGHTNING_CHECKOUT: a checkout of github.com/Lightning-AI/pytorch-lightning at the tag of the
# installed version (git checkout 2.6.x). Its tests run against the *installed* lightning package.
# Output: one pytest log per run and the two summary lines (under $OUT_DIR, default ./lightning-suite).
set -uo pipefail

src=${1:?usage: $0 PATH_TO_LIGHTNING_CHECKOUT [pytest args]}
shift
extra=("$@")
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python}
out=${OUT_DIR:-$PWD/lightning-suite}
mkdir -p "$out"

tests=(
  checkpointing
  plugins/test_checkpoint_io_plugin.py
  plugins/test_async_checkpoint.py
  trainer/connectors/test_checkpoint_connector.py
  models/test_restore.py
  models/test_hparams.py
  core/test_saving.py
  "trainer/test_trainer.py -k checkpoint or ckpt or resume"
)

run() {  # $1: stock | ours
  local log="$out/$1.log" args=()
  : >"$log"
  for t in "${tests[@]}"; do
    read -r path rest <<<"$t"
    if [[ -n "$rest" ]]; then args=(-k "${rest#-k }"); else args=(); fi
    (cd "$src/tests/tests_pytorch" &&
      CKPT_SUITE_IO=$1 PYTHONPATH="$root:$here:$src/tests:${PYTHONPATH:-}" \
        timeout 3000 "$python" -m pytest -q -p no:cacheprovider -p lightning_suite_plugin -o addopts= --continue-on-collection-errors \
        -W ignore::DeprecationWarning "$path" "${args[@]}" "${extra[@]}" -rf) >>"$log" 2>&1
  done
  echo "$1: $(grep -hE '^(=+ )?[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tr '\n' ' ')"
}

run stock | tee "$out/summary.txt"
run ours | tee -a "$out/summary.txt"
# Tests that pass stock and fail with ours (to fix, or to explain as inspecting torch.save bytes / listings).
grep -h '^FAILED' "$out/stock.log" | sort -u >"$out/stock.failed"
grep -h '^FAILED' "$out/ours.log" | sort -u >"$out/ours.failed"
comm -13 "$out/stock.failed" "$out/ours.failed" | tee "$out/only-ours.failed"
