"""Distil the 2-model drafter's small model from a frozen base: the base's config at N layers (the project's
decoder), initialised from N evenly spaced base layers and the final norm, sharing the base's embedding and
tied head; its layers and final norm trained with KL to the full model's logits on a self-distillation
cache.

    python -m train.train_sps --model smollm2-135m --distill-dir DIR --out DIR [--layers 3] \
        [--steps 200] [--batch-size 8] [--lr 3e-4] [--limit N] [--budget-minutes M] [--save-minutes 10] \
        [--no-progress]

Orbax checkpoints (at least every --save-minutes, and at the end), metrics (JSONL + TensorBoard) under
--out; the same command resumes exactly. `eval.speculative --drafter sps --sps-checkpoint DIR` drafts
with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from m2r2_jax.cli import add_model_args, quiet_env, run_main


def draft_main(kind: str, doc: str, argv=None):
    """Both trainers' CLI (kind: kangaroo | sps)."""
    p = argparse.ArgumentParser(prog=f"python -m train.train_{kind}", description=doc.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--distill-dir", required=True, help="a self-distillation cache (train.train --distill-only)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, summary.json)")
    if kind == "kangaroo":
        p.add_argument("--exit-layer", type=int, default=3, help="shallow base layers under the adapter (default 3)")
        lr = 1e-3
    else:
        p.add_argument("--layers", type=int, default=3, help="the draft model's layers (default 3)")
        lr = 3e-4
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use the first N distilled answers")
    p.add_argument("--budget-minutes", type=float, default=None, help="stop (and save) after this many minutes")
    p.add_argument("--save-minutes", type=float, default=10.0, help="checkpoint at least this often (<= 10)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    quiet_env()
    from m2r2_jax.distill_cache import read_manifest
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.peers.kangaroo import KangarooConfig
    from m2r2_jax.peers.sps import SPSConfig
    from m2r2_jax.training.spec_peers import RunLimits, train_kangaroo, train_sps

    common = dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, seed=a.seed)
    c = (
        KangarooConfig(exit_layer=a.exit_layer, **common)
        if kind == "kangaroo"
        else SPSConfig(num_layers=a.layers, **common)
    )
    limits = RunLimits(budget_minutes=a.budget_minutes, save_minutes=a.save_minutes)
    if a.limit is not None and a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if not Path(a.distill_dir).is_dir() or read_manifest(a.distill_dir) is None:
        raise M2R2Error(f"--distill-dir: no self-distillation cache at {a.distill_dir}")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise M2R2Error(f"--out {a.out} is a file")

    from m2r2_jax.distill_cache import load_distill_cache
    from m2r2_jax.loading.registry import load_model

    ds = load_distill_cache(a.distill_dir)
    records = [dict(prompt_ids=r["prompt_ids"], answer_ids=r["answer_ids"]) for r in ds]
    if a.limit:
        records = records[: a.limit]
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype, tokenizer=False)
    c.check(m.cfg)
    train = train_kangaroo if kind == "kangaroo" else train_sps
    summary = train(m.cfg, m.params, records, c, a.out, a.model, m.fingerprint, limits, progress=not a.no_progress)
    summary.pop("adapter" if kind == "kangaroo" else "draft")
    print(json.dumps(summary))
    return 0


def main(argv=None):
    return draft_main("sps", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
