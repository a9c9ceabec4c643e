"""Attention contexts: how a block of new tokens attends, given its own q / k / v.

A decoder layer (model/modules.py) projects q, k, v and hands them to an *attention context*,
`attend(q [B,T,H,hd], k [B,KV,T,hd], v [B,KV,T,hd]) -> (out [B,T,H*hd], state)`. The context owns
everything that differs between the places a layer runs:

  CacheAttention  the base model over its KV cache: writes the block's K/V at slot start[b], then
                  attends over the cached prefix and the block (local mask: causal, or a draft
                  tree's ancestor mask); state = the updated (k_cache, v_cache).
  SetsAttention   the fast stream: attends over read-only K/V sets (the slow stream's cache of the
                  tokens before it, a draft tree's ancestor buffer) and the block's own K/V, with one
                  joint softmax; state = the block's own (k, v), for a caller's local buffer.

Each has an XLA form and a block-attention-kernel form (the CPU kernels', or the Pallas kernel for TPU),
picked by the static `Backend` (backend.py); they give the same attention (the kernels scale scores by
head_dim**-0.5: a model with its own scale hands them a pre-scaled q, `layers.kernel_query`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.backend import Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.model import layers as L


@dataclasses.dataclass(frozen=True)
class CacheAttention:
    """One layer's KV cache [B, KV, S, hd]; the block starts at slot start [B]. `mask` is the [B, T, S]
    visibility on XLA, or the block's own [T, T] local mask with the kernels (the prefix is start[b])."""

    cfg: ModelConfig
    backend: Backend
    k_cache: jax.Array
    v_cache: jax.Array
    start: jax.Array
    mask: jax.Array

    def __call__(self, q, k, v):
        kc, vc = L.write_cache(self.k_cache, k, self.start), L.write_cache(self.v_cache, v, self.start)
        kernel = self.backend.block_attention
        if kernel is not None:
            # reads the cache after the write (slots < start only), so XLA updates it in place
            a = kernel(L.kernel_query(self.cfg, q), kc, vc, self.start, k, v, self.mask)
        else:
            a = L.attend(self.cfg, q, kc, vc, self.mask)
        return a.astype(q.dtype), (kc, vc)


def cache_masks(backend: Backend, start: jax.Array, T: int, S: int, local_mask=None):
    """The mask `CacheAttention` takes for a T-token block at slot start[b] of an S-slot cache."""
    if backend.block_attention is not None:
        return jnp.tril(jnp.ones((T, T), bool)) if local_mask is None else jnp.asarray(local_mask)
    return L.block_mask(start, T, S, local_mask)


@dataclasses.dataclass(frozen=True)
class SetsAttention:
    """Attention over read-only K/V `sets` [(k [B,KV,S_i,hd], v, mask [B,T,S_i])] and the block's own K/V
    (visibility `self_mask` [B, T, T]), with one joint softmax.

    With a block-attention kernel (the CPU kernels', Pallas'), `prefix` = (k_cache, v_cache, prefix_len [B])
    is the first set as a cache prefix, `local` = (k [B,KV,n,hd], v) read-only local keys before the
    block's own, and `kernel_mask` [T, n + T] says which local keys (those, then the block's) each query
    sees; `sets` / `self_mask` are unused."""

    cfg: ModelConfig
    backend: Backend
    sets: Sequence[tuple[Any, Any, Any]] = ()
    self_mask: Any = None
    prefix: tuple | None = None
    local: tuple | None = None
    kernel_mask: Any = None

    def __call__(self, q, k, v):
        kernel = self.backend.block_attention
        if kernel is not None and self.prefix is not None:
            kc, vc, plen = self.prefix
            lk, lv = (
                (k, v)
                if self.local is None
                else (jnp.concatenate([self.local[0], k], 2), jnp.concatenate([self.local[1], v], 2))
            )
            a = kernel(L.kernel_query(self.cfg, q), kc, vc, plen, lk, lv, self.kernel_mask)
        else:
            a = L.attend_multi(self.cfg, q, list(self.sets) + [(k, v, self.self_mask)])
        return a.astype(q.dtype), (k, v)


def tree_draft_attention(
    cfg: ModelConfig, backend: Backend, k_cache, v_cache, pos, anc_k, anc_v, anc: np.ndarray
) -> SetsAttention:
    """A draft tree depth's n nodes at fast layer l: the slow cache's first pos[b] slots, the tree's
    ancestor buffer (anc_k / anc_v [B, KV, T, hd]; `anc` [n, T] which ancestors each node sees; its own
    entry excluded) and the node itself."""
    B, n, S = pos.shape[0], anc.shape[0], k_cache.shape[2]
    if backend.block_attention is not None:
        kmask = np.concatenate([anc, np.eye(n, dtype=bool)], 1)  # [n, T + n]
        return SetsAttention(cfg, backend, prefix=(k_cache, v_cache, pos), local=(anc_k, anc_v), kernel_mask=kmask)
    m_prefix = jnp.broadcast_to((jnp.arange(S)[None, :] < pos[:, None])[:, None, :], (B, n, S))
    m_anc = jnp.broadcast_to(jnp.asarray(anc)[None], (B, n, anc.shape[1]))
    m_self = jnp.broadcast_to(jnp.eye(n, dtype=bool)[None], (B, n, n))
    return SetsAttention(cfg, backend, sets=[(k_cache, v_cache, m_prefix), (anc_k, anc_v, m_anc)], self_mask=m_self)
