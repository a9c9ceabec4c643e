"""Generate text with the jitted decode loop.

python -m eval.generate --model smollm2-135m --prompt "Hi" --chat --json
"""

from __future__ import annotations

import argparse
import json

from m2r2_jax.cli import add_model_args, decode_setup, parse_mesh, quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-len", type=int, default=None, help="KV cache slots (default: bucketed need)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    a = p.parse_args(argv)
    quiet_env()

    from m2r2_jax.decoding.generate import GenerateConfig, Generator
    from m2r2_jax.decoding.sampling import SamplingConfig
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.loading.tokenizer import check_prompt, encode_prompt

    check_prompt(a.prompt)
    gen = GenerateConfig(
        max_new_tokens=a.max_new_tokens,
        cache_len=a.cache_len,
        sampling=SamplingConfig(a.temperature, a.top_k, a.top_p, a.seed),
    )  # validated before loading
    mesh = parse_mesh(a.mesh)
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype, mesh=mesh)
    ids = encode_prompt(m.tokenizer, a.prompt, a.chat)
    backend, params = decode_setup(m, a.cpu_kernel, mesh)
    res = Generator(m.cfg, mesh, backend).generate(params, [ids], gen)
    new = res.new_ids[0]
    text = m.tokenizer.decode(new, skip_special_tokens=True)
    tps = len(new) / res.decode_seconds if res.decode_seconds > 0 else 0.0
    if a.json:
        print(
            json.dumps(
                {
                    "model": a.model,
                    "prompt_ids": ids,
                    "new_ids": new,
                    "text": text,
                    "num_new_tokens": len(new),
                    "tokens_per_second": tps,
                    "decode_seconds": res.decode_seconds,
                    "compile_seconds": res.compile_seconds,
                }
            )
        )
    else:
        print(text)
        print(f"[{len(new)} tokens, {tps:.1f} tok/s incl. prefill; compile {res.compile_seconds:.1f}s]")
    return 0


if __name__ == "__main__":
    run_main(main)
