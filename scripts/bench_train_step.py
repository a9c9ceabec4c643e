"""Cost of the M2R2 loss (forward, and forward + gradient) on SmolLM2 for one random 8 x 256 batch,
with the fast stream on all positions (train_positions=0) and on the first 160 answer positions
per row (train_positions=160), in one process.

    python scripts/bench_train_step.py [--positions 160]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/smollm2_r3.yaml")
    p.add_argument("--positions", type=int, default=160)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.m2r2.losses import m2r2_loss
    from m2r2_jax.m2r2.params import init_m2r2
    from m2r2_jax.training.config import load_train_config

    tc = load_train_config(a.config)
    m = load_model(tc.model)
    cfg, base = m.cfg, m.params
    mc = tc.m2r2.validate(cfg.num_layers)
    m2 = init_m2r2(cfg, mc, jax.random.key(0))
    rs = np.random.RandomState(0)
    B, T = tc.batch_size, tc.seq_len
    toks = jnp.asarray(rs.randint(3, cfg.vocab_size, (B, T)), jnp.int32)
    mask = np.zeros((B, T), np.float32)
    mask[:, T // 3: T // 3 + min(a.positions, T - T // 3)] = 1
    mask = jnp.asarray(mask)
    dids = jnp.arange(mc.draft_vocab + 1, dtype=jnp.int32)

    def timeit(f, *args):
        jax.block_until_ready(f(*args))
        t = time.perf_counter()
        for _ in range(a.repeats):
            jax.block_until_ready(f(*args))
        return (time.perf_counter() - t) / a.repeats

    for tp in (a.positions, 0):
        mcx = dataclasses.replace(mc, train_positions=tp)
        loss = lambda p_, b, t, mk, d: m2r2_loss(p_, b, t, mk, d, cfg, mcx)[0]  # noqa: E731
        fwd = timeit(jax.jit(loss), m2, base, toks, mask, dids)
        grad = timeit(jax.jit(jax.grad(loss)), m2, base, toks, mask, dids)
        print(f"train_positions={tp}: loss forward {fwd:.2f} s, forward + gradient {grad:.2f} s")


if __name__ == "__main__":
    main()
