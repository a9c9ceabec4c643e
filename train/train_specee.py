"""Train SpecEE's exit predictors on a frozen base: candidates from the M2R2 fast stream (a checkpoint),
features at the check layers on the candidates' LM-head rows, labels "the layer's best candidate is
the full model's token", teacher-forced on self-distilled answers.

    python -m train.train_specee --model smollm2-135m [--checkpoint DIR] --distill-dir DIR \
        [--layers 12,15,18,21,24,27] [--k 4] [--examples 256] [--epochs 30] [--minutes M] --out DIR

Prints the summary: minutes, trainable params, candidate recall, per-layer label rate and held-out AUC.
--minutes M is recorded, not enforced: SpecEE trains a fixed job (feature collection, then --epochs x 10
full-batch steps on small MLPs); its checkpoint's metadata records train_minutes, steps_run,
trainable_params and budget_minutes like the other peers', and a run over the budget says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2r2_jax.cli import add_budget_args, add_model_args, quiet_env, run_main


def main(argv=None):
    from eval.alignment import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m train.train_specee", description=__doc__.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--checkpoint", default=None, help=f"M2R2 checkpoint (default: the shipped {DEFAULT_CHECKPOINT})")
    p.add_argument("--distill-dir", required=True, help="a self-distillation cache (train.train --distill-only)")
    p.add_argument("--layers", default="12,15,18,21,24,27", help="check layers (after this many base layers)")
    p.add_argument("--k", type=int, default=4, help="candidates from the fast stream")
    p.add_argument("--examples", type=int, default=256, help="distilled answers used")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", required=True)
    add_budget_args(p, enforced=False)
    a = p.parse_args(argv)
    quiet_env()
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.peers.specee import SpecEEConfig

    try:
        layers = tuple(int(x) for x in a.layers.split(",") if x.strip())
    except ValueError:
        raise M2R2Error(f"--layers {a.layers!r}: expected layer numbers separated by commas") from None
    sc = SpecEEConfig(layers=layers, k=a.k, examples=a.examples, epochs=a.epochs)

    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.checkpoint import load_m2r2, resolve_checkpoint_dir
    from m2r2_jax.training.distill import load_distill_cache
    from m2r2_jax.training.peers import train_specee

    ds = load_distill_cache(a.distill_dir)
    records = [dict(prompt_ids=r["prompt_ids"], answer_ids=r["answer_ids"]) for r in ds]
    ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
    resolve_checkpoint_dir(ckpt)
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype, tokenizer=False)
    mc, m2r2, draft_ids, _ = load_m2r2(ckpt, m.cfg, m.params, a.model, base_fingerprint=m.fingerprint)
    summary = train_specee(m.cfg, mc, m.params, m2r2, draft_ids, records, sc, a.out, m.fingerprint, a.minutes)
    summary.pop("predictors")
    if a.minutes is not None and summary["minutes"] > a.minutes:
        print(f"specee: {summary['minutes']} minutes, over the {a.minutes} budget (not enforced)", file=sys.stderr)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
