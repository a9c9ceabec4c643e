"""Functional building blocks the Flax modules are made of: RMSNorm, RoPE, the matmul helpers
(the only place that dispatches on the weight type: `kernels.PackedWeight` goes to the CPU kernel),
GQA attention over a preallocated KV cache with per-row write positions, and block masks."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
from jax import lax

from m2r2_jax.config import ModelConfig, rope_inv_freq
from m2r2_jax.kernels import PackedWeight, add_dense, packed_argmax, packed_matmul, unpack
from m2r2_jax.kernels import scale_columns as kernel_scale_columns


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """HF semantics: normalise in f32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * xf.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array):
    """cos/sin [B, T, head_dim] for integer positions [B, T] (rotate-half layout)."""
    inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, n, hd]; cos/sin [B, T, hd]."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c = cos[:, :, None, :].astype(x.dtype)
    s = sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


def matmul(x: jax.Array, w, mm=None) -> jax.Array:
    """x @ w in x's dtype; with `mm` (ModelConfig.mm_dtype) both inputs are cast to it and the
    product is accumulated in f32 (bf16 inputs run 3-4x faster than f32 on AMX / AVX512-BF16 CPUs).
    A `PackedWeight` (decode-time float32 params on CPU) goes to the CPU kernel."""
    if isinstance(w, PackedWeight):
        return packed_matmul(x, w).astype(x.dtype)
    if mm is None:
        return x @ w.astype(x.dtype)
    y = _on_min_rows(x, lambda x2: jnp.matmul(x2.astype(mm), w.astype(mm), preferred_element_type=jnp.float32))
    return y.astype(x.dtype)


# Products with `mm` run on at least this many rows: XLA:CPU takes a slow path for a one-row bf16
# product (the 576 x 49152 LM head: 32.8 ms for one row, 5.4 ms for two). Three rather than two: alone,
# a two-row bf16 product rounded differently from 3- to 16-row ones, which agreed bit for bit per row.
# (Whole forwards over different block sizes still round differently: see GenerateConfig.block.)
MIN_MM_ROWS = 3


def _on_min_rows(x: jax.Array, product) -> jax.Array:
    """`product` ([n, D] -> [n, N]) on x flattened to rows, padded to MIN_MM_ROWS rows; reshaped back."""
    lead = x.shape[:-1]
    n = math.prod(lead)
    x2 = x.reshape(n, x.shape[-1])
    if n < MIN_MM_ROWS:
        x2 = jnp.pad(x2, ((0, MIN_MM_ROWS - n), (0, 0)))
    y = product(x2)
    return y[:n].reshape(lead + (y.shape[-1],))


def rows_logits(x: jax.Array, w, mm=None) -> jax.Array:
    """x [B, T, D] against the rows of w [V, D] (a tied embedding or a draft head) -> f32 [B, T, V];
    with `mm` the inputs are cast to it and accumulated in f32, as in `matmul`. A `PackedWeight`
    holds w.T already packed (`kernels.pack_rows`)."""
    if isinstance(w, PackedWeight):
        return packed_matmul(x, w)
    if mm is None:
        return jnp.einsum("btd,vd->btv", x, w.astype(x.dtype)).astype(jnp.float32)
    return _on_min_rows(
        x, lambda x2: jnp.einsum("nd,vd->nv", x2.astype(mm), w.astype(mm), preferred_element_type=jnp.float32)
    )


def fused_argmax(w) -> bool:
    """Whether `rows_argmax` takes the fused kernel for head `w`: a `PackedWeight`, unless
    M2R2_FUSED_ARGMAX=0 (read when a function is traced; for before/after timings)."""
    return isinstance(w, PackedWeight) and os.environ.get("M2R2_FUSED_ARGMAX", "1") != "0"


def rows_argmax(x: jax.Array, w: PackedWeight) -> jax.Array:
    """argmax(x @ w, -1) -> int32 [...] for a packed head, without the logits (`kernels.packed_argmax`)."""
    return packed_argmax(x, w)


def dense(w) -> jax.Array:
    """A weight as a plain [in, out] array (unpacked if packed for the CPU kernels)."""
    return unpack(w) if isinstance(w, PackedWeight) else w


def add_to_weight(w, delta: jax.Array):
    """w + delta ([in, out], f32), in w's layout and dtype."""
    if isinstance(w, PackedWeight):
        return add_dense(w, delta)
    return (w.astype(jnp.float32) + delta).astype(w.dtype)


def scale_columns(w, g: jax.Array):
    """w * g[None, :] (the output channels scaled), in w's layout and dtype."""
    if isinstance(w, PackedWeight):
        return kernel_scale_columns(w, g)
    return (w.astype(jnp.float32) * g.astype(jnp.float32)[None, :]).astype(w.dtype)


