"""Cost of the M2R2 loss (forward, and forward + gradient) on SmolLM2 for one random 8 x 256 batch,
in one process: the fast stream on the first 160 answer positions per row (train_positions=160)
with the slow pass in the step, the same with the slow pass read from a teacher cache
(data.teacher_cache_dir: cached states in bf16), the same in mixed precision
(m2r2.train_matmul_dtype=bfloat16: bf16 matmul inputs, f32 accumulation), and the fast stream on
all positions (train_positions=0, slow pass in the step).

    python scripts/bench_train_step.py [--positions 160] [--repeats 2]
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
    from m2r2_jax.m2r2.losses import m2r2_loss, m2r2_loss_cached
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
    mask[:, T // 3 : T // 3 + min(a.positions, T - T // 3)] = 1
    mask = jnp.asarray(mask)
    dids = jnp.arange(mc.draft_vocab + 1, dtype=jnp.int32)

    def timeit(f, *args):
        jax.block_until_ready(f(*args))
        t = time.perf_counter()
        for _ in range(a.repeats):
            jax.block_until_ready(f(*args))
        return (time.perf_counter() - t) / a.repeats

    mc = dataclasses.replace(mc, train_matmul_dtype="")  # f32 unless a variant says otherwise
    mcx = dataclasses.replace(mc, train_positions=a.positions)
    hid = jnp.asarray(rs.randn(B, len(mc.cached_layers(cfg.num_layers)), T, cfg.hidden_size), jnp.bfloat16)
    fin = jnp.asarray(rs.randn(B, a.positions, cfg.hidden_size), jnp.float32)
    variants = [
        (
            f"train_positions={a.positions}, slow pass in the step",
            lambda p_, b, t, mk, d: m2r2_loss(p_, b, t, mk, d, cfg, mcx)[0],
            (),
        ),
        (
            f"train_positions={a.positions}, teacher cache (bf16)",
            lambda p_, b, t, mk, d, h, f: m2r2_loss_cached(p_, b, t, mk, d, h, f, cfg, mcx)[0],
            (hid, fin),
        ),
        (
            f"train_positions={a.positions}, teacher cache, train_matmul_dtype=bfloat16",
            lambda p_, b, t, mk, d, h, f: m2r2_loss_cached(
                p_, b, t, mk, d, h, f, cfg, dataclasses.replace(mcx, train_matmul_dtype="bfloat16")
            )[0],
            (hid, fin),
        ),
        (
            "train_positions=0, slow pass in the step",
            lambda p_, b, t, mk, d: m2r2_loss(p_, b, t, mk, d, cfg, dataclasses.replace(mc, train_positions=0))[0],
            (),
        ),
    ]
    for name, loss, extra in variants:
        fwd = timeit(jax.jit(loss), m2, base, toks, mask, dids, *extra)
        grad = timeit(jax.jit(jax.grad(loss)), m2, base, toks, mask, dids, *extra)
        print(f"{name}: loss forward {fwd:.2f} s, forward + gradient {grad:.2f} s", flush=True)


if __name__ == "__main__":
    main()
