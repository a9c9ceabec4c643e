#!/usr/bin/env bash
# The trained peers at M2R2's equal wall-clock budget, in sequence, unattended and resumable:
#   nohup nice -n 19 bash scripts/train_peers.sh [MINUTES] >> runs/logs/train_peers.log 2>&1 &
#
# Budget: MINUTES ($1), else the minutes M2R2's run (configs/smollm2_r3_24k.yaml) takes to its
# equal-budget step 300 on this machine, projected from a short run of that config (first step with its
# compile + 299 x its median step; peers/budget.projected_minutes; ~3 min, once per CPU model, kept in
# runs/peers/budget.json and beside each published peer as budget.json): the sessions run on different
# CPUs, so a budget in another machine's minutes would not be equal. Each peer trains with `--minutes` (the one flag of
# every peer trainer; training/spec_peers.py's loop): it stops after the step during which the budget ran
# out, measured from its first step's start, compile included, summed over resumed calls, and every
# checkpoint's metadata records train_minutes, steps_run, trainable_params and budget_minutes. Its learning-rate schedule (warmup steps // 20, cosine) stays
# defined on --steps, so --steps is set from a short probe run (PROBE_MINUTES, default 2, not counted) to
# 1.15 x the steps the budget reaches: the budget, not the steps, ends the run, near the cosine's floor
# (a run the steps end says so on stderr; a machine busier than during the probe ends it earlier).
# SpecEE trains a fixed small job (its --minutes is recorded, not enforced) on top of the M2R2
# checkpoint at step 300 (the shipped one until long_runs.sh has exported that).
#
# Data: the 24k self-distillation cache, runs/distill/smollm2-135m-24k (rebuilt from artifacts/distill/
# by `python -m train.train --config configs/smollm2_r3_24k.yaml --distill-only`); a partial cache works
# (its finished shards), but a cache that grows between a peer's resumed calls changes its data order.
#
# Each peer trains in runs/peers/<name> (full Orbax state, resumable, not in git), then its newest
# checkpoint is published to artifacts/peers/<name>/ (for git: params + meta, the optimizer state only
# for the early-exit peers whose loaders read it; bfloat16 where float32 would exceed 30 MB) and
# artifacts/peers/<name>/done is written. A peer with `done` is skipped, so a fresh checkout carries on
# with the queue (an unfinished peer starts over there: runs/ is not in git).
#
# The peers and their trainers' defaults (README; BENCHMARKS), SmolLM2-135M trainable params, published size:
#   kangaroo    --exit-layer 3, lr 1e-3, batch 8, seq 256                0.89M  params fp32   ~3.5 MB
#   sps         --layers 3, lr 3e-4                                     10.6M   params bf16  ~21 MB
#   medusa      --heads 4, --positions 96, lr 1e-3                       1.33M  params fp32   ~5.3 MB
#   eagle       --noise 0.2, --positions 96, lr 5e-4                     4.20M  params fp32  ~17 MB
#   layerskip   --layers 20,24,27,29, --rank 16, lr 1e-3                 4.72M  +Adam bf16   ~28 MB
#   skipdecode  --min-layers 8,12,16,20, --span 64, --rank 16, lr 1e-3   4.88M  +Adam bf16   ~29 MB
#   exit_heads  --layers 20,24,27,29, --rank 64, lr 1e-3                 0.30M  +Adam fp32   ~3.6 MB
#   specee      --layers 12,15,18,21,24,27, --k 4, --examples 256, --epochs 30 (~2k params)
# (the full resumable state in runs/peers is float32 params + Adam, two steps kept: 12 bytes a param a step)
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# overridable for a smoke test: the paths, PEERS_ONLY (names, space-separated) and PEER_EXTRA_ARGS (added to
# every trainer's command, e.g. another --model)
DISTILL=${DISTILL:-runs/distill/smollm2-135m-24k}
M2R2_RUN=${M2R2_RUN:-artifacts/train/smollm2_r3_24k}
M2R2_CONFIG=${M2R2_CONFIG:-configs/smollm2_r3_24k.yaml}
BUDGET_STEP=300
OUT=${OUT:-artifacts/peers}
PROBE_MINUTES=${PROBE_MINUTES:-2}
WORK=${WORK:-runs/peers}
mkdir -p "$OUT" "$WORK" runs/logs
log() { echo "[train_peers $(date -u +%FT%TZ)] $*"; }

