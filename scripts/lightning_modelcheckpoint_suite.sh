#!/usr/bin/env bash
# Lightning's own ModelCheckpoint tests, three times: stock; with lightning.pytorch.callbacks.ModelCheckpoint
# replaced by ckpt_callbacks.lightning.ModelCheckpoint (scripts/lightning_suite_plugin.py,
# CKPT_SUITE_IO=modelcheckpoint); and the same with the "pointers" view (CKPT_SUITE_VIEW=pointers: the
# tests' os.listdir leaves out this format's own files and their torch.load reads a pointer), which
# separates the tests that differ only in file names / bytes from those that differ in behaviour.
# Not part of the normal suite.
#
#   scripts/lightning_modelcheckpoint_suite.sh PATH_TO_LIGHTNING_CHECKOUT [extra pytest args]
#
# PATH_TO_LIGHTNING_CHECKOUT: a checkout of github.com/Lightning-AI/pytorch-lightning at the tag nearest
# the installed version (git checkout 2.6.5). Its tests run against the *installed* lightning package,
# one file at a time (each under `timeout`). Output under $OUT_DIR (default ./lightning-modelcheckpoint-suite):
# a pytest log per run, the summary lines, and the tests that pass stock but fail with ours.
set -uo pipefail

src=${1:?usage: $0 PATH_TO_LIGHTNING_CHECKOUT [pytest args]}
shift
extra=("$@")
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python}
out=${OUT_DIR:-$PWD/lightning-modelcheckpoint-suite}
runs=${RUNS:-stock modelcheckpoint pointers}
mkdir -p "$out"

tests=(
  checkpointing/test_model_checkpoint.py
  checkpointing/test_checkpoint_callback_frequency.py
  checkpointing/test_trainer_checkpoint.py
)
for f in "$src"/tests/tests_pytorch/callbacks/test_model_checkpoint_*.py; do
  [[ -e "$f" ]] && tests+=("callbacks/$(basename "$f")")
done

run() {  # $1: stock | modelcheckpoint | pointers
  local log="$out/$1.log" io=$1 view=
  [[ $1 == pointers ]] && io=modelcheckpoint view=pointers
  : >"$log"
  for t in "${tests[@]}"; do
    echo "### $t" >>"$log"
    (cd "$src/tests/tests_pytorch" &&
      CKPT_SUITE_IO=$io CKPT_SUITE_VIEW=$view PYTHONPATH="$root:$here:$src/tests:${PYTHONPATH:-}" \
        timeout "${FILE_TIMEOUT:-1800}" "$python" -m pytest -q -p no:cacheprovider -p lightning_suite_plugin \
        -o addopts= -W ignore::DeprecationWarning "$t" "${extra[@]}" -rf) >>"$log" 2>&1
  done
  echo "$1: $(grep -hE '^(=+ )?[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tr '\n' ' ')"
}

for r in $runs; do run "$r"; done | tee "$out/summary.txt"
grep -h '^FAILED' "$out/stock.log" 2>/dev/null | sed 's/ - .*//' | sort -u >"$out/stock.failed"
for r in modelcheckpoint pointers; do
  grep -h '^FAILED' "$out/$r.log" 2>/dev/null | sed 's/ - .*//' | sort -u >"$out/$r.failed"
  # Tests that pass stock and fail with ours: each to fix, or to explain (file names, torch bytes).
  comm -13 "$out/stock.failed" "$out/$r.failed" >"$out/only-$r.failed"
done
echo "pass stock, fail with ours: $(wc -l <"$out/only-modelcheckpoint.failed");" \
  "of those, still with the pointer view: $(wc -l <"$out/only-pointers.failed")"
cat "$out/only-pointers.failed"
