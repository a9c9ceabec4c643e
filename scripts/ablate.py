"""Equal-budget ablations for docs/method.md: short training runs from the same
self-distilled data, each evaluated with the alignment eval on the same
held-out prompts (MT-Bench first turns; the base's own greedy answers).

    python scripts/ablate.py --config configs/smollm2_r3.yaml --steps 25 --out docs/ablations.json \
        [--only base,prefix,...] [key=value ...]

Results are appended per ablation as they finish (a rerun skips finished ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ABLATIONS = {
    "base": [],  # the config given (--config)
    "strided_r3": ["m2r2.layer_map=strided"],  # fast layer l runs base layer t(l)-1 (last of its group)
    "prefix": ["m2r2.layer_map=prefix"],  # fast layer l runs base layer l-1
    "skip": ["m2r2.layer_map=skip"],  # fast layer l runs base layer t(l-1) (first of its group)
    "skip_prompt": ["m2r2.layer_map=skip", "data.loss_on_prompt=true"],
    "prefix_prompt": ["m2r2.layer_map=prefix", "data.loss_on_prompt=true"],
    "r2_L15": ["m2r2.rate=2"],  # rate 2: 15 fast layers
    "L8": ["m2r2.num_fast_layers=8"],  # with the config's map
    "L5": ["m2r2.num_fast_layers=5"],
    "prefix_L8": ["m2r2.layer_map=prefix", "m2r2.num_fast_layers=8"],  # the prefix map at L8 / L5
    "prefix_L5": ["m2r2.layer_map=prefix", "m2r2.num_fast_layers=5"],
    "kd_only": ["m2r2.align_weight=0.0", "m2r2.align_final_weight=0.0"],
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/smollm2_r3.yaml")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="docs/ablations.json")
    p.add_argument("--only", default=None)
    p.add_argument("--eval-prompts", type=int, default=24)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()

    import jax

    from m2r2_jax.cli import encode_prompt
    from m2r2_jax.data.prompts import data_root, load_prompts
    from m2r2_jax.decoding.generate import GenerateConfig, Generator
    from m2r2_jax.evaluation.alignment import evaluate_alignment
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.config import load_train_config
    from m2r2_jax.training.trainer import distilled_records, train

    out = Path(a.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    base_tc = load_train_config(a.config, a.overrides)
    model = load_model(base_tc.model)
    records = distilled_records(base_tc, model)
    prompts = load_prompts([str(data_root() / "mt_bench" / "question.jsonl")], exclude_eval=False, shuffle=False)[
        : a.eval_prompts
    ]
    ids = [encode_prompt(model.tokenizer, t, chat=True) for t in prompts]
    gen = Generator(model.cfg)
    eval_recs = []
    for i in range(0, len(ids), 8):
        r = gen.generate(model.params, ids[i : i + 8], GenerateConfig(max_new_tokens=160))
        eval_recs += [{"prompt_ids": x, "answer_ids": y} for x, y in zip(ids[i : i + 8], r.new_ids)]
    names = a.only.split(",") if a.only else list(ABLATIONS)
    for name in names:
        if name in results:
            print(f"skip {name} (done)")
            continue
        tc = load_train_config(
            a.config,
            list(a.overrides)
            + ABLATIONS[name]
            + [
                f"steps={a.steps}",
                f"warmup_steps={max(1, a.steps // 5)}",
                f"out_dir=runs/ablate/{name}_s{a.steps}",
                f"save_every={a.steps}",
                "data.teacher_cache_dir=",
            ],
        )  # short runs: a per-map teacher cache would not pay for itself
        t0 = time.time()
        r = train(tc, model=model, records=records, progress=True)
        train_s = time.time() - t0
        mc = tc.m2r2.validate(model.cfg.num_layers)
        ev = evaluate_alignment(model.cfg, model.params, mc, r.m2r2, r.draft_ids, eval_recs, seq_len=320)
        results[name] = {
            "overrides": list(a.overrides) + ABLATIONS[name],
            "steps": a.steps,
            "train_seconds": train_s,
            "train_tokens_per_second": float(sum(float(h["tokens"]) for h in r.history) / train_s),
            "final_train_loss": float(r.history[-1]["loss"]),
            "m2r2": dataclasses.asdict(mc),
            "eval": ev,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=float))
        print(
            f"{name}: final_agreement {ev['final_agreement']:.3f} (draft vocab "
            f"{ev['final_draft_vocab_agreement']:.3f}) in {train_s:.0f}s",
            flush=True,
        )
        jax.clear_caches()


if __name__ == "__main__":
    main()
