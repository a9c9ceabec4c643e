"""MoEfy a dense model: split each FFN into equal experts by neuron co-activation and train a router per
layer on the base's self-distilled answers (training/moefy.py); writes the small asset that the alias
`smollm2-135m-moe` loads (loading/moefied.py).

    python -m train.moefy --model smollm2-135m --distill-dir runs/distill/smollm2-135m-24k \
        [--experts 8] [--top-k 2] [--tokens 16384] [--steps 400] --out DIR [--install NAME]

Writes DIR/asset (Orbax: neuron permutation + router per layer), DIR/metrics.jsonl (router loss per
layer, held-out metrics) and DIR/summary.json; --install also copies the asset to m2r2_jax/assets/NAME.
Runs in minutes on a CPU; rerunning starts over.
"""

from __future__ import annotations

import argparse
import json

from m2r2_jax.cli import add_model_args, quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.moefy", description=__doc__.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--distill-dir", required=True, help="the base's self-distillation cache (training prompts)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2, help="the asset's default experts per token")
    p.add_argument("--tokens", type=int, default=16384, help="answer tokens collected (incl. --held-out)")
    p.add_argument("--held-out", type=int, default=2048)
    p.add_argument("--cluster-tokens", type=int, default=4096)
    p.add_argument("--target", choices=("out_norm", "act_mass"), default="out_norm")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--shards", type=int, default=2, help="read the cache's first N shards only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--install", default=None, help="also copy the asset to m2r2_jax/assets/NAME")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    quiet_env()

    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.checkpoint import base_identity
    from m2r2_jax.training.moefy import MoefyConfig, build, distilled_records

    c = MoefyConfig(
        experts=a.experts,
        top_k=a.top_k,
        tokens=a.tokens,
        held_out=a.held_out,
        cluster_tokens=a.cluster_tokens,
        target=a.target,
        steps=a.steps,
        lr=a.lr,
        shards=a.shards,
        seed=a.seed,
    )
    m = load_model(a.model, tokenizer=False)  # float32: the asset is fitted on the exact base
    c.validate(m.cfg)
    if m.cfg.mlp_type != "dense":
        from m2r2_jax.errors import M2R2Error

        raise M2R2Error(f"--model {a.model}: MoEfication needs a dense model, this one's MLP is {m.cfg.mlp_type}")
    records = distilled_records(a.distill_dir, c.shards, c.seed)
    base = base_identity(a.model, m.cfg, m.params, m.fingerprint)
    summary = build(m.cfg, m.params, records, c, a.out, base, progress=not a.no_progress)
    if a.install:
        import shutil
        from pathlib import Path

        from m2r2_jax.loading.moefied import ASSETS

        dst = ASSETS / a.install
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(Path(a.out) / "asset", dst)
        summary["installed"] = str(dst)
    summary.pop("layers")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
