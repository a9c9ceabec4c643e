#!/usr/bin/env bash
# The project's long runs, in dependency order, each resumable from what git holds under artifacts/
# (a fresh checkout carries on where the last one stopped). Run it in the background at low priority
# and commit artifacts/ every so often:
#   nohup nice -n 19 bash scripts/long_runs.sh >> runs/logs/long_runs.log 2>&1 &
#   git add artifacts && git commit -m "..."
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
CFG=configs/smollm2_r3_24k.yaml
RUN=artifacts/train/smollm2_r3_24k
# the equal-budget point: the peers (issues 19, 20) train for the wall clock this run took to reach it
BUDGET_STEP=300
# 1. the 24k-prompt self-distillation (answers packed in artifacts/distill/)
python -m train.train --config "$CFG" --distill-only --no-progress
# 2. the fast stream on it (metrics and the newest checkpoint in artifacts/train/), first to the
#    equal-budget step, whose weights (no optimizer state) are kept beside the run
if [ ! -d "$RUN-step$BUDGET_STEP/$BUDGET_STEP" ]; then
  python -m train.train --config "$CFG" --no-progress --stop-at "$BUDGET_STEP"
  python scripts/export_checkpoint.py "$RUN" "$RUN-step$BUDGET_STEP" --step "$BUDGET_STEP"
fi
python -m train.train --config "$CFG" --no-progress
