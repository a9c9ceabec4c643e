"""The Llama-family decoder as pure functions over the param pytree.

`forward` processes a block of T tokens per row, written into the KV cache at
per-row slots `start[b]`; RoPE positions are the absolute slot indices. The same
function serves prefill (start = 0, T = prompt bucket), decode (T = 1) and
tree verification (T = tree size, `local_mask` = ancestor mask, `positions` =
start + depth).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2r2_jax import kernels as K
from m2r2_jax.config import ModelConfig
from m2r2_jax.model import layers as L


class KVCache(NamedTuple):
    """Per-layer K/V buffers, each [B, KV, S, hd] (lists: one buffer per layer)."""

    k: list
    v: list

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


CACHE_AXES = ("cache_batch", "cache_heads", "cache_seq", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    cfg.check_cache_len(length)
    dt = dtype or cfg.jnp_dtype
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache([jnp.zeros(shape, dt) for _ in range(cfg.num_layers)],
                   [jnp.zeros(shape, dt) for _ in range(cfg.num_layers)])


def embed(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    return jnp.take(params["embed"], tokens, axis=0).astype(cfg.jnp_dtype)


def decoder_layer(cfg: ModelConfig, lp: dict, h: jax.Array, k_cache, v_cache, start, cos, sin, mask):
    """One pre-norm block. Returns (h, k_cache, v_cache). `mask` is the [B, T, S] visibility, or with
    params packed for the CPU kernels the block's own [T, T] local mask (the prefix is start[b])."""
    x = L.rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    q, k, v = L.qkv(cfg, lp["attn"], x, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    k_cache, v_cache = L.write_cache(k_cache, k, start), L.write_cache(v_cache, v, start)
    if isinstance(lp["attn"]["wq"], K.PackedWeight):
        # reads the cache after the write (slots < start only), so XLA updates it in place
        a = K.block_attention(q, k_cache, v_cache, start, k, v, mask).astype(h.dtype)
    else:
        a = L.attend(cfg, q, k_cache, v_cache, mask)
    h = h + L.matmul(a, lp["attn"]["wo"], cfg.mm_dtype)
    x = L.rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    h = h + L.mlp(cfg, lp["mlp"], x)
    return h, k_cache, v_cache


def logits_from_hidden(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """Final norm + LM head (tied: contract with embed's hidden axis, no transpose copy)."""
    x = L.rms_norm(h, params["final_norm"], cfg.rms_norm_eps)
    if "lm_head" in params:
        return L.matmul(x, params["lm_head"], cfg.mm_dtype).astype(jnp.float32)
    return L.rows_logits(x, params["embed"], cfg.mm_dtype)


def forward_hidden(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: KVCache,
                   start: jax.Array, positions: jax.Array | None = None,
                   local_mask: jax.Array | None = None, layer_range: tuple[int, int] | None = None,
                   h: jax.Array | None = None, collect: bool = False):
    """Run layers [lo, hi) over a block. Returns (h, cache, hiddens or None).

    tokens [B, T] int32; start [B] int32 slot of the block's first token;
    positions [B, T] RoPE positions (default start + arange(T)).
    """
    B, T = tokens.shape
    start = start.astype(jnp.int32)
    if positions is None:
        positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cos, sin = L.rope_cos_sin(cfg, positions)
    lo, hi = layer_range or (0, cfg.num_layers)
    if lo < hi and isinstance(params["layers"][lo]["attn"]["wq"], K.PackedWeight):
        mask = jnp.tril(jnp.ones((T, T), bool)) if local_mask is None else local_mask
    else:
        mask = L.block_mask(start, T, cache.length, local_mask)
    if h is None:
        h = embed(cfg, params, tokens)
    ks, vs = list(cache.k), list(cache.v)
    hiddens = []
    for i in range(lo, hi):
        h, ks[i], vs[i] = decoder_layer(cfg, params["layers"][i], h, ks[i], vs[i], start, cos, sin, mask)
        if collect:
            hiddens.append(h)
    return h, KVCache(ks, vs), (hiddens if collect else None)


def forward(cfg: ModelConfig, params: dict, tokens: jax.Array, cache: KVCache, start: jax.Array,
            positions: jax.Array | None = None, local_mask: jax.Array | None = None):
    """Full model over a block: (logits [B, T, V] f32, updated cache)."""
    h, cache, _ = forward_hidden(cfg, params, tokens, cache, start, positions, local_mask)
    return logits_from_hidden(cfg, params, h), cache
