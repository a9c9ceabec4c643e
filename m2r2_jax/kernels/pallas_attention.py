"""Tree-verification attention as a Pallas kernel for TPU (and, in interpret mode, any backend).

The same contract as the CPU kernel's `block_attention`: the T queries of a block (a draft tree's nodes,
or one decode token) attend over the first prefix_len[b] slots of the KV cache and over the block's own
keys under a local [T, L] visibility mask (a tree's ancestor mask), with one softmax over both.

Layout: the G = H / KV query heads that share a KV head are processed together as T * G rows against
one KV head's keys (grouped-query attention without repeating K/V). The grid is (batch, kv head,
cache blocks); the cache-block axis is the reduction, carried in VMEM scratch with an online softmax
(running max, running sum, weighted values). The local keys enter at the first cache block. Cache
blocks past the prefix are skipped (their scores masked; `pl.when` skips the work).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

NEG = -1e30


def _kernel(
    plen_ref,
    q_ref,
    kc_ref,
    vc_ref,
    kl_ref,
    vl_ref,
    lm_ref,
    o_ref,
    m_sc,
    l_sc,
    acc_sc,
    *,
    block_s: int,
    scale: float,
):
    b, s = pl.program_id(0), pl.program_id(2)
    plen = plen_ref[b]
    q = q_ref[0, 0].astype(jnp.float32) * scale  # [T*G, hd]

    @pl.when(s == 0)
    def _init():  # the block's own keys first: [T*G, L] under the local mask
        kl = kl_ref[0, 0].astype(jnp.float32)
        sc = jax.lax.dot_general(q, kl, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        vis = lm_ref[...] > 0  # [T*G, L]
        sc = jnp.where(vis, sc, NEG)
        m = jnp.max(sc, axis=1, keepdims=True)
        p = jnp.where(vis, jnp.exp(sc - m), 0.0)
        m_sc[...] = m
        l_sc[...] = jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = jnp.dot(p, vl_ref[0, 0].astype(jnp.float32), preferred_element_type=jnp.float32)

    @pl.when(s * block_s < plen)
    def _cache_block():
        kc = kc_ref[0, 0].astype(jnp.float32)  # [block_s, hd]
        sc = jax.lax.dot_general(q, kc, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        slot = s * block_s + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
        vis = slot < plen
        sc = jnp.where(vis, sc, NEG)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(vis, jnp.exp(sc - m_new), 0.0)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(
            p, vc_ref[0, 0].astype(jnp.float32), preferred_element_type=jnp.float32
        )
        m_sc[...] = m_new

    @pl.when(s == pl.num_programs(2) - 1)
    def _done():
        o_ref[0, 0] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def _last_block(s, plen, bs: int):
    """Cache block s, or the last block holding a prefix slot once s is past the prefix (a
    non-negative truncating division: `//` would lower through `sign`, which Mosaic resolves against
    the default backend's TPU generation, absent when compiling ahead of time)."""
    return jnp.minimum(s, jax.lax.div(jnp.maximum(plen - 1, 0), jnp.int32(bs)))


@functools.partial(jax.jit, static_argnames=("block_s", "interpret"))
def tree_attention(
    q, k_cache, v_cache, prefix_len, k_local, v_local, local_mask, block_s: int = 128, interpret: bool = False
):
    """q [B, T, H, hd]; k_cache, v_cache [B, KV, S, hd]; prefix_len [B]; k_local, v_local [B, KV, L, hd];
    local_mask [T, L] -> [B, T, H * hd] float32. S must be a multiple of block_s (cache lengths are
    multiples of 128)."""
    B, T, H, hd = q.shape
    KV, S, L = k_cache.shape[1], k_cache.shape[2], k_local.shape[2]
    G = H // KV
    bs = min(block_s, S)
    if S % bs:
        raise ValueError(f"cache length {S} is not a multiple of the block size {bs}")
    # [B, KV, T*G, hd]: row t*G + g is query head k*G + g of token t
    qg = q.reshape(B, T, KV, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, KV, T * G, hd)
    lm = jnp.repeat(jnp.asarray(local_mask, jnp.int32), G, axis=0)  # [T*G, L]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(B, KV, S // bs),
        in_specs=[
            pl.BlockSpec((1, 1, T * G, hd), lambda b, k, s, plen: (b, k, 0, 0)),
            # past the prefix, keep re-reading the last needed block (the work is skipped anyway)
            pl.BlockSpec((1, 1, bs, hd), lambda b, k, s, plen: (b, k, _last_block(s, plen[b], bs), 0)),
            pl.BlockSpec((1, 1, bs, hd), lambda b, k, s, plen: (b, k, _last_block(s, plen[b], bs), 0)),
            pl.BlockSpec((1, 1, L, hd), lambda b, k, s, plen: (b, k, 0, 0)),
            pl.BlockSpec((1, 1, L, hd), lambda b, k, s, plen: (b, k, 0, 0)),
            pl.BlockSpec((T * G, L), lambda b, k, s, plen: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, T * G, hd), lambda b, k, s, plen: (b, k, 0, 0)),
        scratch_shapes=[
            pltpu.VMEM((T * G, 1), jnp.float32),
            pltpu.VMEM((T * G, 1), jnp.float32),
            pltpu.VMEM((T * G, hd), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        functools.partial(_kernel, block_s=bs, scale=hd**-0.5),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((B, KV, T * G, hd), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(prefix_len.astype(jnp.int32), qg, k_cache, v_cache, k_local, v_local, lm)
    return out.reshape(B, KV, T, G, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H * hd)


def sharded_tree_attention(mesh, interpret: bool = False, batch_axes=("data", "fsdp"), head_axis: str = "tensor"):
    """`tree_attention` mapped over a mesh's shards (a Mosaic kernel is not partitioned automatically):
    each shard attends its rows of the batch (over `batch_axes`, the "batch"/"cache_batch" rule) and
    its KV heads with their query heads (over `head_axis`, the "heads"/"kv_heads" rule). A dimension
    the mesh does not divide stays whole, as the rule table does."""

    def size(axes):
        return math.prod(mesh.shape[a] for a in axes)

    def call(q, k_cache, v_cache, prefix_len, k_local, v_local, local_mask):
        B, KV = q.shape[0], k_cache.shape[1]
        b = tuple(a for a in batch_axes if a in mesh.shape)
        b = (b if len(b) > 1 else b[0]) if b and B % size(b) == 0 and size(b) > 1 else None
        h = (
            head_axis
            if head_axis in mesh.shape and mesh.shape[head_axis] > 1 and KV % mesh.shape[head_axis] == 0
            else None
        )
        cache = P(b, h, None, None)
        fn = functools.partial(tree_attention, interpret=interpret)
        return jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(P(b, None, h, None), cache, cache, P(b), cache, cache, P()),
            out_specs=P(b, None, h),
            check_vma=False,
        )(q, k_cache, v_cache, prefix_len, k_local, v_local, local_mask)

    return call
