"""The parameter tree: its layout, its abstract spec (shape, dtype, logical axes per leaf, read off
the Flax modules) and helpers over it.

Layout (plain nested dicts and lists, weights as [in, out] so `x @ W`):

    embed                [vocab, embed]
    layers[i]
      attn_norm          [embed]
      attn.wq / wk / wv  [embed, heads] / [embed, kv_heads]      (+ bq, bk, bv when qkv_bias)
      attn.wo            [heads, embed]
      attn.q_norm        [heads] / k_norm [kv_heads]             (qk_norm: OLMoE)
      mlp_norm           [embed]
      mlp.gate / up      [embed, mlp]                            (a dense layer)
      mlp.down           [mlp, embed]
      mlp.router         [embed, expert]                         (an MoE layer, model/moe.py)
      mlp.gate / up      [expert, embed, expert_mlp]
      mlp.down           [expert, expert_mlp, embed]
      mlp.shared.*       as a dense layer's mlp; mlp.shared_gate [embed, 1]   (Qwen2-MoE)
    final_norm           [embed]
    lm_head              [embed, vocab]   (absent when embeddings are tied)

`layers` is a Python list (unrolled): per-layer leaves are separate buffers, so no step of the decode
loop ever slices (and copies) a stacked weight, and the M2R2 fast stream addresses base layer l
directly. Flax names a module's children by string ("layers" -> "0", "1", ...): `module_tree` /
`plain_tree` convert between the two (a re-keying of the same leaves, no copy), so checkpoints and
loaders keep the list layout and its tree paths.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any = jnp.float32

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


# ----------------------------------------------------------------------------- layout


def module_tree(tree):
    """The project's layout -> Flax's: every list becomes a dict keyed "0", "1", ..."""
    if isinstance(tree, (list, tuple)):
        return {str(i): module_tree(x) for i, x in enumerate(tree)}
    if isinstance(tree, dict):
        return {k: module_tree(v) for k, v in tree.items()}
    return tree


def plain_tree(tree):
    """Flax's layout -> the project's: a dict keyed exactly "0" .. "n-1" becomes a list."""
    if isinstance(tree, dict) or hasattr(tree, "items") and not hasattr(tree, "shape"):
        d = {k: plain_tree(v) for k, v in tree.items()}
        if d and sorted(d) == sorted(str(i) for i in range(len(d))):
            return [d[str(i)] for i in range(len(d))]
        return d
    return tree


def spec_of(boxed) -> Any:
    """An abstract, boxed variable tree (jax.eval_shape of a module's init) -> ParamSpec tree (plain layout)."""
    params = boxed["params"] if "params" in boxed else boxed

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return ParamSpec(tuple(x.value.shape), tuple(x.names), x.value.dtype)
        return ParamSpec(tuple(x.shape), (None,) * len(x.shape), x.dtype)

    leaves = jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return plain_tree(leaves)


def unboxed(variables) -> Any:
    """A module's init output -> its params in the plain layout."""
    return plain_tree(nn.unbox(variables)["params"])


# ----------------------------------------------------------------------------- the model's spec


def _model_init(cfg: ModelConfig, key):
    from m2r2_jax.backend import XLA
    from m2r2_jax.model import decoder as D
    from m2r2_jax.model.modules import Transformer

    tokens = jnp.zeros((1, 1), jnp.int32)
    cache = D.init_cache(cfg, 1, 1)
    cos, sin = D.rope_for(cfg, jnp.zeros((1, 1), jnp.int32))
    attention_for = D.cache_attention_for(cfg, XLA, cache, jnp.zeros((1,), jnp.int32), 1, None)
    return Transformer(cfg).init(key, tokens, cos, sin, attention_for, method="init_all")


@functools.lru_cache(maxsize=32)
def model_spec(cfg: ModelConfig) -> dict:
    """Shape, dtype and logical axes of every param of the model (from the Flax modules, abstractly)."""
    return spec_of(jax.eval_shape(lambda: _model_init(cfg, jax.random.key(0))))


def init_model(cfg: ModelConfig, key: jax.Array) -> dict:
    """Random params (tests, tiny configs): the modules' initializers, N(0, 0.02^2) weights, unit norms."""
    return unboxed(jax.jit(lambda k: _model_init(cfg, k))(key))


def abstract_params(spec) -> Any:
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), spec, is_leaf=_is_spec)


def logical_axes(spec) -> Any:
    return jax.tree.map(lambda s: s.axes, spec, is_leaf=_is_spec)


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


def params_fingerprint(params, as_dtype: str | None = None) -> str:
    """Hash of every leaf's path, shape, dtype and a small corner of its values (sliced on device, so
    cheap for sharded models): the identity of a base model that distillation caches and M2R2
    checkpoints record. `as_dtype`: the fingerprint the params would have once cast to that dtype
    (used on the loader's source arrays)."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(np.shape(leaf))
        dtype = jnp.dtype(as_dtype) if as_dtype is not None else leaf.dtype
        corner = np.asarray(leaf[tuple(slice(0, 8) for _ in shape)] if shape else leaf).astype(dtype)
        corner = corner.astype(np.float32)
        h.update(f"{jax.tree_util.keystr(path)}|{shape}|{dtype}|".encode())
        h.update(corner.tobytes())
    return h.hexdigest()[:32]
