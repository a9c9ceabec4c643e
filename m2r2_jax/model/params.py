"""The parameter tree as an abstract spec: every leaf declares shape, dtype and
logical axes. Shardings, random init and loader shape checks all derive from it.

Layout (plain nested dicts / lists, weights as [in, out] so `x @ W`):

    embed                [vocab, embed]
    layers[i]
      attn_norm          [embed]
      attn.wq / wk / wv  [embed, heads] / [embed, kv_heads]      (+ bq, bk, bv when qkv_bias)
      attn.wo            [heads, embed]
      mlp_norm           [embed]
      mlp.gate / up      [embed, mlp]
      mlp.down           [mlp, embed]
    final_norm           [embed]
    lm_head              [embed, vocab]   (absent when embeddings are tied)

`layers` is a Python list (unrolled): per-layer leaves are separate buffers, so
no step of the decode loop ever slices (and copies) a stacked weight, and the
M2R2 fast stream can address base layer l directly.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | ones | zeros
    dtype: Any = jnp.float32

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def mlp_spec(cfg: ModelConfig, dt) -> dict:
    D, F = cfg.hidden_size, cfg.intermediate_size
    return {
        "gate": ParamSpec((D, F), ("embed", "mlp"), dtype=dt),
        "up": ParamSpec((D, F), ("embed", "mlp"), dtype=dt),
        "down": ParamSpec((F, D), ("mlp", "embed"), dtype=dt),
    }


def layer_spec(cfg: ModelConfig) -> dict:
    dt = cfg.jnp_param_dtype
    D = cfg.hidden_size
    attn = {
        "wq": ParamSpec((D, cfg.q_dim), ("embed", "heads"), dtype=dt),
        "wk": ParamSpec((D, cfg.kv_dim), ("embed", "kv_heads"), dtype=dt),
        "wv": ParamSpec((D, cfg.kv_dim), ("embed", "kv_heads"), dtype=dt),
        "wo": ParamSpec((cfg.q_dim, D), ("heads", "embed"), dtype=dt),
    }
    if cfg.qkv_bias:
        attn["bq"] = ParamSpec((cfg.q_dim,), ("heads",), init="zeros", dtype=dt)
        attn["bk"] = ParamSpec((cfg.kv_dim,), ("kv_heads",), init="zeros", dtype=dt)
        attn["bv"] = ParamSpec((cfg.kv_dim,), ("kv_heads",), init="zeros", dtype=dt)
    return {
        "attn_norm": ParamSpec((D,), ("norm",), init="ones", dtype=dt),
        "attn": attn,
        "mlp_norm": ParamSpec((D,), ("norm",), init="ones", dtype=dt),
        "mlp": mlp_spec(cfg, dt),
    }


def model_spec(cfg: ModelConfig) -> dict:
    dt = cfg.jnp_param_dtype
    spec = {
        "embed": ParamSpec((cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype=dt),
        "layers": [layer_spec(cfg) for _ in range(cfg.num_layers)],
        "final_norm": ParamSpec((cfg.hidden_size,), ("norm",), init="ones", dtype=dt),
    }
    if not cfg.tie_word_embeddings:
        spec["lm_head"] = ParamSpec((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype=dt)
    return spec


def abstract_params(spec) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), spec, is_leaf=_is_spec)


def logical_axes(spec) -> Any:
    return jax.tree.map(lambda s: s.axes, spec, is_leaf=_is_spec)


def init_params(spec, key: jax.Array, scale: float = 0.02) -> Any:
    """Random init from the spec (tests, tiny models). Pure numpy-free jax ops."""
    leaves, treedef = jax.tree.flatten(spec, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))

    def one(s: ParamSpec, k):
        if s.init == "ones":
            return jnp.ones(s.shape, s.dtype)
        if s.init == "zeros":
            return jnp.zeros(s.shape, s.dtype)
        return (scale * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype)

    return jax.tree.unflatten(treedef, [one(s, k) for s, k in zip(leaves, keys)])


def flatten_with_names(tree) -> list[tuple[str, Any]]:
    """[('layers.3.attn.wq', leaf), ...] — stable names for errors and checkpoints."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec)[0]:
        out.append((".".join(_key_str(p) for p in path), leaf))
    return out


def _key_str(p) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(p, attr):
            return str(getattr(p, attr))
    return str(p)


def count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


MapFn = Callable[[ParamSpec], Any]
