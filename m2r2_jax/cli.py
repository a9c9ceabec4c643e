"""Shared CLI plumbing: one-line errors, model / mesh / backend flags."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

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
    p.add_argument(
        "--model", default="smollm2-135m", help="alias (smollm2-135m), .gguf file, HF safetensors dir or hub id"
    )
    p.add_argument("--dtype", default=None, help="compute dtype (default float32; bfloat16 on TPU/GPU)")
    p.add_argument("--param-dtype", default=None, help="parameter dtype (default float32)")
    p.add_argument(
        "--matmul-dtype",
        default=None,
        help="matmul input dtype, accumulated in f32 (default: the compute dtype); "
        "bfloat16 with --param-dtype bfloat16 is the fast mode on AMX / AVX512-BF16 CPUs",
    )
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. data=1,fsdp=1,tensor=8 (default: no mesh, one device)")
    if not decode:
        return
    p.add_argument(
        "--cpu-kernel",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode through the CPU kernels (packed small-row matmul + block attention, "
        "m2r2_jax/kernels): auto = on the CPU backend with float32 params on one device; "
        "off = XLA's own dot and attention",
    )


def decode_setup(m, mode: str = "auto", mesh=None):
    """-> (backend, params) for decoding with `--cpu-kernel mode` (backend.resolve: one clear line when
    `on` cannot be honoured), the params laid out for that backend."""
    from m2r2_jax.backend import resolve

    backend = resolve(m.cfg, mode, mesh)
    return backend, backend.prepare(m.cfg, m.params)


def parse_mesh(spec: str | None):
    if not spec:
        return None
    from m2r2_jax.config import apply_overrides
    from m2r2_jax.sharding import MeshConfig, make_mesh, maybe_initialize_distributed

    cfg = apply_overrides(MeshConfig(), [s for s in spec.split(",") if s])
    maybe_initialize_distributed(cfg)
    return make_mesh(cfg)


def quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
