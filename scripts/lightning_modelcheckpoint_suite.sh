#!/usr/bin/env bash
# Lightning's own ModelCheckpoint tests with ckpt_callbacks.lightning.ModelCheckpoint substituted:
# scripts/lightning_suite.sh with SUITE=modelcheckpoint (see there).
#
#   scripts/lightning_modelcheckpoint_suite.sh PATH_TO_LIGHTNING_CHECKOUT [extra pytest args]
SUITE=modelcheckpoint exec "$(dirname "$0")/lightning_suite.sh" "$@"
