"""Decode speed: our jitted greedy loop vs HF transformers (torch) `generate`,
in ONE run on the same prompts, plus the forward cost of T tokens over a
filled cache relative to T = 1 (the verification-cost curve).

    python -m eval.bench_decode --model smollm2-135m --json

Timings exclude model loading and compilation (our compile is timed
separately and reported as `compile_seconds`); both sides generate exactly
`--max-new-tokens` tokens per prompt (EOS ignored) at batch 1, and both times
include the prompt's prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from m2r2_jax.cli import add_model_args, decode_setup, quiet_env, run_main

PROMPTS = (
    "Explain why the sky is blue to a ten-year-old.",
    "Write a short poem about a lighthouse keeper.",
    "List three tips for writing clean Python code and explain each.",
)


def bench_interleaved(gen, params, ref, prompts, max_new, repeats):
    """Alternate ours / HF per prompt so machine noise hits both sides alike."""
    import torch

    from m2r2_jax.decoding.generate import GenerateConfig

    g = GenerateConfig(max_new_tokens=max_new, stop_ids=(-1,))
    compile_s = sum(gen.generate(params, [p], g).compile_seconds for p in prompts)  # compile + warm
    ours_t, hf_t, same = [], [], []
    with torch.inference_mode():
        if ref is not None:
            ref.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(repeats):
            for p in prompts:
                r = gen.generate(params, [p], g)
                ours_t.append(r.decode_seconds)
                if ref is None:
                    continue
                t0 = time.perf_counter()
                o = ref.generate(
                    torch.tensor([p]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0
                )
                hf_t.append(time.perf_counter() - t0)
                same.append(o[0, len(p) :].tolist() == r.new_ids[0])
    return ours_t, hf_t, same, compile_s


def verify_cost_curve(cfg, params, backend, Ts=(1, 2, 3, 4, 6, 8, 16, 32, 64), filled=256, cache_len=512, reps=7):
    """Wall time of one jitted full forward of T tokens over `filled` cached slots, relative to T=1."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2r2_jax.model import decoder as D

    fwd = jax.jit(lambda p, t, c, s: D.forward(cfg, p, t, c, s, backend=backend), donate_argnums=(2,))
    ms = {}
    for T in Ts:
        cache = D.init_cache(cfg, 1, cache_len)
        toks = jnp.asarray(np.arange(T)[None] % cfg.vocab_size + 10, jnp.int32)
        start = jnp.full((1,), filled, jnp.int32)
        logits, cache = fwd(params, toks, cache, start)  # compile
        jax.block_until_ready(logits)
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            logits, cache = fwd(params, toks, cache, start)
            jax.block_until_ready(logits)
            ts.append(time.perf_counter() - t0)
        ms[T] = statistics.median(ts) * 1e3
    return {str(T): {"ms": ms[T], "relative": ms[T] / ms[Ts[0]]} for T in Ts}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.bench_decode", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="passes over the prompts per side")
    p.add_argument("--skip-hf", action="store_true", help="only our decode (no torch needed)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    quiet_env()

    import jax

    from m2r2_jax.decoding.generate import Generator
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.hf_reference import hf_reference_model
    from m2r2_jax.evaluation.spec_eval import machine_info
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.loading.tokenizer import encode_prompt

    if a.max_new_tokens < 1 or a.repeats < 1:
        raise M2R2Error("--max-new-tokens and --repeats must be >= 1")
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype)
    prompts = [encode_prompt(m.tokenizer, t, chat=bool(getattr(m.tokenizer, "chat_template", None))) for t in PROMPTS]
    backend, params = decode_setup(m, a.cpu_kernel)
    gen = Generator(m.cfg, backend=backend)
    ref = None if a.skip_hf else hf_reference_model(m)
    ours_t, hf_t, same, compile_s = bench_interleaved(gen, params, ref, prompts, a.max_new_tokens, a.repeats)
    n_tok = a.max_new_tokens * len(ours_t)
    res = {
        "model": a.model,
        "device": str(jax.devices()[0].platform),
        "batch": 1,
        "dtype": m.cfg.dtype,
        "backend": backend.name,
        "max_new_tokens": a.max_new_tokens,
        "prompts": len(prompts),
        "repeats": a.repeats,
        "timing": "wall clock per generate call incl. prefill; load and compile excluded",
        "ours_tokens_per_second": n_tok / sum(ours_t),
        "ours_ms_per_token": 1e3 * sum(ours_t) / n_tok,
        "compile_seconds": compile_s,
    }
    if ref is not None:
        import torch

        res.update(
            {
                "hf_tokens_per_second": n_tok / sum(hf_t),
                "hf_ms_per_token": 1e3 * sum(hf_t) / n_tok,
                "ratio_vs_hf": sum(hf_t) / sum(ours_t),
                "torch_threads": torch.get_num_threads(),
                "greedy_tokens_identical_to_hf": all(same),
            }
        )
    res["verify_cost"] = verify_cost_curve(m.cfg, params, backend)
    res["machine"] = machine_info()
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:32s} {v}")
    return 0


if __name__ == "__main__":
    run_main(main)
