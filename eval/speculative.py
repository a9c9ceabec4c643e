"""Self-speculative decoding vs plain AR decoding, in one run on the same prompts:
tokens/s, speed-up, tau and losslessness per category, acceptance by tree depth.

    python -m eval.speculative --model smollm2-135m [--checkpoint DIR] --dataset NAME_OR_PATH \
        [--drafter m2r2|pld|draft_verify|lookahead|rest|medusa|eagle|eagle2] [--tree NAME] [--draft-layers N] \
        [--temperature T] [--top-p P] [--seed S] [--max-new-tokens N] [--limit K] [--batch-size B] \
        [--out FILE.json] [--plot FILE.png] [--resume]

--drafter picks what drafts in the same loop (verification, acceptance, the lossless check and the
cost breakdown are the same for all): m2r2 (the trained fast stream, default; with --lookup), pld
(prompt lookup alone), or a training-free peer: draft_verify (the base with layers skipped,
--skip-layers / --exit-layer, --dv-*), lookahead (--la-*), rest (--rest-datastore DIR, --rest-*); or a
trained peer: medusa (--medusa-checkpoint DIR), eagle / eagle2 (--eagle-checkpoint DIR, --eagle-*).

Every finished item is appended to FILE.partial.jsonl next to --out; after an
interruption, the same command with --resume carries on from there (the
journal is removed once FILE.json is written).

Multi-turn items (MT-Bench, Spec-Bench's multi-turn group) evaluate every
turn; later turns carry the model's own earlier answers. Compilation is
excluded from all timings and reported separately. Speed-up = (spec tokens/s)
/ (AR tokens/s) over all timed runs (= total AR time / total spec time when
greedy, where both emit the same tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2r2_jax.cli import add_model_args, decode_setup, quiet_env, run_main


def _f(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def _yn(x):
    return "n/a" if x is None else ("yes" if x else "NO")


def format_table(res: dict) -> str:
    rows = [("category", "prompts", "AR tok/s", "spec tok/s", "speedup", "tau", "lossless")]
    for cat, c in res["per_category"].items():
        rows.append(
            (
                cat,
                str(c["prompts"]),
                _f(c["ar_tps"], ".1f"),
                _f(c["spec_tps"], ".1f"),
                _f(c["speedup"]),
                _f(c["tau"]),
                _yn(c["lossless"]),
            )
        )
    t = res["totals"]
    rows.append(
        (
            "overall",
            str(res["prompts"]),
            _f(t["ar_tps"], ".1f"),
            _f(t["spec_tps"], ".1f"),
            _f(res["overall_speedup"]),
            _f(res["tau"]),
            _yn(res["lossless"]),
        )
    )
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(r[0].ljust(w[0]) if i == 0 else r[i].rjust(w[i]) for i in range(len(r))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv=None):
    from eval.alignment import DEFAULT_CHECKPOINT

    p = argparse.ArgumentParser(prog="python -m eval.speculative", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument(
        "--checkpoint",
        default=None,
        help=f"M2R2 checkpoint (--drafter m2r2; default: the shipped {DEFAULT_CHECKPOINT})",
    )
    p.add_argument(
        "--dataset",
        default="mt_bench",
        help="eval set: builtin (16 prompts shipped with the package), mt_bench, spec_bench, koala, self_instruct, "
        "wizardlm, vicuna_bench, alpaca_eval (under the shared data dir), a .json/.jsonl path, or a hub dataset "
        "name[:split]",
    )
    p.add_argument(
        "--tree",
        default=None,
        help="M2R2's draft tree: preset (chain1..chain6, star2..star4, tree16, tree32, tree64) or a JSON file of "
        "paths; the default star4 (the fast stream's top-4 tokens at one depth) fills the same "
        "5-node verification block as --lookup 4 and measured best with the CPU kernels "
        "(BENCHMARKS.md); without the kernels, chain1 with --lookup 0 is the cheaper choice",
    )
    p.add_argument("--draft-layers", type=int, default=None, help="fast layers used to draft (0 = all, the default)")
    p.add_argument(
        "--draft-stop",
        type=float,
        default=None,
        help="M2R2's confidence stop: after each drafted depth a row goes on only while some node the next "
        "depth would expand was drafted with probability >= P; once no row goes on, the remaining depths' "
        "fast-stream passes are skipped (their nodes are verified as token 0). Default 0 = off (every depth "
        "drafted, as before); a one-depth tree (star4) is unaffected",
    )
    p.add_argument(
        "--draft-dtype",
        default=None,
        help="M2R2's draft weights: float32 (default: as loaded) or bfloat16 (merged fast layers and draft head "
        "cast once, bf16 matmuls with f32 accumulation; verification unchanged, so still lossless)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (lossless check on every prompt)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--limit", type=int, default=None, help="number of items, taken round-robin over categories (default: all)"
    )
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--ar-block",
        type=int,
        default=1,
        help="AR decode steps over blocks of this many slots (the token + padding), the shapes of a "
        "verification of that many tree nodes, so that both round alike (use the tree size with "
        "bf16 matmuls); the one-slot AR loop is then timed too (speedup_vs_block1_ar)",
    )
    p.add_argument(
        "--out", default=None, help="result JSON (its directory must exist; default runs/speculative/<dataset>.json)"
    )
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument(
        "--hf-baselines",
        action="store_true",
        help="also time HF transformers greedy, prompt-lookup and early-exit assisted generation on "
        "every prompt in the same run (greedy, batch 1; needs torch)",
    )
    p.add_argument(
        "--lookup",
        type=int,
        default=None,
        help="prompt lookup (--drafter m2r2; with --drafter pld, its tokens per draft): when the last "
        "--lookup-ngram (down to 2) tokens occurred earlier in the prompt or the answer, verify the N "
        "tokens that followed them instead of an M2R2 draft "
        "(default 4; 0 = M2R2 drafts only; lossless either way)",
    )
    p.add_argument("--lookup-ngram", type=int, default=None, help="longest n-gram matched by --lookup (default 3)")
    p.add_argument(
        "--no-lookup-extend",
        action="store_true",
        help="turn off the lookup extension of M2R2 drafts (with --lookup and a one-depth star tree, "
        "the fast stream's top-1 token is looked up in turn and its continuation verified "
        "under it in the same block)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="carry on from --out's journal (FILE.partial.jsonl) of an interrupted run of the same "
        "command: finished items are taken from it, the rest are run",
    )
    p.add_argument(
        "--ref-ar",
        action="store_true",
        help="with the CPU kernels on: also time the plain AR loop through XLA's own dot and attention "
        "on every prompt (speedup_vs_ref_ar; whether its greedy output equals the kernels' AR)",
    )
    p.add_argument("--no-progress", action="store_true")
    from m2r2_jax.decoding.peer_drafters.options import KNOBS, add_drafter_args, draft_options

    add_drafter_args(p)
    a = p.parse_args(argv)
    quiet_env()

    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.spec_eval import SpecEvalConfig

    if a.out is None:
        name = Path(a.dataset).stem if Path(a.dataset).suffix else a.dataset.replace("/", "_").replace(":", "_")
        out = Path("runs") / "speculative" / f"{name}.json"
    else:
        out = Path(a.out)
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    journal = out.with_suffix(".partial.jsonl")
    if journal.exists() and not a.resume:
        raise M2R2Error(f"{journal} holds an interrupted run: pass --resume to carry on from it, or delete it")
    for f, what, given in ((out, "--out", a.out), (plot, "--plot", a.plot or a.out)):
        if given is not None and not f.parent.is_dir():
            raise M2R2Error(f"{what}: directory {f.parent} does not exist")
        if f.is_dir():
            raise M2R2Error(f"{what}: {f} is a directory")
    if a.mesh:
        raise M2R2Error("--mesh is not supported by the speculative decoder (single device)")
    if a.limit is not None and a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if a.hf_baselines and (a.temperature > 0 or a.batch_size != 1):
        raise M2R2Error("--hf-baselines needs greedy decoding (--temperature 0) and --batch-size 1")
    # every decoding option is validated here, before anything is loaded or written
    ec = SpecEvalConfig(
        draft=draft_options(
            a.drafter,
            tree=a.tree,
            draft_layers=a.draft_layers,
            lookup=a.lookup,
            lookup_ngram=a.lookup_ngram,
            lookup_min_ngram=None if a.lookup_ngram is None else min(2, a.lookup_ngram),
            lookup_extend=False if a.no_lookup_extend else None,
            draft_stop=a.draft_stop,
            draft_dtype=a.draft_dtype,
            **{k.dest: getattr(a, k.dest) for k in KNOBS},
        ),
        max_new_tokens=a.max_new_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        seed=a.seed,
        batch_size=a.batch_size,
        ar_block=a.ar_block,
    )

    from m2r2_jax.data.eval_sets import load_eval_set
    from m2r2_jax.evaluation.plots import render_png
    from m2r2_jax.evaluation.spec_eval import M2R2Bundle, machine_info, run_spec_eval
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.checkpoint import load_m2r2, resolve_checkpoint_dir

    opts = ec.draft
    if a.checkpoint and not opts.needs_m2r2:
        raise M2R2Error(f"--checkpoint applies to --drafter m2r2, not --drafter {opts.name}")
    items = load_eval_set(a.dataset, limit=a.limit)
    ckpt = None
    if opts.needs_m2r2:
        ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
        resolve_checkpoint_dir(ckpt)  # fail before loading the model
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype)
    bundle, mc, meta = None, None, {}
    if opts.needs_m2r2:
        mc, m2r2, draft_ids, meta = load_m2r2(ckpt, m.cfg, m.params, a.model, base_fingerprint=m.fingerprint)
        bundle = M2R2Bundle(mc, m2r2, draft_ids, meta)
    backend, params = decode_setup(m, a.cpu_kernel)
    if a.ref_ar and not backend.kernels:
        raise M2R2Error("--ref-ar compares the CPU kernels' AR with XLA's: it needs the kernels on (--cpu-kernel)")
    hf_ref = None
    if a.hf_baselines:
        from m2r2_jax.evaluation.hf_reference import hf_reference_model

        hf_ref = hf_reference_model(m)
    if a.resume and journal.exists():
        print(f"resuming from {journal}", file=sys.stderr)
    res = run_spec_eval(
        m,
        bundle,
        items,
        ec,
        backend=backend,
        decode_params=params,
        ref_ar_params=m.params if a.ref_ar else None,
        hf_ref=hf_ref,
        journal=journal,
        resume=a.resume,
        progress=not a.no_progress,
        journal_key=dict(
            model=a.model,
            checkpoint=str(Path(ckpt).resolve()) if ckpt else None,
            dataset=a.dataset,
            limit=a.limit,
            dtype=a.dtype,
            param_dtype=a.param_dtype,
            matmul_dtype=a.matmul_dtype,
        ),
    )
    res["config"].update(
        model=a.model,
        checkpoint=ckpt,
        train_step=meta.get("step"),
        dataset=a.dataset,
        limit=a.limit,
        dtype=m.cfg.dtype,
        rate=mc.rate if mc else None,
        num_fast_layers=mc.n_fast(m.cfg.num_layers) if mc else None,
        cpu_kernel=backend.kernels,
    )
    res["machine"] = machine_info()
    what = f"tree {opts.tree.name}" if opts.name == "m2r2" else f"drafter {opts.name}"
    png = render_png(res, title=f"{a.model} on {a.dataset}: {what}, T={a.temperature}, B={a.batch_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    plot.write_bytes(png)
    journal.unlink(missing_ok=True)
    print(format_table(res))
    sp = res["overall_speedup"]
    print(
        f"overall: speedup {_f(sp)}x (spec tok/s / AR tok/s = total AR time / total spec time when greedy; "
        f"compile excluded), tau {_f(res['tau'])}, "
        f"lossless {_yn(res['lossless'])}, {res['prompts']} prompts; compile {res['compile_seconds']['ar']:.1f}s AR "
        f"+ {res['compile_seconds']['spec']:.1f}s spec"
    )
    c = res["cost"]
    if res.get("speedup_vs_ref_ar"):
        print(
            f"AR through XLA's dot/attention (no CPU kernels), same prompts: the kernels' AR is "
            f"{_f(res['ref_ar_speedup'])}x it, speculative {_f(res['speedup_vs_ref_ar'])}x it; same greedy "
            f"output: {_yn(res['ref_ar_equal'])}"
        )
    if res.get("speedup_vs_block1_ar"):
        print(
            f"AR decoded in blocks of {res['ar_block']}; speed-up over the one-slot AR loop: "
            f"{_f(res['speedup_vs_block1_ar'])}x"
        )
    print(
        f"cost per speculative step: {_f(c['spec_ms_per_step'], '.1f')} ms = draft {_f(c['draft_ms'], '.1f')} + "
        f"verify {_f(c['verify_ms'], '.1f')} + other {_f(c['other_ms'], '.1f')} ms; one AR token "
        f"{_f(c['ar_ms_per_token'], '.1f')} ms"
    )
    if c.get("draft_passes_per_step") is not None and c.get("draft_passes_full"):
        print(
            f"M2R2 fast-stream passes per M2R2-drafted step: {_f(c['draft_passes_per_step'])} of "
            f"{c['draft_passes_full']} (a full draft: {_f(c['draft_ms_full'], '.1f')} ms)"
        )
    if res.get("lookup"):
        lk = res["lookup"]
        print(
            f"prompt lookup drafted {_f(100 * (lk['share_of_steps'] or 0), '.0f')}% of the steps (tau there "
            f"{_f(lk['tau'])}; M2R2-drafted steps: tau {_f(lk['tau_m2r2'])})"
        )
        if lk.get("extend"):
            print(
                f"lookup extension of M2R2 drafts on {_f(100 * (lk['ext_share_of_steps'] or 0), '.0f')}% of the "
                f"steps (tau there {_f(lk['tau_ext'])}; plain M2R2 steps: tau {_f(lk['tau_m2r2_plain'])})"
            )
    if res.get("hf"):
        h = res["hf"]
        print(
            f"\nsame prompts, same run ({h['prompts']} prompts; HF greedy == ours on every prompt: "
            f"{_yn(h['hf_greedy_equals_ours'])}):"
        )
        for k, v in h["tokens_per_second"].items():
            print(f"  {k:<18} {_f(v, '.1f'):>7} tok/s   {_f(h['speedup_vs_hf_greedy'][k])}x HF greedy")
    print(f"wrote {out} and {plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
