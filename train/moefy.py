"""MoEfy a dense model: split each FFN into equal experts by neuron co-activation and train a router per
layer on the base's self-distilled answers (training/moefy.py); with --retrain, also refit every layer's
experts in order on the MoE model's own inputs (training/moe_retrain.py). Writes the small asset that
the alias `smollm2-135m-moe` loads (loading/moefied.py).

    python -m train.moefy --model smollm2-135m --distill-dir runs/distill/smollm2-135m-24k \
        [--experts 8] [--top-k 2] [--tokens 16384] [--steps 400] --out DIR [--install NAME]
    python -m train.moefy --retrain --model smollm2-135m --distill-dir runs/distill/smollm2-135m-24k \
        [--experts 16] [--top-k 4] [--records 256] [--held-out-records 32] [--fit-target residual] \
        [--rank 128] [--store-dtype float16] [--expert-steps 0] [--max-minutes 55] --out DIR [--install NAME]
    python -m train.moefy --e2e --asset DIR/asset --model smollm2-135m --distill-dir ... \
        [--e2e-steps 100] [--e2e-records 512] [--max-minutes 55] --out DIR2 [--install NAME]

Writes DIR/asset (Orbax: neuron permutation + router per layer; with --retrain also the refitted experts,
format m2r2-moefied/2), DIR/metrics.jsonl (router loss per layer or per-layer errors, held-out metrics)
and DIR/summary.json; --install also copies the asset to m2r2_jax/assets/NAME. The router-only build runs
in minutes and starts over when rerun; --retrain checkpoints every layer and resumes where it stopped
(--max-minutes ends a call after the layer that passes it). --e2e continues a --retrain asset end to end
(training/moe_distill.py: KL to the dense model, only the down-projection deltas train): Orbax checkpoints
every 10 steps and at least every --save-minutes (10), --max-minutes ends a call after the step past it,
the same command resumes exactly; DIR2/asset is written when --e2e-steps are done.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    r = p.add_argument_group("--retrain (training/moe_retrain.py; --steps = router steps per layer)")
    r.add_argument("--retrain", action="store_true", help="refit the experts layer by layer")
    r.add_argument("--records", type=int, default=256, help="distilled records carried through the model")
    r.add_argument("--held-out-records", type=int, default=32)
    r.add_argument("--tokens-per-layer", type=int, default=65536, help="training positions per layer (at most)")
    r.add_argument("--fit-target", dest="retrain_target", choices=("residual", "dense_ffn"), default="residual")
    r.add_argument("--rank", type=int, default=128, help="0: full down projections; r: rank-r deltas")
    r.add_argument("--ridge", type=float, default=1e-2)
    r.add_argument("--store-dtype", choices=("float32", "float16", "bfloat16"), default="float16")
    r.add_argument("--partition-iters", type=int, default=10)
    r.add_argument("--expert-steps", type=int, default=0, help="Adam steps per layer after the closed form")
    p.add_argument("--max-minutes", type=float, default=None, help="--retrain/--e2e: end a call past this")
    e = p.add_argument_group("--e2e (training/moe_distill.py)")
    e.add_argument("--e2e", action="store_true", help="distil a --retrain asset's deltas end to end")
    e.add_argument("--asset", default=None, help="the asset to continue (a directory or an installed name)")
    e.add_argument("--e2e-steps", type=int, default=100)
    e.add_argument("--e2e-batch", type=int, default=4)
    e.add_argument("--e2e-seq-len", type=int, default=256)
    e.add_argument("--e2e-lr", type=float, default=2e-4)
    e.add_argument("--e2e-records", type=int, default=512)
    e.add_argument("--save-minutes", type=float, default=10.0, help="a checkpoint at least this often (<= 10)")
    a = p.parse_args(argv)
    quiet_env()
    from m2r2_jax.errors import M2R2Error

    if a.retrain and a.e2e:
        raise M2R2Error("--retrain and --e2e are two steps: run them one after the other")
    if a.max_minutes is not None and not a.max_minutes > 0:
        raise M2R2Error(f"--max-minutes {a.max_minutes}: expected > 0")
    if a.install is not None and (not a.install or Path(a.install).name != a.install or a.install in (".", "..")):
        raise M2R2Error(f"--install {a.install!r}: expected a plain name (the asset goes to m2r2_jax/assets/NAME)")
    if a.retrain:
        return _retrain(a)
    if a.e2e:
        return _e2e(a)

    from m2r2_jax.training.moefy import MoefyConfig, build

    names = ("experts", "top_k", "tokens", "held_out", "cluster_tokens", "target", "steps", "lr", "shards", "seed")
    c = _config(MoefyConfig, a, names)
    m = _dense_model(a)
    c.validate(m.cfg)
    summary = build(m.cfg, m.params, _records(a, c.shards, c.seed), c, a.out, _base(a, m), progress=not a.no_progress)
    _install(a, summary)
    summary.pop("layers")
    print(json.dumps(summary))
    return 0


def _config(cls, a, names, **renamed):
    """A config from the parsed flags: `names` read as they are, `renamed` as field=flag dest."""
    return cls(**{n: getattr(a, n) for n in names}, **{f: getattr(a, d) for f, d in renamed.items()})


def _dense_model(a):
    """The dense base, float32 (an asset is fitted on the exact base weights)."""
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.loading.registry import load_model

    m = load_model(a.model, tokenizer=False)
    if m.cfg.mlp_type != "dense":
        raise M2R2Error(f"--model {a.model}: MoEfication needs a dense model, this one's MLP is {m.cfg.mlp_type}")
    return m


def _records(a, shards: int, seed: int):
    from m2r2_jax.training.moefy import distilled_records

    return distilled_records(a.distill_dir, shards, seed)


def _base(a, m) -> dict:
    from m2r2_jax.training.checkpoint import base_identity

    return base_identity(a.model, m.cfg, m.params, m.fingerprint)


def _install(a, summary: dict) -> None:
    """--install NAME: copy DIR/asset to m2r2_jax/assets/NAME (replacing it), noted in the summary."""
    if not a.install:
        return
    import shutil

    from m2r2_jax.loading.moefied import ASSETS

    dst = ASSETS / a.install
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(Path(a.out) / "asset", dst)
    summary["installed"] = str(dst)


def _retrain(a) -> int:
    from m2r2_jax.training.moe_retrain import RetrainConfig, retrain

    names = ("experts", "top_k", "records", "tokens_per_layer", "rank", "store_dtype", "ridge", "partition_iters")
    c = _config(
        RetrainConfig,
        a,
        (*names, "shards", "seed"),
        held_out="held_out_records",
        target="retrain_target",
        router_steps="steps",
        steps="expert_steps",
    ).check()
    m = _dense_model(a)
    c.validate(m.cfg)
    records = _records(a, c.shards, c.seed)
    summary = retrain(m.cfg, m.params, records, c, a.out, _base(a, m), not a.no_progress, a.max_minutes)
    if summary["finished"]:
        _install(a, summary)
    summary.pop("layers", None)
    print(json.dumps(summary))
    return 0


def _e2e(a) -> int:
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.loading.moefied import (
        asset_path,
        moe_config,
        moefy_params,
        read_moe_asset,
        read_moe_meta,
        save_moe_asset,
        stored_experts,
    )
    from m2r2_jax.training.moe_distill import DistillConfig, distill

    c = DistillConfig(steps=a.e2e_steps, batch_size=a.e2e_batch, seq_len=a.e2e_seq_len, lr=a.e2e_lr, seed=a.seed)
    c.check()
    if a.asset is None:
        raise M2R2Error("--e2e needs --asset (a --retrain run's DIR/asset)")
    if a.e2e_records < a.e2e_batch:
        raise M2R2Error(f"--e2e-records {a.e2e_records}: expected >= --e2e-batch {a.e2e_batch}")
    if not 0 < a.save_minutes <= 10:
        raise M2R2Error(f"--save-minutes {a.save_minutes}: expected in (0, 10]")
    src = asset_path(a.asset)
    read_moe_meta(src)  # a missing or foreign-format asset is refused before the model loads
    m = _dense_model(a)
    perm, router, meta, experts = read_moe_asset(src, m.cfg, m.fingerprint)
    if meta.get("dense_layers"):
        raise M2R2Error(f"--asset {a.asset}: --e2e handles assets whose every layer is an MoE")
    mcfg = moe_config(m.cfg, meta["experts"], meta["top_k"])
    base = moefy_params(m.cfg, m.params, perm, router)  # the split: the deltas train apart
    records = _records(a, a.shards, a.seed)[: a.e2e_records]
    deltas, summary = distill(
        mcfg,
        base,
        experts,
        m.cfg,
        m.params,
        records,
        c,
        a.out,
        m.fingerprint,
        progress=not a.no_progress,
        max_minutes=a.max_minutes,
        save_minutes=a.save_minutes,
    )
    if summary["finished"]:
        dtype = stored_experts(meta)["dtype"]  # the source's storage dtype
        meta = {k: v for k, v in meta.items() if k not in ("format", "experts_stored", "held_out_mean")}
        meta["build"] = {**meta.get("build", {}), "e2e": {**c.__dict__, "records": len(records), "from": str(src)}}
        save_moe_asset(Path(a.out) / "asset", perm, router, meta, deltas, dtype)
        _install(a, summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
