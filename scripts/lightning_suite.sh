#!/usr/bin/env bash
# Lightning's own checkpoint tests, run stock and with this library substituted (through
# scripts/lightning_suite_plugin.py). Not part of the normal suite.
#
#   scripts/lightning_suite.sh PATH_TO_LIGHTNING_CHECKOUT [extra pytest args]
#   SUITE=modelcheckpoint scripts/lightning_suite.sh PATH_TO_LIGHTNING_CHECKOUT [extra pytest args]
#
# SUITE=checkpoint-io (default): the checkpointing, CheckpointIO, restore and saving tests, stock and
#   with FsspecCheckpointIO as every Trainer's default CheckpointIO ("ours").
# SUITE=modelcheckpoint: the ModelCheckpoint tests, stock; with lightning.pytorch.callbacks.ModelCheckpoint
#   replaced by ckpt_callbacks.lightning.ModelCheckpoint ("modelcheckpoint"); and the same with the
#   "pointers" view (the tests' os.listdir leaves out this format's own files and their torch.load reads
#   a pointer), which separates tests that differ only in file names / bytes from those that differ in
#   behaviour.
# PATH_TO_LIGHTNING_CHECKOUT: a checkout of github.com/Lightning-AI/pytorch-lightning at the tag nearest
# the installed version (git checkout 2.6.5). Its tests run against the *installed* lightning package,
# one file at a time, each under `timeout`. Output under $OUT_DIR (default ./lightning-<SUITE>): a pytest
# log per run, the summary lines, and the tests that pass stock but fail with ours (only-<run>.failed).
set -uo pipefail

src=${1:?usage: $0 PATH_TO_LIGHTNING_CHECKOUT [pytest args]}
shift
extra=("$@")
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
python=${PYTHON:-python}
suite=${SUITE:-checkpoint-io}
out=${OUT_DIR:-$PWD/lightning-$suite}
mkdir -p "$out"

case $suite in
  checkpoint-io)
    runs=${RUNS:-stock ours}
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
    ;;
  modelcheckpoint)
    runs=${RUNS:-stock modelcheckpoint pointers}
    tests=(
      checkpointing/test_model_checkpoint.py
      checkpointing/test_checkpoint_callback_frequency.py
      checkpointing/test_trainer_checkpoint.py
    )
    for f in "$src"/tests/tests_pytorch/callbacks/test_model_checkpoint_*.py; do
      [[ -e "$f" ]] && tests+=("callbacks/$(basename "$f")")
    done
    ;;
  *) echo "SUITE must be checkpoint-io or modelcheckpoint; got $suite" >&2; exit 2 ;;
esac

run() {  # $1: stock | ours | modelcheckpoint | pointers
  local log="$out/$1.log" io=$1 view= args=()
  [[ $1 == pointers ]] && io=modelcheckpoint view=pointers
  : >"$log"
  for t in "${tests[@]}"; do
    read -r path rest <<<"$t"
    if [[ -n "$rest" ]]; then args=(-k "${rest#-k }"); else args=(); fi
    echo "### $t" >>"$log"
    (cd "$src/tests/tests_pytorch" &&
      CKPT_SUITE_IO=$io CKPT_SUITE_VIEW=$view PYTHONPATH="$root:$here:$src/tests:${PYTHONPATH:-}" \
        timeout "${FILE_TIMEOUT:-3000}" "$python" -m pytest -q -p no:cacheprovider -p lightning_suite_plugin \
        -o addopts= --continue-on-collection-errors -W ignore::DeprecationWarning \
        "$path" "${args[@]}" "${extra[@]}" -rf) >>"$log" 2>&1
  done
  echo "$1: $(grep -hE '^(=+ )?[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$log" | tr '\n' ' ')"
}

for r in $runs; do run "$r"; done | tee "$out/summary.txt"
# Tests that pass stock and fail with ours: each to fix, or to explain (file names, torch bytes).
grep -h '^FAILED' "$out/stock.log" 2>/dev/null | sed 's/ - .*//' | sort -u >"$out/stock.failed"
for r in $runs; do
  [[ $r == stock ]] && continue
  grep -h '^FAILED' "$out/$r.log" 2>/dev/null | sed 's/ - .*//' | sort -u >"$out/$r.failed"
  comm -13 "$out/stock.failed" "$out/$r.failed" >"$out/only-$r.failed"
  echo "pass stock, fail with $r: $(wc -l <"$out/only-$r.failed")"
done
