"""Train the LayerSkip-style early-exit peer on a frozen base: LoRA adapters on the base layers below the
deepest exit layer, with an early-exit KL loss at each exit layer E (shared final norm + LM head) and a
full-depth KL term, on a self-distillation cache.

    python -m train.train_layerskip --model smollm2-135m --distill-dir DIR [--layers 20,24,27,29] \
        [--rank 16] [--steps 100] [--batch-size 8] [--lr 1e-3] [--limit N] --out DIR [--minutes M] \
        [--save-minutes 10] [--no-progress]

Orbax checkpoints every 25 steps, at least every --save-minutes and at the end, and metrics (JSONL +
TensorBoard) under --out; the same command resumes exactly. `eval.dynamic --methods layerskip --layerskip
DIR` decodes with the adapted weights.

--minutes M: a wall-clock training budget, the same for every peer trainer (README, "Every trained
peer"; peers/budget.py). Trained through the trained peers' one loop
(training/spec_peers.py, via training/peers.train_early_exit).
"""

from __future__ import annotations

import argparse

from m2r2_jax.cli import add_budget_args, add_model_args, print_summary, quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.train_layerskip", description=__doc__.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--distill-dir", required=True, help="a self-distillation cache (train.train --distill-only)")
    p.add_argument("--layers", default="20,24,27,29", help="exit layers (after this many base layers)")
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
    from m2r2_jax.peers.layerskip import LayerSkipConfig

    try:
        layers = tuple(int(x) for x in a.layers.split(",") if x.strip())
    except ValueError:
        raise M2R2Error(f"--layers {a.layers!r}: expected layer numbers separated by commas") from None
    lc = LayerSkipConfig(layers=layers, rank=a.rank, steps=a.steps, batch_size=a.batch_size, lr=a.lr)

    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.distill import load_distill_cache
    from m2r2_jax.training.peers import train_early_exit

    ds = load_distill_cache(a.distill_dir)
    records = [dict(prompt_ids=r["prompt_ids"], answer_ids=r["answer_ids"]) for r in ds]
    if a.limit:
        records = records[: a.limit]
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype, tokenizer=False)
    summary = train_early_exit(
        "layerskip", m.cfg, m.params, records, lc, a.out, a.model, m.fingerprint, limits, not a.no_progress
    )
    summary.pop("adapters")
    print_summary("layerskip", summary)
    return 0


if __name__ == "__main__":
    run_main(main)
