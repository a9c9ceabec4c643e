"""Early exit (dynamic compute) against the full model: M2R2's ARLA-router exit and its peers, per
threshold: speed-up over our own AR decode, FLOPs speed-up, layers per token, ROUGE-L, exact match.

    python -m eval.dynamic --model smollm2-135m [--checkpoint DIR] --dataset NAME_OR_PATH \
        [--methods m2r2,m2r2_deferred,static,calm] [--exit-heads DIR] [--specee DIR] [--layerskip DIR] \
        [--skipdecode DIR] [--thresholds T1,T2,... | --thresholds NAME=T1,T2,...] \
        [--limit N] [--max-new-tokens N] [--out FILE.json] [--plot FILE.png] [--resume]

Thresholds: m2r2 / m2r2_deferred the router probability, static the exit layer E, calm the softmax margin.
The trained peers' dirs default to artifacts/peers/<name> where those exist (scripts/train_peers.sh); the
JSON's "budgets" and the table give each method's trainable parameters and training minutes (a peer's from
its checkpoint's metadata). Every finished prompt is appended to FILE.partial.jsonl; --resume carries on
from it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2r2_jax.cli import add_model_args, decode_setup, quiet_env, run_main

PEERS_DIR = Path(__file__).resolve().parents[1] / "artifacts" / "peers"  # scripts/train_peers.sh fills it


def parse_thresholds(specs, methods) -> dict:
    """["0.5,0.7"] (every method) and/or ["static=20,24", ...] (one method) -> {method: (t, ...)}."""
    from m2r2_jax.errors import M2R2Error

    out = {}
    for spec in specs or []:
        name, _, vals = spec.rpartition("=")
        try:
            ts = tuple(float(x) for x in vals.split(",") if x.strip())
        except ValueError:
            raise M2R2Error(f"--thresholds {spec!r}: expected numbers separated by commas") from None
        for m in [name] if name else methods:
            out[m] = ts
    return out


def format_table(res: dict) -> str:
    """One row per method and threshold; with res["budgets"] (training_budgets) each method's trainable
    parameters and training minutes too."""
    budgets = res.get("budgets") or {}
    head = ("method", "thr", "speedup", "flops", "layers", "exit%", "rougeL", "ref", "exact")
    w = (14, 6, 8, 6, 7, 6, 7, 6, 6)
    if budgets:
        head, w = head + ("params", "train min"), w + (10, 9)
    f = lambda x, s=".2f": "-" if x is None else format(x, s)  # noqa: E731
    rows = [head]
    for name, pts in res["methods"].items():
        b = budgets.get(name, {})
        for p in pts:
            rate = None if p["exit_rate"] is None else 100 * p["exit_rate"]
            row = (
                name,
                format(p["threshold"], "g"),
                f(p["speedup"]),
                f(p["flops_speedup"]),
                f(p["layers_per_token"], ".1f"),
                f(rate, ".0f"),
                f(p["rouge_l"], ".3f"),
                f(p["rouge_l_ref"], ".3f"),
                f(p["exact_match"]),
            )
            if budgets:
                row += (f(b.get("trainable_params"), "d"), f(b.get("train_minutes"), ".1f"))
            rows.append(row)
    return "\n".join(" ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


def main(argv=None):
    from eval.alignment import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m eval.dynamic", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--checkpoint", default=None, help=f"M2R2 checkpoint (default: the shipped {DEFAULT_CHECKPOINT})")
    p.add_argument(
        "--dataset", default="mt_bench", help="koala, self_instruct, wizardlm, mt_bench, ... or a .json/.jsonl path"
    )
    p.add_argument(
        "--methods",
        default="m2r2,static,calm",
        help="comma-separated: m2r2, m2r2_deferred, static, static_trained (needs --exit-heads), calm, "
        "specee (needs --specee), layerskip (needs --layerskip), skipdecode (needs --skipdecode)",
    )
    p.add_argument("--thresholds", action="append", default=None, help="T1,T2,... for every method, or NAME=T1,T2,...")
    p.add_argument("--limit", type=int, default=48, help="number of prompts, round-robin over categories")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-pending", type=int, default=4, help="m2r2_deferred: exited tokens that may wait")
    p.add_argument("--min-layer", type=int, default=1, help="m2r2: first fast layer where a token may exit")
    p.add_argument("--calm-checks", default="", help="calm: comma-separated check layers (default every 2nd from N/2)")
    for flag, what, name in (
        ("--exit-heads", "static_trained: exit heads", "exit_heads"),
        ("--specee", "specee: trained predictors", "specee"),
        ("--layerskip", "layerskip: trained adapters", "layerskip"),
        ("--skipdecode", "skipdecode: trained adapters", "skipdecode"),
    ):
        d = PEERS_DIR / name
        p.add_argument(
            flag,
            default=str(d) if d.is_dir() else "",
            help=f"{what} (python -m train.train_{name}'s --out; default {d} where it exists)",
        )
    p.add_argument("--out", default=None, help="result JSON (default runs/dynamic/<dataset>.json)")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--resume", action="store_true", help="carry on from --out's journal (FILE.partial.jsonl)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    quiet_env()

    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.dynamic_eval import DynamicEvalConfig

    methods = tuple(x.strip() for x in a.methods.split(",") if x.strip())
    try:
        checks = tuple(int(x) for x in a.calm_checks.split(",") if x.strip())
    except ValueError:
        raise M2R2Error(f"--calm-checks {a.calm_checks!r}: expected layer numbers separated by commas") from None
    ec = DynamicEvalConfig(
        methods=methods,
        thresholds=parse_thresholds(a.thresholds, methods),
        max_new_tokens=a.max_new_tokens,
        max_pending=a.max_pending,
        min_layer=a.min_layer,
        calm_checks=checks,
        exit_heads=a.exit_heads,
        specee=a.specee,
        layerskip=a.layerskip,
        skipdecode=a.skipdecode,
    )
    if a.limit is not None and a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if "static_trained" in methods:
        from m2r2_jax.training.checkpoint import latest_step

        if latest_step(Path(a.exit_heads) / "checkpoints") is None:
            raise M2R2Error(f"--exit-heads {a.exit_heads}: no exit-head checkpoint there")
    from m2r2_jax.training.checkpoint import latest_step

    for name, flag, d in (
        ("specee", "--specee", a.specee),
        ("layerskip", "--layerskip", a.layerskip),
        ("skipdecode", "--skipdecode", a.skipdecode),
    ):
        if name in methods and latest_step(Path(d) / "checkpoints") is None:
            raise M2R2Error(f"{flag} {d}: no {name} checkpoint there")
    if a.mesh:
        raise M2R2Error("--mesh is not supported by the early-exit loop (single device)")
    name = Path(a.dataset).stem if Path(a.dataset).suffix else a.dataset.replace("/", "_").replace(":", "_")
    out = Path(a.out) if a.out else Path("runs") / "dynamic" / f"{name}.json"
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    journal = out.with_suffix(".partial.jsonl")
    if journal.exists() and not a.resume:
        raise M2R2Error(f"{journal} holds an interrupted run: pass --resume to carry on from it, or delete it")
    for f, what, given in ((out, "--out", a.out), (plot, "--plot", a.plot or a.out)):
        if given is not None and not f.parent.is_dir():
            raise M2R2Error(f"{what}: directory {f.parent} does not exist")
        if f.is_dir():
            raise M2R2Error(f"{what}: {f} is a directory")

    from m2r2_jax.data.eval_sets import load_eval_set
    from m2r2_jax.evaluation.dynamic_eval import _rouge, render_png, run_dynamic_eval, training_budgets
    from m2r2_jax.evaluation.spec_eval import M2R2Bundle, machine_info
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.checkpoint import load_m2r2, resolve_checkpoint_dir

    _rouge()  # the package is there before anything loads
    items = load_eval_set(a.dataset, limit=a.limit)
    ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
    resolve_checkpoint_dir(ckpt)
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype)
    mc, m2r2, draft_ids, meta = load_m2r2(ckpt, m.cfg, m.params, a.model, base_fingerprint=m.fingerprint)
    backend, params = decode_setup(m, a.cpu_kernel)
    from m2r2_jax.training.peers import load_exit_heads, load_layerskip, load_skipdecode, load_specee

    peers = {}
    for name, loader, d in (
        ("static_trained", load_exit_heads, a.exit_heads),
        ("specee", load_specee, a.specee),
        ("layerskip", load_layerskip, a.layerskip),
        ("skipdecode", load_skipdecode, a.skipdecode),
    ):
        if name in methods:
            peers[name] = loader(d, m.cfg, m.fingerprint) if name != "specee" else loader(d, m.fingerprint)
    if a.resume and journal.exists():
        print(f"resuming from {journal}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = run_dynamic_eval(
        m,
        M2R2Bundle(mc, m2r2, draft_ids, meta),
        items,
        ec,
        backend=backend,
        decode_params=params,
        journal=journal,
        resume=a.resume,
        progress=not a.no_progress,
        journal_key=dict(model=a.model, checkpoint=str(Path(ckpt).resolve()), dataset=a.dataset, limit=a.limit),
        peers=peers,
    )
    res["config"].update(
        model=a.model,
        checkpoint=ckpt,
        train_step=meta.get("step"),
        dataset=a.dataset,
        limit=a.limit,
        backend=backend.name,
        num_fast_layers=mc.n_fast(m.cfg.num_layers),
    )
    res["budgets"] = training_budgets(ec, meta)
    res["machine"] = machine_info()
    plot.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    plot.write_bytes(render_png(res, f"{a.model} on {a.dataset}: {res['prompts']} prompts, greedy"))
    journal.unlink(missing_ok=True)
    print(format_table(res))
    print(
        f"AR {res['ar']['tokens_per_second']:.1f} tok/s; {res['prompts']} prompts; wrote {out} and {plot}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    run_main(main)
