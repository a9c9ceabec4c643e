"""Train the SkipDecode peer on a frozen base: LoRA adapters on every base layer, trained for SkipDecode's
schedule (each generated position enters the stack at N - depth(i), depth falling from N to d_min over
`span` tokens; the prompt runs the full depth) with a KL loss to the full model, on a self-distillation
cache. One set of adapters serves every d_min in --min-layers (each batch row draws one).

    python -m train.train_skipdecode --model smollm2-135m --distill-dir DIR [--min-layers 8,12,16,20] \
        [--span 64] [--rank 16] [--steps 100] [--batch-size 8] [--lr 1e-3] [--limit N] --out DIR \
        [--minutes M] [--save-minutes 10] [--no-progress]

Orbax checkpoints every 25 steps, at least every --save-minutes and at the end, and metrics (JSONL +
TensorBoard) under --out; the same command resumes exactly. `eval.dynamic --methods skipdecode --skipdecode
DIR` decodes with the adapted weights.

--minutes M: a wall-clock training budget, the same for every peer trainer (README, "Every trained
peer"; peers/budget.py). Trained through the trained peers' one loop
(training/spec_peers.py, via training/peers.train_early_exit).
"""

from __future__ import annotations

import argparse

from m2r2_jax.cli import add_budget_args, add_model_args, print_summary, quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.train_skipdecode", description=__doc__.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--distill-dir", required=True, help="a self-distillation cache (train.train --distill-only)")
    p.add_argument("--min-layers", default="8,12,16,20", help="the d_min values to train for (eval thresholds)")
    p.add_argument("--span", type=int, default=64, help="generated tokens over which the depth falls to d_min")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=None, help="use the first N distilled answers")
    p.add_argument("--out", required=True)
    add_budget_args(p)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    quiet_env()
    from m2r2_jax.training.spec_peers import RunLimits

    limits = RunLimits(budget_minutes=a.minutes, save_minutes=a.save_minutes)
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.peers.skipdecode import SkipDecodeConfig

    try:
        mins = tuple(int(x) for x in a.min_layers.split(",") if x.strip())
    except ValueError:
        raise M2R2Error(f"--min-layers {a.min_layers!r}: expected layer counts separated by commas") from None
    sc = SkipDecodeConfig(min_layers=mins, span=a.span, rank=a.rank, steps=a.steps, batch_size=a.batch_size, lr=a.lr)

    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.distill import load_distill_cache
    from m2r2_jax.training.peers import train_early_exit

    ds = load_distill_cache(a.distill_dir)
    records = [dict(prompt_ids=r["prompt_ids"], answer_ids=r["answer_ids"]) for r in ds]
    if a.limit:
        records = records[: a.limit]
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype, tokenizer=False)
    summary = train_early_exit(
        "skipdecode", m.cfg, m.params, records, sc, a.out, a.model, m.fingerprint, limits, not a.no_progress
    )
    summary.pop("adapters")
    print_summary("skipdecode", summary)
    return 0


if __name__ == "__main__":
    run_main(main)
