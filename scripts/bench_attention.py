"""The CPU block-attention kernel alone: 30 layers' attention for a block of T queries per call
(SmolLM2's 9 heads / 3 KV heads, head_dim 64) over a prefix of `--fill` cache slots plus the block's
own K/V (causal), inside a jitted loop; the cache stays resident, so this is the kernel's compute,
not the memory reads of a real decode step.

    python scripts/bench_attention.py [--ts 1,5,8,17] [--fill 300] [--reps 7]

Run it at an older commit (e.g. 8998fd1, the per-query kernel) to compare kernels."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ts", default="1,5,8,17")
    p.add_argument("--fill", type=int, default=300)
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from m2r2_jax import kernels as K

    if not K.available():
        sys.exit("the CPU kernels are unavailable here")
    rs = np.random.RandomState(0)
    S, layers = a.cache_len, 30
    kc = [jnp.asarray(rs.randn(1, 3, S, 64).astype(np.float32)) for _ in range(layers)]
    vc = [jnp.asarray(rs.randn(1, 3, S, 64).astype(np.float32)) for _ in range(layers)]

    def make(T):
        def f(kc, vc):
            def body(i, acc):
                q = jnp.ones((1, T, 9, 64), jnp.float32) * (acc * 1e-9 + 0.1)
                kl = jnp.ones((1, 3, T, 64), jnp.float32) * 0.1
                s = 0.0
                for l in range(layers):
                    o = K.block_attention(
                        q, kc[l], vc[l], jnp.full((1,), a.fill, jnp.int32), kl, kl, jnp.tril(jnp.ones((T, T), bool))
                    )
                    s = s + o[0, 0, 0]
                return acc + s

            return lax.fori_loop(0, a.steps, body, jnp.float32(0))

        return jax.jit(f)

    Ts = [int(t) for t in a.ts.split(",")]
    fns = {T: make(T) for T in Ts}
    for f in fns.values():
        f(kc, vc).block_until_ready()
    ts = {T: [] for T in Ts}
    for _ in range(a.reps):
        for T, f in fns.items():
            t0 = time.perf_counter()
            f(kc, vc).block_until_ready()
            ts[T].append((time.perf_counter() - t0) * 1e3 / a.steps)
    print("  ".join(f"T={T}: {statistics.median(ts[T]):.2f} ms" for T in Ts), "(30 layers per forward)")


if __name__ == "__main__":
    main()
