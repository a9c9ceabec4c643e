"""All drafters on the same prompts in one process: speed-up over our own AR decode, tau, lossless,
draft and verify ms per step, trainable parameters and training minutes, per category; a table, a PNG
and JSON.

    python -m eval.compare --model smollm2-135m --dataset NAME_OR_PATH \
        [--drafters m2r2,m2r2+lookup,pld,draft_verify,lookahead,rest] [--limit N] [--max-new-tokens N] \
        [--checkpoint DIR] [--rest-datastore DIR] [peer knobs as in eval.speculative] \
        [--out FILE.json] [--plot FILE.png] [--resume]

--kangaroo-checkpoint / --sps-checkpoint / --medusa-checkpoint / --eagle-checkpoint default to
artifacts/peers/{kangaroo,sps,medusa,eagle} where those exist (scripts/train_peers.sh); the table's
trainable parameters and training minutes come from each checkpoint's metadata.

Greedy, batch 1. Each drafter runs the one jitted loop (eval.speculative's harness, its AR timed in the
same call); per-drafter journals and finished rows live in FILE.parts/ and stay there: --resume carries
on from them and runs only the drafters not yet finished, so drafters can be added to a comparison later
(a finished row is reused only under the same model, dataset, limit, tokens and drafter options,
checkpoints included; each row says where and when it was measured).
JSON: {"drafters": {name: {"speedup", "tau", "lossless", "draft_ms", "verify_ms", "trainable_params",
"train_minutes", "per_category": {...}}}, "lossless", "config", "machine"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2r2_jax.cli import add_model_args, decode_setup, quiet_env, run_main

DEFAULT_DRAFTERS = "m2r2,m2r2+lookup,pld,draft_verify,lookahead"
# the trained drafters' checkpoint flags (their dest) -> the run dirs scripts/train_peers.sh fills; a flag
# not given defaults to its dir when that exists
PEERS_DIR = Path(__file__).resolve().parents[1] / "artifacts" / "peers"
PEER_CHECKPOINTS = {
    "kangaroo_checkpoint": "kangaroo",
    "sps_checkpoint": "sps",
    "medusa_checkpoint": "medusa",
    "eagle_checkpoint": "eagle",  # eagle and eagle2
}


def main(argv=None):
    from eval.alignment import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--dataset", required=True, help="eval set name (mt_bench, spec_bench, ...) or a JSONL path")
    p.add_argument("--drafters", default=DEFAULT_DRAFTERS, help=f"comma-separated (default {DEFAULT_DRAFTERS})")
    p.add_argument("--checkpoint", default=None, help="the M2R2 checkpoint (default: the shipped one)")
    p.add_argument("--tree", default=None, help="m2r2: draft tree (default star4)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=None, help="result JSON (default runs/compare/DATASET.json)")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    from m2r2_jax.decoding.peer_drafters.options import KNOBS

    for k in KNOBS:
        p.add_argument("--" + k.dest.replace("_", "-"), dest=k.dest, type=k.type, default=None, help=k.help)
    a = p.parse_args(argv)
    quiet_env()
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.compare import parse_specs, spec_options
    from m2r2_jax.evaluation.spec_eval import SpecEvalConfig

    specs = parse_specs(a.drafters)
    knobs = {k.dest: getattr(a, k.dest) for k in KNOBS}
    for dest, name in PEER_CHECKPOINTS.items():
        if knobs.get(dest) is None and (PEERS_DIR / name).is_dir():
            knobs[dest] = str(PEERS_DIR / name)
    knobs["tree"] = a.tree
    for s in specs:  # every drafter's options are validated before anything loads or is written
        spec_options(s, knobs)
    if a.limit is not None and a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if a.max_new_tokens < 1:
        raise M2R2Error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    name = Path(a.dataset).stem if Path(a.dataset).suffix else a.dataset.replace("/", "_").replace(":", "_")
    out = Path(a.out) if a.out else Path("runs") / "compare" / f"{name}.json"
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    work = out.with_suffix(".parts")
    if work.exists() and not a.resume:
        raise M2R2Error(f"{work} holds earlier rows of this comparison: pass --resume to reuse them, or delete it")
    for f, what, given in ((out, "--out", a.out), (plot, "--plot", a.plot or a.out)):
        if given is not None and not f.parent.is_dir():
            raise M2R2Error(f"{what}: directory {f.parent} does not exist")
        if f.is_dir():
            raise M2R2Error(f"{what}: {f} is a directory")

    from m2r2_jax.data.eval_sets import load_eval_set
    from m2r2_jax.evaluation.compare import format_table, render_png, run_compare
    from m2r2_jax.evaluation.spec_eval import M2R2Bundle, machine_info
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.checkpoint import load_m2r2, resolve_checkpoint_dir

    needs = any(s.startswith("m2r2") for s in specs)
    ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
    if needs:
        resolve_checkpoint_dir(ckpt)
    items = load_eval_set(a.dataset, limit=a.limit)
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype)
    bundle = None
    if needs:
        mc, m2r2, draft_ids, meta = load_m2r2(ckpt, m.cfg, m.params, a.model, base_fingerprint=m.fingerprint)
        bundle = M2R2Bundle(mc, m2r2, draft_ids, meta)
    backend, params = decode_setup(m, a.cpu_kernel)
    base = SpecEvalConfig(draft=spec_options(specs[0], knobs), max_new_tokens=a.max_new_tokens)
    res = run_compare(
        m,
        bundle,
        items,
        specs,
        base,
        work,
        knobs=knobs,
        backend=backend,
        decode_params=params,
        resume=a.resume,
        progress=not a.no_progress,
        journal_key=dict(model=a.model, checkpoint=ckpt if needs else None, dataset=a.dataset, limit=a.limit),
    )
    res["config"] = dict(
        model=a.model,
        dataset=a.dataset,
        limit=a.limit,
        max_new_tokens=a.max_new_tokens,
        checkpoint=ckpt if needs else None,
        backend=backend.name,
        drafters=list(specs),
    )
    res["machine"] = machine_info()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    plot.write_bytes(render_png(res, f"{a.model} on {a.dataset}: {len(items)} items, greedy"))
    print(format_table(res))
    print(f"wrote {out} and {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
