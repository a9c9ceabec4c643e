"""A MoEfied model's quality against its dense base: teacher-forced top-1 agreement and KL on the dense
model's greedy answers, and ROUGE-L of the MoE's own greedy text against the dense model's.

    python -m eval.moe_quality --dense smollm2-135m --settings smollm2-135m-moe:2,smollm2-135m-moe:4 \
        [--dataset mt_bench] [--limit 32] [--rouge-prompts 16] [--rouge-new-tokens 64] [--out FILE]

A setting is ASSET[:TOP_K]: an asset name under m2r2_jax/assets or a directory (train.moefy's DIR/asset),
and the experts per token (default: the asset's). Evaluation prompts only measure, never fit.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from m2r2_jax.cli import quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.moe_quality", description=__doc__.split("\n")[0])
    p.add_argument("--dense", default="smollm2-135m", help="the dense base the assets were made from")
    p.add_argument("--settings", required=True, help="comma-separated ASSET[:TOP_K]")
    p.add_argument("--dataset", default="mt_bench", help="an eval set (data/eval_sets.py); first turns")
    p.add_argument("--limit", type=int, default=32, help="the set's first N prompts (teacher-forced agreement)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="the dense answers agreement is measured on")
    p.add_argument("--rouge-prompts", type=int, default=16, help="the first N of those prompts for ROUGE-L")
    p.add_argument("--rouge-new-tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="write the JSON here (always printed)")
    a = p.parse_args(argv)
    quiet_env()
    from m2r2_jax.errors import M2R2Error

    settings = []
    for s in (x.strip() for x in a.settings.split(",") if x.strip()):
        asset, sep, k = s.rpartition(":")
        if not sep or not k.isdigit():
            asset, k = s, ""
        settings.append((asset, int(k) if k else None))
    if not settings or min(a.limit, a.rouge_prompts, a.max_new_tokens, a.rouge_new_tokens) < 1:
        raise M2R2Error("need at least one setting, and --limit / --rouge-prompts / token counts >= 1")

    from m2r2_jax.data.eval_sets import load_eval_set
    from m2r2_jax.evaluation.moe_quality import compare, greedy_answers
    from m2r2_jax.loading.moefied import asset_path, load_moefied, read_moe_meta
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.loading.tokenizer import encode_prompt

    t0 = time.perf_counter()
    dense = load_model(a.dense)
    items = load_eval_set(a.dataset)[: a.limit]  # the file's first N, not a category-balanced pick
    ids = [encode_prompt(dense.tokenizer, it.turns[0], chat=True) for it in items]
    answers = greedy_answers(dense.cfg, dense.params, ids, a.max_new_tokens)
    records = [{"prompt_ids": p_, "answer_ids": r_} for p_, r_ in zip(ids, answers)]
    seq_len = -(-max(len(p_) + len(r_) for p_, r_ in zip(ids, answers)) // 64) * 64
    rouge_ids = ids[: a.rouge_prompts]
    refs = greedy_answers(dense.cfg, dense.params, rouge_ids, a.rouge_new_tokens)
    rows = []
    for asset, k in settings:
        moe = load_moefied(a.dense, asset, top_k=k)
        r = compare(dense, moe, records, rouge_ids, refs, dense.tokenizer, a.rouge_new_tokens, seq_len)
        build = read_moe_meta(asset_path(asset)).get("build", {})
        rows.append({"asset": asset, "experts": moe.cfg.num_experts, "top_k": moe.cfg.experts_per_token, **r})
        rows[-1]["build"] = build  # how the asset was made (train.moefy flags)
        print(json.dumps({k_: v for k_, v in rows[-1].items() if k_ != "samples"}), file=sys.stderr, flush=True)
    out = {
        "command": "python -m eval.moe_quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "dense": a.dense,
        "dense_fingerprint": dense.fingerprint,
        "dataset": a.dataset,
        "prompts": len(items),
        "answer_tokens": sum(len(r_) for r_ in answers),
        "rouge_prompts": len(rouge_ids),
        "rouge_new_tokens": a.rouge_new_tokens,
        "settings": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(out, indent=1)
    if a.out:
        from pathlib import Path

        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    run_main(main)
