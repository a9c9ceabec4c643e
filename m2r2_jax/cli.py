"""Shared CLI plumbing: one-line errors, model/mesh flags, prompt encoding."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from m2r2_jax.errors import M2R2Error


def run_main(main: Callable[[list[str] | None], int | None], argv=None) -> None:
    """Run a CLI entry point; a bad input exits 2 with one `error: ...` line."""
    try:
        rc = main(argv)
    except M2R2Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc or 0)


def add_model_args(p: argparse.ArgumentParser, decode: bool = True) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="alias (smollm2-135m), .gguf file, HF safetensors dir or hub id")
    p.add_argument("--dtype", default=None, help="compute dtype (default float32; bfloat16 on TPU/GPU)")
    p.add_argument("--param-dtype", default=None, help="parameter dtype (default float32)")
    p.add_argument("--matmul-dtype", default=None,
                   help="matmul input dtype, accumulated in f32 (default: the compute dtype); "
                        "bfloat16 with --param-dtype bfloat16 is the fast mode on AMX / AVX512-BF16 CPUs")
    p.add_argument("--mesh", default=None,
                   help="mesh axes, e.g. data=1,fsdp=1,tensor=8 (default: no mesh, one device)")
    if not decode:
        return
    p.add_argument("--cpu-kernel", choices=("auto", "on", "off"), default="auto",
                   help="decode through the CPU kernels (packed small-row matmul + block attention, "
                        "m2r2_jax/kernels): auto = on the CPU backend with float32 params on one device; "
                        "off = XLA's own dot and attention")


def decode_params(m, mode: str = "auto", mesh=None):
    """The params decoding should use: `m.params` packed for the CPU kernels (`--cpu-kernel`), or as
    they are. `on` fails with one clear line where the kernels cannot be used."""
    from m2r2_jax import kernels as K

    if mode == "off":
        return m.params
    if K.wanted(m.cfg, mesh):
        return K.pack_decode_params(m.cfg, m.params)
    if mode == "on":
        raise M2R2Error(f"--cpu-kernel on: {K.why_not(m.cfg, mesh)}")
    return m.params


def parse_mesh(spec: str | None):
    if not spec:
        return None
    from m2r2_jax.config import apply_overrides
    from m2r2_jax.sharding import MeshConfig, make_mesh, maybe_initialize_distributed

    cfg = apply_overrides(MeshConfig(), [s for s in spec.split(",") if s])
    maybe_initialize_distributed(cfg)
    return make_mesh(cfg)


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Chat: exactly `apply_chat_template(messages, add_generation_prompt=True)`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise M2R2Error("--chat: this model's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(text)["input_ids"]]


def quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
