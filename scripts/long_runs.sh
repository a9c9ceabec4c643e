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
# the equal-budget point: the capacity variants run to it, and the peers (issues 19, 20) train for the
# wall clock the main run took to reach it
BUDGET_STEP=300
# 1. the 24k-prompt self-distillation (answers packed in artifacts/distill/)
python -m train.train --config "$CFG" --distill-only --no-progress
# 2. the fast stream on it (metrics and the newest checkpoint in artifacts/train/), first to the
#    equal-budget step, whose weights (no optimizer state) are kept beside the run
if [ ! -d "$RUN-step$BUDGET_STEP/$BUDGET_STEP" ]; then
  python -m train.train --config "$CFG" --no-progress --stop-at "$BUDGET_STEP"
  python scripts/export_checkpoint.py "$RUN" "$RUN-step$BUDGET_STEP" --step "$BUDGET_STEP"
fi
# 3. the main run to its planned total (the shipped checkpoint's candidate; several sessions)
python -m train.train --config "$CFG" --no-progress
# 3b. its final weights (no optimizer state) beside the run, with the issue's measurements: held-out
#     agreement (MT-Bench-48, Koala-48) and MT-Bench (160 prompts) speculative decoding, M2R2 drafts
#     alone and the default command (+ prompt lookup); each resumable, each skipped once its file exists
FINAL=$RUN-final
STEPS=$(python -c "import yaml; print(yaml.safe_load(open('$CFG'))['steps'])")
[ -d "$FINAL/$STEPS" ] || python scripts/export_checkpoint.py "$RUN" "$FINAL" --step "$STEPS"  # refused if unfinished
measure() {  # FILE CMD...: CMD's stdout into FILE, unless FILE exists
  local f=$1; shift
  if [ ! -s "$f" ]; then "$@" > "$f.tmp"; mv -f "$f.tmp" "$f"; fi
}
measure "$FINAL/alignment_mtbench.json" python -m eval.alignment --json --checkpoint "$FINAL"
measure "$FINAL/alignment_koala.json" python -m eval.alignment --json --checkpoint "$FINAL" \
  --dataset "${M2R2_DATA:-../shared/data}/koala"
for v in "lookup0 --lookup 0" "default"; do
  set -- $v
  if [ ! -s "$FINAL/spec_mtbench_$1.json" ]; then
    python -m eval.speculative --model smollm2-135m --dataset mt_bench --checkpoint "$FINAL" --no-progress \
      --resume --out "$FINAL/spec_mtbench_$1.json" "${@:2}"
  fi
done
# 4. capacity at equal budget (the main run is rank 64, L_f 10): the same schedule, to the same step;
#    their metrics and held-out agreement (MT-Bench-48, measured before `done`) in git, their checkpoints
#    not (a full-rank one is ~0.4 GB), so an unfinished one starts over in a fresh checkout
for v in "full m2r2.adapter=full" "rank256 m2r2.rank=256" "lf8 m2r2.num_fast_layers=8" "lf6 m2r2.num_fast_layers=6"; do
  set -- $v
  out=artifacts/train/capacity/$1
  if [ ! -f "$out/done" ]; then
    python -m train.train --config "$CFG" --no-progress --stop-at "$BUDGET_STEP" out_dir="$out" keep=1 "${@:2}"
    python -m eval.alignment --json --checkpoint "$out" > "$out/alignment_mtbench.json"
    touch "$out/done"
  fi
done
# 5. M2R2 on the MoE base (configs/smollm2_moe_r3.yaml: attention adapters, the dense model's answers, the
#    MoE as teacher; metrics and the newest checkpoint in git like the main run), then its agreement with
#    the MoE's own greedy output on MT-Bench-48
MOE_RUN=artifacts/train/smollm2_moe_r3
python -m train.train --config configs/smollm2_moe_r3.yaml --no-progress
measure "$MOE_RUN/alignment_mtbench.json" python -m eval.alignment --json --model smollm2-135m-moe --checkpoint "$MOE_RUN"
