"""Prefill of one prompt through `decoding.generate.prefill` with the CPU kernels, by chunk size:
`--chunk` = the bucket is one block (the pre-session-13 prefill); smaller chunks stop after the
chunk holding the prompt's last token. Also checks that every chunking gives the same logits and
cache bit for bit.

    python scripts/bench_prefill.py [--bucket 256] [--length 180] [--chunks 256,64,32] [--reps 5]"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--bucket", type=int, default=256)
    p.add_argument("--length", type=int, default=180)
    p.add_argument("--chunks", default="256,64,32")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2r2_jax.backend import resolve
    from m2r2_jax.decoding import generate as G
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.model import decoder as D

    m = load_model(a.model, tokenizer=False)
    cfg = m.cfg
    backend = resolve(cfg, "auto")
    params = backend.prepare(cfg, m.params)
    toks = jnp.asarray(np.random.RandomState(0).randint(3, 4000, (1, a.bucket)), jnp.int32)
    lens = jnp.asarray([a.length], jnp.int32)
    res, fns = {}, {}
    for c in (int(x) for x in a.chunks.split(",")):
        fns[c] = jax.jit(
            lambda p, t, l, c=c: G.prefill(cfg, p, t, l, D.init_cache(cfg, 1, a.bucket + 128), chunk=c, backend=backend)
        )
        lg, cache = fns[c](params, toks, lens)
        res[c] = (np.asarray(lg), np.asarray(cache.k[5][0, :, : a.length]))
    ts = {c: [] for c in fns}
    for _ in range(a.reps):
        for c, f in fns.items():
            t0 = time.perf_counter()
            f(params, toks, lens)[0].block_until_ready()
            ts[c].append(time.perf_counter() - t0)
    first = next(iter(res.values()))
    for c in fns:
        same = np.array_equal(res[c][0], first[0]) and np.array_equal(res[c][1], first[1])
        print(
            f"chunk {c}: {1e3 * statistics.median(ts[c]):.1f} ms for a {a.length}-token prompt in the "
            f"{a.bucket} bucket; same logits and cache as chunk {next(iter(res))}: {same}"
        )


if __name__ == "__main__":
    main()
