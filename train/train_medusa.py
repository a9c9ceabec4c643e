"""Train Medusa-1's heads on a frozen base: K residual blocks on the full model's final hidden state, each
under the base's frozen LM head, head k predicting the token k + 2 places ahead, with cross-entropy to
the self-distilled answers' tokens.

    python -m train.train_medusa --model smollm2-135m --distill-dir DIR --out DIR [--heads 4] \
        [--steps 400] [--batch-size 8] [--seq-len 256] [--lr 1e-3] [--limit N] [--budget-minutes M] \
        [--save-minutes 10] [--no-progress]

Orbax checkpoints (at least every --save-minutes, and at the end), metrics (JSONL + TensorBoard) under
--out; the same command resumes exactly. `eval.speculative --drafter medusa --medusa-checkpoint DIR`
drafts with it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from m2r2_jax.cli import add_model_args, quiet_env, run_main


def feature_peer_main(kind: str, doc: str, argv=None):
    """Both trainers' CLI (kind: medusa | eagle)."""
    p = argparse.ArgumentParser(prog=f"python -m train.train_{kind}", description=doc.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--distill-dir", required=True, help="a self-distillation cache (train.train --distill-only)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, summary.json)")
    if kind == "medusa":
        p.add_argument("--heads", type=int, default=4, help="Medusa heads (default 4)")
        lr = 1e-3
    else:
        p.add_argument("--noise", type=float, default=0.2, help="uniform noise on the input features (default 0.2)")
        lr = 5e-4
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--positions", type=int, default=96, help="loss positions per row that read the LM head")
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
    from m2r2_jax.peers.eagle import EagleConfig
    from m2r2_jax.peers.medusa import MedusaConfig
    from m2r2_jax.training.spec_peers import RunLimits

    common = dict(
        steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, positions=a.positions, lr=a.lr, seed=a.seed
    )
    c = MedusaConfig(heads=a.heads, **common) if kind == "medusa" else EagleConfig(noise=a.noise, **common)
    limits = RunLimits(budget_minutes=a.budget_minutes, save_minutes=a.save_minutes)
    if a.limit is not None and a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if not Path(a.distill_dir).is_dir() or read_manifest(a.distill_dir) is None:
        raise M2R2Error(f"--distill-dir: no self-distillation cache at {a.distill_dir}")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise M2R2Error(f"--out {a.out} is a file")

    from m2r2_jax.distill_cache import load_distill_cache
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.medusa_eagle import train_eagle, train_medusa

    ds = load_distill_cache(a.distill_dir)
    n = len(ds) if a.limit is None else min(a.limit, len(ds))
    records = [dict(prompt_ids=ds[i]["prompt_ids"], answer_ids=ds[i]["answer_ids"]) for i in range(n)]
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype, tokenizer=False)
    train = train_medusa if kind == "medusa" else train_eagle
    summary = train(m.cfg, m.params, records, c, a.out, a.model, m.fingerprint, limits, progress=not a.no_progress)
    summary.pop("heads" if kind == "medusa" else "draft")
    print(json.dumps(summary))
    return 0


def main(argv=None):
    return feature_peer_main("medusa", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