def linear(x: jax.Array, w, delta=None, mm=None) -> jax.Array:
    """x @ W, plus `delta(x2d, mm)` (a low-rank accelerator adapter, (x A) B) when given.

    Works on x flattened to [tokens, D]: the adapters' weight gradients are then plain GEMMs
    (XLA:CPU runs a dot contracting over two batch axes, [B,T,D] x [B,T,R], ~2x slower)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    y = matmul(x, w, mm)
    if delta is not None:
        y = y + delta(x, mm)
    return y.reshape(lead + (y.shape[-1],))


def write_cache(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """cache [B, KV, S, hd] <- new [B, KV, T, hd] at slot start[b] of each row.

    Batch 1 uses a plain dynamic_update_slice (in place inside loops); larger
    batches vmap it (an XLA scatter) so each row can sit at its own position.
    """
    new = new.astype(cache.dtype)
    if cache.shape[0] == 1:
        return lax.dynamic_update_slice(cache, new, (0, 0, start[0], 0))
    return jax.vmap(lambda c, n, s: lax.dynamic_update_slice(c, n, (0, s, 0)))(cache, new, start)


# One decode token per row (T = 1) is laid out for XLA:CPU, where it is a batch of tiny products (per
# row and KV head, G query heads against S cached keys). On the 2-core EPYC (B=64, S=384, one layer:
# scripts/bench_batched_decode.py --micro) the scores as K @ q^T (the keys as the product's rows) and
# the weighted sum as p^T @ V take 0.5x the time of the q @ K^T / V^T @ p einsums of T > 1 blocks (XLA
# chose V as the transposed left operand there, a slow path). Blocks keep those einsums: there a query
# row's result does not depend on its place in the block, which the K @ q^T product does not promise
# (a block's rows would round differently from the same tokens decoded one slot-padded block at a time).


def _scores(cfg: ModelConfig, q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Scaled f32 scores [B,KV,G,T,S] of q [B,T,H,hd] against k [B,KV,S,hd]; where mask [B,T,S] is False,
    float32's minimum (its exp underflows to exactly 0)."""
    B, T, H, hd = q.shape
    KV = cfg.num_kv_heads
    k = k.astype(q.dtype)
    if T == 1:
        s = jnp.einsum("bksd,bkgd->bksg", k, q.reshape(B, KV, H // KV, hd), preferred_element_type=jnp.float32)
        s = s.transpose(0, 1, 3, 2)[:, :, :, None, :]
    else:
        s = jnp.einsum("btkgd,bksd->bkgts", q.reshape(B, T, KV, H // KV, hd), k, preferred_element_type=jnp.float32)
    return jnp.where(mask[:, None, None, :, :], s * cfg.attn_scale, jnp.finfo(jnp.float32).min)


def _weighted(probs: jax.Array, v: jax.Array) -> jax.Array:
    """probs [B,KV,G,T,S] over v [B,KV,S,hd] -> [B,T,H*hd]."""
    B, KV, G, T, _ = probs.shape
    v = v.astype(probs.dtype)
    if T == 1:
        out = jnp.einsum("bksg,bksd->bkgd", probs[:, :, :, 0, :].transpose(0, 1, 3, 2), v)
    else:
        out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(B, T, KV * G * v.shape[-1])


def attend(cfg: ModelConfig, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B,T,H,hd] over the cache [B,KV,S,hd]; mask [B,T,S] bool -> [B,T,H*hd]."""
    probs = jax.nn.softmax(_scores(cfg, q, k_cache, mask), axis=-1).astype(q.dtype)
    return _weighted(probs, v_cache)


def attend_multi(cfg: ModelConfig, q: jax.Array, sets) -> jax.Array:
    """Attention over several K/V sets with one joint softmax (no concatenation of caches).
    sets: [(k [B,KV,S_i,hd], v [B,KV,S_i,hd], mask [B,T,S_i])] -> [B,T,H*hd]."""
    scores = [_scores(cfg, q, k, m) for k, _, m in sets]
    probs = jax.nn.softmax(jnp.concatenate(scores, -1), axis=-1).astype(q.dtype)
    out, off = 0.0, 0
    for (_, v, _), sc in zip(sets, scores):
        n = sc.shape[-1]
        out = out + _weighted(probs[..., off : off + n], v)
        off += n
    return out


def kernel_query(cfg: ModelConfig, q: jax.Array) -> jax.Array:
    """q for a block-attention kernel (the CPU kernels', Pallas'), which scale scores by head_dim**-0.5:
    a model with its own attention scale (GraniteMoE) gets q pre-scaled so the kernel computes it."""
    if cfg.attention_multiplier is None:
        return q
    return q * jnp.asarray(cfg.attention_multiplier * math.sqrt(q.shape[-1]), q.dtype)


def scale_logits(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    """Logits divided by the model's logits_scaling (GraniteMoE; 1 elsewhere: no op)."""
    return logits if cfg.logits_scaling == 1.0 else logits / cfg.logits_scaling


def block_mask(start: jax.Array, T: int, S: int, local: jax.Array | None = None) -> jax.Array:
    """Visibility [B, T, S] for a block of T new tokens written at slot start[b].

    A query sees every cached slot before its block, and within the block the
    slots allowed by `local` [T, T] (default causal; a draft tree passes its
    ancestor mask).
    """
    if local is None:
        local = jnp.tril(jnp.ones((T, T), bool))
    s = jnp.arange(S)[None, None, :]
    rel = s - start[:, None, None]  # [B, 1, S]
    in_block = (rel >= 0) & (rel < T)
    rel_c = jnp.clip(rel, 0, T - 1)
    loc = local[jnp.arange(T)[None, :, None], rel_c]  # [B, T, S]
    return (rel < 0) | (in_block & loc)
