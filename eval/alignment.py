"""Per-fast-layer alignment of the M2R2 fast stream with the full model, next
to the base's plain early exit at the same depth.

    python -m eval.alignment --model smollm2-135m [--checkpoint DIR] --dataset PATH [--json]

The base first answers each prompt greedily (chat template); agreement is then
measured teacher-forced on those answer tokens.
"""

from __future__ import annotations

import argparse
import json

from m2r2_jax.cli import add_model_args, quiet_env, run_main

DEFAULT_CHECKPOINT = "m2r2_jax/assets/smollm2-135m-r3"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.alignment", description=__doc__.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--checkpoint", default=None, help=f"M2R2 checkpoint (default: the shipped {DEFAULT_CHECKPOINT})")
    p.add_argument(
        "--dataset",
        default=None,
        help="prompts: a .json/.jsonl file or dir (any supported format) or a hub dataset name "
        "(default: MT-Bench first turns from the shared data dir)",
    )
    p.add_argument("--limit", type=int, default=48, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    quiet_env()
    from m2r2_jax.errors import M2R2Error

    for flag, v, lo in (
        ("--limit", a.limit, 1),
        ("--max-new-tokens", a.max_new_tokens, 1),
        ("--seq-len", a.seq_len, 2),
    ):
        if v < lo:
            raise M2R2Error(f"{flag} must be >= {lo}, got {v}")

    from pathlib import Path

    from m2r2_jax.data import data_root
    from m2r2_jax.data.prompts import load_prompts
    from m2r2_jax.decoding.generate import GenerateConfig, Generator
    from m2r2_jax.evaluation.alignment import draft_weight_fraction, evaluate_alignment
    from m2r2_jax.evaluation.spec_eval import machine_info
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.loading.tokenizer import encode_prompt
    from m2r2_jax.training.checkpoint import load_m2r2

    ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
    dataset = a.dataset or str(data_root() / "mt_bench" / "question.jsonl")
    m = load_model(a.model)
    mc, m2r2, draft_ids, meta = load_m2r2(ckpt, m.cfg, m.params, a.model, base_fingerprint=m.fingerprint)
    prompts = load_prompts([dataset], limit=None, exclude_eval=False, shuffle=False)[: a.limit]
    ids = [encode_prompt(m.tokenizer, t, chat=True) for t in prompts]
    gen = Generator(m.cfg)
    records = []
    for i in range(0, len(ids), 8):
        chunk = ids[i : i + 8]
        res = gen.generate(m.params, chunk, GenerateConfig(max_new_tokens=a.max_new_tokens))
        records += [{"prompt_ids": p_, "answer_ids": r_} for p_, r_ in zip(chunk, res.new_ids)]
    out = evaluate_alignment(m.cfg, m.params, mc, m2r2, draft_ids, records, seq_len=a.seq_len)
    for r, f in zip(out["layers"], draft_weight_fraction(m.cfg, mc, m.params, m2r2, len(draft_ids))):
        r["draft_weight_fraction"] = f
    out.update(
        {
            "model": a.model,
            "checkpoint": ckpt,
            "dataset": dataset,
            "prompts": len(prompts),
            "rate": mc.rate,
            "num_fast_layers": mc.n_fast(m.cfg.num_layers),
            "layer_map": mc.layer_map,
            "train_step": meta.get("step"),
        }
    )
    out["machine"] = machine_info()
    if a.json:
        print(json.dumps(out))
    else:
        print(
            f"{'fast':>4} {'target':>6} {'agree':>7} {'draft':>7} {'exit@same':>9} {'exit@target':>11} {'KL':>7}"
            f" {'cost':>6}"
        )
        for r in out["layers"]:
            print(
                f"{r['fast_layer']:>4} {r['target_layer']:>6} {r['agreement']:7.3f} {r['draft_vocab_agreement']:7.3f}"
                f" {r['baseline_agreement']:9.3f} {r['target_layer_exit_agreement']:11.3f} {r['kl']:7.3f}"
                f" {r['draft_weight_fraction']:6.3f}"
            )
        print(
            "cost: weights one draft through that depth reads (base layers + adapters + draft head), "
            "relative to a full decode step"
        )
        print(f"final_agreement {out['final_agreement']:.3f} on {int(out['tokens'])} answer tokens")
    return 0


if __name__ == "__main__":
    run_main(main)
