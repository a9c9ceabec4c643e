"""Cost of one full-model forward over a block of T tokens (cache 512, 256 slots filled), f32 vs bf16
weights + bf16 matmuls (f32 activations), T = 1..N, the two dtypes interleaved rep by rep.

    python scripts/bench_block_cost.py [--max-t 8] [--reps 30] [--json]

A one-slot AR step is T = 1; an AR step through blocks of T slots (GenerateConfig.block) and the
verification of a T-node chain are both T. On CPUs with AMX / AVX512-BF16 the bf16 block cost is
nearly flat in T, the f32 one is not."""

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
    p.add_argument("--max-t", type=int, default=8)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.model import decoder as D

    Ts = [t for t in (1, 2, 3, 4, 6, 8, 12, 16, 32) if t <= a.max_t]
    fns = {}
    for name, pd, mm in (("float32", None, None), ("bf16", "bfloat16", "bfloat16")):
        m = load_model(a.model, param_dtype=pd, matmul_dtype=mm, tokenizer=False)
        fwd = jax.jit(lambda p, t, c, s, cfg=m.cfg: jnp.argmax(D.forward(cfg, p, t, c, s)[0][:, 0], -1))
        for T in Ts:
            cache = D.init_cache(m.cfg, 1, 512)
            args = (m.params, jnp.asarray(np.arange(T)[None] + 10, jnp.int32), cache, jnp.full((1,), 256, jnp.int32))
            jax.block_until_ready(fwd(*args))  # compile
            fns[(name, T)] = (fwd, args)
    ts = {k: [] for k in fns}
    for _ in range(a.reps):
        for k, (f, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts[k].append(time.perf_counter() - t0)
    base = 1e3 * statistics.median(ts[("float32", 1)])
    res = {
        f"{n}/T={T}": {"ms": 1e3 * statistics.median(v), "vs_f32_T1": 1e3 * statistics.median(v) / base}
        for (n, T), v in ts.items()
    }
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:14s} {v['ms']:7.2f} ms  {v['vs_f32_T1']:.2f} x f32 T=1")


if __name__ == "__main__":
    main()
