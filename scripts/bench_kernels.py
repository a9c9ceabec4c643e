"""One full-model forward over a block of T tokens, inside a jitted loop (the KV cache updated in place,
as in the decode loops), through XLA's own dot and attention vs the CPU kernels (m2r2_jax/kernels);
the variants interleaved rep by rep so machine noise hits them alike.

    python scripts/bench_kernels.py [--model smollm2-135m] [--ts 1,2,3,5,8] [--reps 7] [--steps 48] [--json]

T = 1 is a plain AR step; T = k + 1 is the verification of a k-token draft (a chain, a star, or prompt
lookup's candidates). Reported: ms per forward and each T relative to the same variant's T = 1."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--ts", default="1,2,3,5,8")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=48, help="forwards per timed call")
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--fill", type=int, default=300, help="cached slots before the first block")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    from jax import lax

    from m2r2_jax import kernels as K
    from m2r2_jax.backend import CPU_KERNELS, XLA
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.model import decoder as D

    m = load_model(a.model, tokenizer=False)
    cfg = m.cfg
    variants = {"xla": (XLA, m.params)}
    if K.wanted(cfg):
        variants["kernels"] = (CPU_KERNELS, CPU_KERNELS.prepare(cfg, m.params))
    Ts = [int(t) for t in a.ts.split(",")]

    def make(T, backend):
        def f(params):
            def body(i, carry):
                cache, prev = carry
                toks = jnp.full((1, T), 3, jnp.int32) + i % 7 + prev  # depends on the last step's argmax
                logits, cache = D.forward(
                    cfg, params, toks, cache, jnp.full((1,), a.fill, jnp.int32) + i, backend=backend
                )
                return cache, jnp.argmax(logits[0, -1]).astype(jnp.int32) % 2

            return lax.fori_loop(0, a.steps, body, (D.init_cache(cfg, 1, a.cache_len), jnp.int32(0)))[1]

        return jax.jit(f)

    fns = {(v, T): make(T, variants[v][0]) for v in variants for T in Ts}
    for (v, _), f in fns.items():
        jax.block_until_ready(f(variants[v][1]))  # compile
    ts = {k: [] for k in fns}
    for _ in range(a.reps):
        for (v, T), f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(variants[v][1]))
            ts[(v, T)].append((time.perf_counter() - t0) * 1e3 / a.steps)
    res = {}
    for v in variants:
        base = statistics.median(ts[(v, Ts[0])])
        res[v] = {
            str(T): {"ms": statistics.median(ts[(v, T)]), "vs_T1": statistics.median(ts[(v, T)]) / base} for T in Ts
        }
    if a.json:
        print(json.dumps(res))
    else:
        for v, r in res.items():
            print(v.ljust(8), "  ".join(f"T={T}: {x['ms']:.1f} ms ({x['vs_T1']:.2f}x)" for T, x in r.items()))


if __name__ == "__main__":
    main()
