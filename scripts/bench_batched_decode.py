"""Batched greedy decode through `Generator` on XLA (the self-distillation's generator): tokens/s of the
code at a git ref (`--before`, default HEAD: its decoding/generate.py and model/layers.py attention)
against the working tree, in one process, alternating, on the same prompts; then whether the greedy
outputs are equal token for token, with the logit margin where they are not.

Prompts are the distillation's: the training prompts chat-encoded, those up to --max-prompt tokens
sorted by length, and one batch taken at each --at length (the first B prompts at least that long), so
a batch looks like one of build_distill_cache's (same cache length rule, same stop ids). tok/s counts
the answer tokens over the jitted call (prefill included, compile excluded), as the distillation does.

    python scripts/bench_batched_decode.py [--batches 64] [--at 40,100] [--max-new 160] [--reps 2]
    python scripts/bench_batched_decode.py --micro [--cache 384]   # one layer's attention, old vs new

Run under `nice -n 5` with JAX_PLATFORMS=cpu; other jobs on the box make absolute numbers move, so
compare the before/after ratio printed per run."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def module_at(ref: str, path: str, name: str) -> types.ModuleType:
    """The file `path` as it is at git `ref`, imported as module `name` (it imports the working tree)."""
    src = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    mod = types.ModuleType(name)
    mod.__file__ = f"{ref}:{path}"
    sys.modules[name] = mod
    exec(compile(src, mod.__file__, "exec"), mod.__dict__)
    return mod


class Side:
    """A generator and the layers.attend / attend_multi it is traced with."""

    def __init__(self, name, gen_module, attend, attend_multi, cfg):
        self.name, self.G, self.attend, self.attend_multi = name, gen_module, attend, attend_multi
        self.gen = gen_module.Generator(cfg)

    def generate(self, params, prompts, g):
        from m2r2_jax.model import layers as L

        saved = L.attend, L.attend_multi
        L.attend, L.attend_multi = self.attend, self.attend_multi  # read when a new executable is traced
        try:
            return self.gen.generate(params, prompts, g)
        finally:
            L.attend, L.attend_multi = saved


def distill_prompts(model, max_prompt: int, limit: int):
    from m2r2_jax.data.prompts import default_train_sources, load_prompts
    from m2r2_jax.loading.tokenizer import encode_prompt

    texts = load_prompts(default_train_sources(), limit=limit, seed=0)
    ids = [encode_prompt(model.tokenizer, t, chat=True) for t in texts]
    return sorted((i for i in ids if 0 < len(i) <= max_prompt), key=len)


def margin_at(cfg, params, prompt, answer, j, a, b):
    """Logits of tokens a and b after prompt + answer[:j] (one row, the working tree's forward)."""
    import jax.numpy as jnp

    from m2r2_jax.model import decoder as D

    seq = list(prompt) + list(answer[:j])
    cache = D.init_cache(cfg, 1, -(-len(seq) // 64) * 64)
    logits, _ = D.forward(cfg, params, jnp.asarray([seq], jnp.int32), cache, jnp.zeros((1,), jnp.int32))
    row = logits[0, -1]
    top = jnp.sort(row)[-2:]
    return float(row[a]), float(row[b]), float(top[1] - top[0])


def run_decode(a):
    import numpy as np

    from m2r2_jax.decoding import generate as G_new
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.model import layers as L_new
    from m2r2_jax.training.distill import _cache_len

    m = load_model("smollm2-135m")
    cfg, params = m.cfg, m.params
    L_old = module_at(a.before, "m2r2_jax/model/layers.py", "bench_layers_before")
    G_old = module_at(a.before, "m2r2_jax/decoding/generate.py", "bench_generate_before")
    sides = [
        Side(f"before ({a.before})", G_old, L_old.attend, L_old.attend_multi, cfg),
        Side("after (working tree)", G_new, L_new.attend, L_new.attend_multi, cfg),
    ]
    pool = distill_prompts(m, a.max_prompt, a.limit)
    print(f"{len(pool)} prompts <= {a.max_prompt} tokens", flush=True)
    mismatches, compared = [], 0
    for B in [int(x) for x in a.batches.split(",")]:
        for at in [int(x) for x in a.at.split(",")]:
            start = next(i for i, p in enumerate(pool) if len(p) >= at)
            prompts = pool[start : start + B]
            S = _cache_len(cfg, len(prompts[-1]), a.max_new)
            lens = [len(p) for p in prompts]
            print(f"\nbatch {B}: prompts {min(lens)}-{max(lens)} tokens, cache {S}, max_new {a.max_new}", flush=True)
            res = {s.name: [] for s in sides}
            outs = {}
            for _ in range(1 + a.reps):  # the first call compiles (timed apart) and gives the outputs
                for s in sides:
                    g = s.G.GenerateConfig(max_new_tokens=a.max_new, cache_len=S)
                    r = s.generate(params, prompts, g)
                    outs.setdefault(s.name, r.new_ids)
                    res[s.name].append(r.num_new_tokens / r.decode_seconds)
                    print(
                        f"  {s.name}: {res[s.name][-1]:7.1f} tok/s ({r.num_new_tokens} tokens in "
                        f"{r.decode_seconds:.1f}s, {r.steps} steps; compile {r.compile_seconds:.1f}s)",
                        flush=True,
                    )
            ratio = [x / y for x, y in zip(res[sides[1].name], res[sides[0].name])]
            print(
                f"  => batch {B} cache {S}: before {statistics.median(res[sides[0].name]):.1f} tok/s, "
                f"after {statistics.median(res[sides[1].name]):.1f} tok/s, ratio per rep "
                f"{', '.join(f'{x:.2f}' for x in ratio)} (median {statistics.median(ratio):.2f})",
                flush=True,
            )
            old, new = outs[sides[0].name], outs[sides[1].name]
            for p, x, y in zip(prompts, old, new):
                compared += 1
                if x != y:
                    j = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), min(len(x), len(y)))
                    if j < min(len(x), len(y)):
                        la, lb, top2 = margin_at(cfg, params, p, x, j, x[j], y[j])
                        mismatches.append((len(p), j, x[j], y[j], la, lb, top2))
                    else:
                        mismatches.append((len(p), j, None, None, np.nan, np.nan, np.nan))
    print(f"\nequality: {compared - len(mismatches)}/{compared} rows equal token for token")
    for n, j, t0, t1, la, lb, top2 in mismatches:
        print(
            f"  prompt of {n} tokens: first difference at answer token {j}: before {t0}, after {t1}; "
            f"logits {la:.6f} vs {lb:.6f} (top-2 margin {top2:.2e})"
        )


def run_micro(a):
    """One layer's decode attention (B=64, SmolLM2's 9 heads / 3 KV heads, head_dim 64) over distinct
    per-layer caches, before vs after, alternating."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.model import layers as L_new

    cfg = load_model("smollm2-135m", tokenizer=False).cfg
    L_old = module_at(a.before, "m2r2_jax/model/layers.py", "bench_layers_before")
    B, S, T, n_layers = a.micro_batch, a.cache, a.block, 8
    KV, hd, H = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    rs = np.random.RandomState(0)
    ks = [jnp.asarray(rs.randn(B, KV, S, hd).astype(np.float32)) for _ in range(n_layers)]
    vs = [jnp.asarray(rs.randn(B, KV, S, hd).astype(np.float32)) for _ in range(n_layers)]
    q = jnp.asarray(rs.randn(B, T, H, hd).astype(np.float32))
    pos = jnp.asarray(rs.randint(S // 2, S - T, B), jnp.int32)
    mask = L_new.block_mask(pos, T, S)

    def timed(attend):
        def f(q, ks, vs):
            def body(i, acc):
                o = 0.0
                for k, v in zip(ks, vs):
                    o = o + attend(cfg, q + acc * 1e-9, k, v, mask)[:, 0, 0].sum()
                return acc + o * 1e-12

            return lax.fori_loop(0, 3, body, jnp.float32(0))

        return jax.jit(f)

    fs = {"before": timed(L_old.attend), "after": timed(L_new.attend)}
    diff = jnp.max(jnp.abs(L_old.attend(cfg, q, ks[0], vs[0], mask) - L_new.attend(cfg, q, ks[0], vs[0], mask)))
    print(f"B={B} S={S} T={T}: max |after - before| = {float(diff):.2e}")
    for f in fs.values():
        f(q, ks, vs).block_until_ready()
    ms = {k: [] for k in fs}
    for _ in range(a.reps + 2):
        for k, f in fs.items():
            t0 = time.perf_counter()
            f(q, ks, vs).block_until_ready()
            ms[k].append((time.perf_counter() - t0) / (3 * n_layers) * 1e3)
    for k in fs:
        print(f"  {k}: {statistics.median(ms[k]):.2f} ms per layer ({', '.join(f'{x:.1f}' for x in ms[k])})")
    print(f"  after / before: {statistics.median([x / y for x, y in zip(ms['after'], ms['before'])]):.2f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="HEAD", help="git ref of the baseline code")
    p.add_argument("--batches", default="64")
    p.add_argument("--at", default="40,100", help="prompt lengths at which a batch is taken")
    p.add_argument("--max-new", type=int, default=160)
    p.add_argument("--max-prompt", type=int, default=160)
    p.add_argument("--limit", type=int, default=24000, help="training prompts read")
    p.add_argument("--reps", type=int, default=1, help="timed calls per side after the first")
    p.add_argument("--micro", action="store_true", help="one layer's attention only")
    p.add_argument("--cache", type=int, default=384, help="--micro: cache slots")
    p.add_argument("--block", type=int, default=1, help="--micro: tokens per row")
    p.add_argument("--micro-batch", type=int, default=64)
    a = p.parse_args()
    print("command: JAX_PLATFORMS=cpu python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), flush=True)
    run_micro(a) if a.micro else run_decode(a)


if __name__ == "__main__":
    main()
