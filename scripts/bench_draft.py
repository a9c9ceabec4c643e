"""Cost of one draft depth (chain1: the fast stream on one token + the draft head) with the
adapters applied as separate low-rank matmuls vs merged into the layer weights (what the
decoder uses), next to one verification of 2 tokens and one plain decode step, all in one
process over the same cache. Also checks that both forms draft the same tokens.

    python scripts/bench_draft.py [--checkpoint DIR] [--fill 256] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    p.add_argument("--fill", type=int, default=256, help="cache positions already filled")
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from eval.alignment import DEFAULT_CHECKPOINT
    from m2r2_jax.decoding.speculative import _draft, _verify
    from m2r2_jax.decoding.trees import chain
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.m2r2 import stream as S
    from m2r2_jax.model import decoder as D
    from m2r2_jax.training.checkpoint import load_m2r2

    m = load_model(a.model)
    cfg, base = m.cfg, m.params
    ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
    mc, m2, dids, _ = load_m2r2(ckpt, cfg, base, a.model)
    dids = jnp.asarray(dids, jnp.int32)
    tree = chain(1)
    n = mc.n_fast(cfg.num_layers)

    # a cache filled with the model's own K/V for a real prefix
    rs = np.random.RandomState(0)
    prefix = jnp.asarray(rs.randint(3, cfg.vocab_size, (1, a.fill)), jnp.int32)
    cache = D.init_cache(cfg, 1, a.cache_len)
    _, cache = D.forward(cfg, base, prefix, cache, jnp.zeros(1, jnp.int32))
    pos = jnp.full((1,), a.fill, jnp.int32)

    merged = jax.jit(lambda b, q, d: S.draft_params(cfg, mc, b, q, d))(base, m2, dids)
    layers = mc.base_layers(cfg.num_layers)
    plain = {
        "layers": [base["layers"][j] for j in layers],
        "final_norm": base["final_norm"],
        "head": S.draft_head(cfg, base, dids),
    }
    draft = jax.jit(lambda b, q, d, c, p_, t, ad: _draft(cfg, mc, tree, b, q, d, c, p_, t, ad))
    verify = jax.jit(lambda b, t, c, p_: _verify(cfg, tree, b, t, c, p_)[0])
    step = jax.jit(lambda b, t, c, p_: D.forward(cfg, b, t, c, p_)[0])

    def med(fn):
        jax.block_until_ready(fn())
        ts = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            ts.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(ts))

    curs = [jnp.asarray([int(t)], jnp.int32) for t in rs.randint(3, cfg.vocab_size, 16)]
    same = sum(
        int(draft(base, merged, dids, cache, pos, c, None)[0, 1])
        == int(draft(base, plain, dids, cache, pos, c, m2["fast"])[0, 1])
        for c in curs
    )
    cur = curs[0]
    r = {
        "ar_step_ms": med(lambda: step(base, cur[:, None], cache, pos)),
        "draft_adapters_ms": med(lambda: draft(base, plain, dids, cache, pos, cur, m2["fast"])),
        "draft_merged_ms": med(lambda: draft(base, merged, dids, cache, pos, cur, None)),
        "verify2_ms": med(lambda: verify(base, jnp.stack([cur, cur], 1), cache, pos)),
        "same_draft_token": f"{same}/{len(curs)}",
        "fill": a.fill,
        "cache_len": a.cache_len,
        "repeats": a.repeats,
        "fast_layers": n,
        "draft_vocab": int(dids.shape[0]),
    }
    for k in ("draft_adapters_ms", "draft_merged_ms", "verify2_ms"):
        r[k.replace("_ms", "_steps")] = round(r[k] / r["ar_step_ms"], 3)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