CPU=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
if [ $# -ge 1 ]; then
  MINUTES=$1
  BASIS="given as \$1"
else
  # M2R2's run to its equal-budget step, projected on this machine: a short run of the same config
  # (BUDGET_PROBE_STEPS steps, the first compiles) times a step; minutes = first step + (300 - 1) x the
  # median step. Kept in $WORK/budget.json for the peers trained in this checkout on this CPU.
  if ! python -c "import json, sys; sys.exit(json.load(open('$WORK/budget.json'))['cpu'] != '''$CPU''')" 2>/dev/null; then
    probe=$WORK/m2r2_budget_probe
    rm -rf "$probe"
    log "budget probe: $M2R2_CONFIG to step ${BUDGET_PROBE_STEPS:-12} on $CPU"
    python -m train.train --config "$M2R2_CONFIG" --no-progress --stop-at "${BUDGET_PROBE_STEPS:-12}" \
        out_dir="$probe" keep=1 ${BUDGET_PROBE_ARGS:-} > /dev/null
    python -c "
import json
from m2r2_jax.peers.budget import projected_minutes
b = projected_minutes('$probe/metrics.jsonl', $BUDGET_STEP)
b.update(cpu='''$CPU''', config='$M2R2_CONFIG', to_step=$BUDGET_STEP)
json.dump(b, open('$WORK/budget.json', 'w'), indent=1)"
    rm -rf "$probe"
  fi
  MINUTES=$(python -c "import json; print(round(json.load(open('$WORK/budget.json'))['minutes'], 3))")
  BASIS="M2R2 ($M2R2_CONFIG) to step $BUDGET_STEP projected on this CPU: $(cat "$WORK/budget.json" | tr -d '\n ')"
fi
log "budget: $MINUTES minutes a peer on $CPU ($BASIS)"
if [ ! -f "$DISTILL/manifest.json" ]; then
  log "no distill cache at $DISTILL: python -m train.train --config configs/smollm2_r3_24k.yaml --distill-only"
  exit 2
fi
python -c "import json; m = json.load(open('$DISTILL/manifest.json')); print('[train_peers] distill cache:', len(m['shards']), 'shards, complete' if m.get('complete') else 'shards, PARTIAL')"

# name | trainer | flags (beyond --distill-dir/--out/--minutes/--no-progress): the probe's --steps (an upper
# bound; the run's own --steps comes from the probe)
PEERS=(
  "kangaroo|train.train_kangaroo|--steps 20000"
  "sps|train.train_sps|--steps 20000"
  "medusa|train.train_medusa|--steps 10000"
  "eagle|train.train_eagle|--steps 10000"
  "layerskip|train.train_layerskip|--steps 3000"
  "skipdecode|train.train_skipdecode|--steps 3000"
  "exit_heads|train.train_exit_heads|--steps 10000"
  "specee|train.train_specee|"
)
SPECEE_CKPT=""
[ -d "$M2R2_RUN-step$BUDGET_STEP" ] && SPECEE_CKPT="--checkpoint $M2R2_RUN-step$BUDGET_STEP"

for entry in "${PEERS[@]}"; do
  IFS='|' read -r name trainer flags <<< "$entry"
  if [ -n "${PEERS_ONLY:-}" ] && [[ " $PEERS_ONLY " != *" $name "* ]]; then
    continue
  fi
  if [ -f "$OUT/$name/done" ]; then
    log "$name: done already ($OUT/$name), skipped"
    continue
  fi
  extra=(--no-progress)
  [ "$name" = specee ] && extra=($SPECEE_CKPT)
  # shellcheck disable=SC2206 # a list of words
  extra+=(${PEER_EXTRA_ARGS:-})
  t0=$(date +%s)
  if [ -n "$flags" ] && [ ! -f "$WORK/$name.steps" ]; then
    # --steps from a probe: PROBE_MINUTES of training measure the wall seconds a step (after the compiling
    # first one); the schedule then spans 1.15 x the steps the budget reaches, so the budget ends the run near
    # the cosine's floor. Kept in $WORK/<name>.steps: a resumed call needs the same --steps.
    rm -rf "$WORK/$name.probe"
    # shellcheck disable=SC2086 # $flags is a list of words
    if ! python -m "$trainer" --distill-dir "$DISTILL" --out "$WORK/$name.probe" --minutes "$PROBE_MINUTES" $flags \
        "${extra[@]}" > /dev/null; then
      log "$name: probe FAILED (see above); going on with the next peer"
      continue
    fi
    python -c "
import json, math
s = json.load(open('$WORK/$name.probe/summary.json'))
# wall seconds a step after the first (which compiles), saves and logging included
per = (60 * s['minutes'] - s['first_step_seconds']) / (s['steps'] - 1) if s['steps'] > 1 else None
if per and per > 0:
    print(max(2 * s['steps'], math.ceil(1.15 * max(60 * $MINUTES - s['first_step_seconds'], per) / per)))
" > "$WORK/$name.steps"
    rm -rf "$WORK/$name.probe"
    if [ -s "$WORK/$name.steps" ]; then
      log "$name: probe: --steps $(cat "$WORK/$name.steps") for $MINUTES minutes"
    else
      rm -f "$WORK/$name.steps"
      log "$name: probe ran one step only (raise PROBE_MINUTES); keeping $flags"
    fi
  fi
  [ -f "$WORK/$name.steps" ] && flags="$flags --steps $(cat "$WORK/$name.steps")"
  log "$name: python -m $trainer --distill-dir $DISTILL --out $WORK/$name --minutes $MINUTES $flags ${extra[*]}"
  # shellcheck disable=SC2086 # $flags is a list of words
  if ! python -m "$trainer" --distill-dir "$DISTILL" --out "$WORK/$name" --minutes "$MINUTES" $flags "${extra[@]}"; then
    log "$name: FAILED after $(( $(date +%s) - t0 )) s (see above); going on with the next peer"
    continue
  fi
  pub=$(python -c "import json; from m2r2_jax.peers.budget import publish, read_budget; \
print(json.dumps(dict(publish('$WORK/$name', '$OUT/$name'), **read_budget('$OUT/$name'))))")
  python -c "import json, sys; json.dump(dict(minutes=$MINUTES, cpu=sys.argv[1], basis=sys.argv[2]), open('$OUT/$name/budget.json', 'w'), indent=1)" "$CPU" "$BASIS"
  touch "$OUT/$name/done"
  log "$name: done in $(( $(date +%s) - t0 )) s: $pub"
done

P=$OUT
CK="--checkpoint $M2R2_RUN-step$BUDGET_STEP "  # M2R2 at the equal-budget step (scripts/long_runs.sh exports it)
[ -d "$M2R2_RUN-step$BUDGET_STEP" ] || CK=""   # not yet: the shipped checkpoint
cat <<EOF
[train_peers] then (without the peer flags, eval.compare / eval.dynamic default to artifacts/peers/<name>
where it exists; spelled out here):
  python -m eval.compare --model smollm2-135m --dataset mt_bench --limit 48 ${CK}\\
      --drafters m2r2,m2r2+lookup,pld,kangaroo,sps,medusa,eagle,eagle2 \\
      --kangaroo-checkpoint $P/kangaroo --sps-checkpoint $P/sps --medusa-checkpoint $P/medusa \\
      --eagle-checkpoint $P/eagle --out runs/compare/mt_bench_peers.json
  python -m eval.dynamic --model smollm2-135m --dataset mt_bench --limit 48 ${CK}\\
      --methods m2r2,m2r2_deferred,static,static_trained,layerskip,skipdecode,calm,specee \\
      --exit-heads $P/exit_heads --layerskip $P/layerskip --skipdecode $P/skipdecode --specee $P/specee \\
      --out runs/dynamic/mt_bench_peers.json
EOF
