"""Pick Draft & Verify's skipped layers greedily by measured acceptance on calibration prompts.

    python -m eval.search_skip --model smollm2-135m [--dataset builtin] [--prompts 8] [--skip 8] \
        [--candidates 1-28] [--max-draft 5] [--threshold 0] [--max-new-tokens 32] [--out FILE.json]

Each round adds the layer whose skipping (with those chosen before) gives the highest tau (greedy
speculative decoding of the first user turns of --prompts items, batched); --skip rounds. One compiled
loop serves every candidate set (the set is data there). Draft & Verify searches with Bayesian
optimisation over attention and MLP sublayers; this is a greedy search over whole layers. The JSON
written ({"skip": [...], "tau": ..., "history": [...]}) is what `eval.speculative --drafter
draft_verify --skip-layers FILE.json` reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2r2_jax.cli import add_model_args, quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.search_skip", description=__doc__.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--dataset", default="builtin", help="calibration prompts: an eval set (see eval.speculative)")
    p.add_argument("--prompts", type=int, default=8, help="calibration items (their first turns, one batch)")
    p.add_argument("--skip", type=int, default=8, help="how many layers to skip (search rounds)")
    p.add_argument(
        "--candidates", default=None, help="layers that may be skipped (default: all but the first and last)"
    )
    p.add_argument("--max-draft", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.0, help="confidence stop while searching (0 = off)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    quiet_env()

    from m2r2_jax.cli import check_number
    from m2r2_jax.decoding.peer_drafters.draft_verify import check_knobs, search_skip
    from m2r2_jax.errors import M2R2Error

    check_number("--prompts", a.prompts, lo=1, integer=True)
    check_number("--skip", a.skip, lo=1, integer=True)
    check_number("--max-new-tokens", a.max_new_tokens, lo=1, integer=True)
    check_knobs(a.max_draft, a.threshold)
    if a.mesh:
        raise M2R2Error("--mesh is not supported by the speculative decoder (single device)")
    if a.out and not Path(a.out).parent.is_dir():
        raise M2R2Error(f"--out: directory {Path(a.out).parent} does not exist")

    from m2r2_jax.data.eval_sets import load_eval_set
    from m2r2_jax.decoding.peer_drafters.draft_verify import parse_layers
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.loading.tokenizer import encode_chat

    items = load_eval_set(a.dataset, limit=a.prompts)
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype)
    cand = None if a.candidates is None else parse_layers(a.candidates, m.cfg.num_layers)
    prompts = [encode_chat(m.tokenizer, [{"role": "user", "content": it.turns[0]}]) for it in items]

    def show(h):
        print(f"skip {h['skip']}: tau {h['tau']:.3f}", file=sys.stderr, flush=True)

    res = search_skip(
        m.cfg,
        m.params,
        prompts,
        a.skip,
        k=a.max_draft,
        threshold=a.threshold,
        candidates=cand,
        max_new_tokens=a.max_new_tokens,
        progress=show,
    )
    res.update(model=a.model, dataset=a.dataset, prompts=len(prompts), max_draft=a.max_draft)
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text)
    print(json.dumps({"skip": res["skip"], "tau": res["tau"]}))
    return 0


if __name__ == "__main__":
    run_main(main)
