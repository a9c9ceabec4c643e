"""The two residual streams, as functions over the Flax modules of m2r2/modules.py.

Slow stream: the unmodified base (frozen). Fast stream: from h_s^b, L_f layers,
each a frozen base layer plus accelerator adapters and gains; fast layer l
targets slow layer t(l). Shared KV cache: at fast layer l (base layer j) a
token attends to the slow stream's layer-j K/V of the tokens before it, and to
the fast stream's own K/V only for the tokens being processed now (a small
local buffer, never a second full-length cache).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2r2_jax import kernels as K
from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.modules import ARLARouter, FastStream
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import SetsAttention
from m2r2_jax.model.modules import Attention, DraftHead
from m2r2_jax.model.params import module_tree


class SlowPass(NamedTuple):
    hiddens: list  # h_s^0 .. h_s^N, each [B, T, D]
    cache: D.KVCache  # per-layer K/V of every token (length T)
    logits: jax.Array  # [B, T, V] full model


def slow_pass(cfg: ModelConfig, base: dict, tokens: jax.Array, select: jax.Array | None = None) -> SlowPass:
    """Teacher-forced full forward collecting states and K/V (no gradients flow here).

    `select` [B, M] (token indices per row): `hiddens` and `logits` are returned at those
    positions only (the cache always covers all T tokens: it is the context)."""
    B, T = tokens.shape
    cache = D.init_cache(cfg, B, T)
    h0 = D.embed(cfg, base, tokens)
    h, cache, hs = D.forward_hidden(cfg, base, tokens, cache, jnp.zeros((B,), jnp.int32), h=h0, collect=True)
    hiddens = [h0] + hs
    if select is not None:
        hiddens = [gather_positions(x, select) for x in hiddens]
        h = hiddens[-1]
    return SlowPass(hiddens, cache, D.logits_from_hidden(cfg, base, h))


def slow_from_cache(
    cfg: ModelConfig, mc: M2R2Config, base: dict, tokens: jax.Array, hid: jax.Array, final: jax.Array, select: jax.Array
) -> SlowPass:
    """The SlowPass that `slow_pass(cfg, base, tokens, select)` would return, rebuilt from cached
    slow states (hid [B, n, T, D]: layers `mc.cached_layers`; final [B, M, D]: h_s^N at `select`).
    Only what the fast stream and the losses read is filled in: the K/V of the fast layers' base
    layers (re-projected from their cached inputs exactly as the base layer projects them) and the
    states at the branch and the targets; the other entries are None."""
    N = cfg.num_layers
    B, T = tokens.shape
    dt = cfg.jnp_dtype
    full = {0: D.embed(cfg, base, tokens)}
    full.update({j: hid[:, i].astype(dt) for i, j in enumerate(mc.cached_layers(N))})
    cos, sin = L.rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T)))
    ks, vs = [None] * N, [None] * N
    for j in mc.base_layers(N):
        lp = base["layers"][j]
        x = L.rms_norm(full[j], lp["attn_norm"], cfg.rms_norm_eps)
        ks[j], vs[j] = Attention(cfg).apply({"params": lp["attn"]}, x, cos, sin, method="project_kv")
    hiddens = [gather_positions(full[j], select) if j in full else None for j in range(N)]
    h = final.astype(dt)
    hiddens.append(h)
    return SlowPass(hiddens, D.KVCache(ks, vs), D.logits_from_hidden(cfg, base, h))


def gather_positions(x: jax.Array, select: jax.Array) -> jax.Array:
    """x [B, T, ...], select [B, M] -> [B, M, ...]."""
    return jnp.take_along_axis(x, select.reshape(select.shape + (1,) * (x.ndim - 2)), axis=1)


def loss_positions(mask: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
    """The first `m` positions of each row where mask > 0, in order (padded with masked-out
    positions when a row has fewer): -> (select [B, m] int32, mask [B, m])."""
    on = mask > 0
    select = jnp.argsort(~on, axis=1, stable=True)[:, :m].astype(jnp.int32)
    return select, jnp.take_along_axis(mask, select, axis=1)


def fast_stream(
    cfg: ModelConfig,
    mc: M2R2Config,
    base: dict,
    m2r2: dict,
    h_branch: jax.Array,
    slow_cache: D.KVCache,
    m_slow: jax.Array,
    m_local: jax.Array,
    positions: jax.Array,
    depth: int | None = None,
) -> list:
    """Run the first `depth` (default all L_f) fast layers; returns [h_f^1, ..., h_f^depth]. A token reads
    the slow K/V visible under `m_slow` [B, T, S] and the block's own fast K/V under `m_local` [B, T, T]."""
    cos, sin = L.rope_cos_sin(cfg, positions)
    layers = mc.base_layers(cfg.num_layers)[: depth or None]

    def attention_for(l):
        j = layers[l]
        return SetsAttention(cfg, XLA, sets=[(slow_cache.k[j], slow_cache.v[j], m_slow)], self_mask=m_local)

    hs, _ = FastStream(cfg, mc).apply(
        {"params": module_tree(m2r2["fast"])},
        [base["layers"][j] for j in layers],
        h_branch,
        cos,
        sin,
        attention_for,
        len(layers),
    )
    return hs


def teacher_forced_masks(B: int, T: int):
    """Training: token t sees slow K/V of tokens < t and its own fast K/V (= drafting at depth 1)."""
    idx = jnp.arange(T)
    m_slow = jnp.broadcast_to(idx[None, :] < idx[:, None], (B, T, T))
    m_local = jnp.broadcast_to(jnp.eye(T, dtype=bool), (B, T, T))
    return m_slow, m_local


def fast_train_pass(
    cfg: ModelConfig,
    mc: M2R2Config,
    base: dict,
    m2r2: dict,
    tokens: jax.Array,
    slow: SlowPass,
    depth: int | None = None,
    select: jax.Array | None = None,
) -> list:
    """Teacher-forced fast stream. With `select` [B, M] (and a `slow` pass made with the same
    `select`) it runs on those M positions only: a fast token reads the slow K/V of the tokens
    before it and its own fast K/V, never another position's fast state, so this equals the
    full pass at those positions (tested) at M/T of the cost."""
    B, T = tokens.shape
    if select is None:
        m_slow, m_local = teacher_forced_masks(B, T)
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    else:
        M = select.shape[1]
        positions = select
        m_slow = jnp.arange(T)[None, None, :] < select[:, :, None]
        m_local = jnp.broadcast_to(jnp.eye(M, dtype=bool), (B, M, M))
    h_b = jax.lax.stop_gradient(slow.hiddens[mc.branch])
    cache = jax.tree.map(jax.lax.stop_gradient, slow.cache)
    return fast_stream(cfg, mc, base, m2r2, h_b, cache, m_slow, m_local, positions, depth)


_TARGET_WEIGHT = {
    "q": ("attn", "wq"),
    "k": ("attn", "wk"),
    "v": ("attn", "wv"),
    "o": ("attn", "wo"),
    "gate": ("mlp", "gate"),
    "up": ("mlp", "up"),
    "down": ("mlp", "down"),
}


def merge_fast_layer(lp: dict, ad: dict) -> dict:
    """The base layer's params with the accelerator adapters folded in (W + A B) and the gains
    folded into the output projections (gain * (x W_o) = x (W_o * gain)). Same function up to
    float rounding, but one matmul per projection instead of three: the drafting path uses it
    (verification never does, so losslessness does not depend on it). Weights packed for the
    CPU kernel are merged in their packed layout."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in lp.items()}
    for t, (blk, name) in _TARGET_WEIGHT.items():
        if t in ad:
            ab = (
                ad[t]["d"].astype(jnp.float32)
                if "d" in ad[t]
                else ad[t]["a"].astype(jnp.float32) @ ad[t]["b"].astype(jnp.float32)
            )
            out[blk][name] = L.add_to_weight(out[blk][name], ab)
    for g, (blk, name) in (("gain_attn", ("attn", "wo")), ("gain_mlp", ("mlp", "down"))):
        if g in ad:  # an MoE MLP: every expert's down [E, F, D] (the last axis scaled) and the shared expert's
            out[blk][name] = L.scale_columns(out[blk][name], ad[g])
            if blk == "mlp" and "shared" in out["mlp"]:
                shared = dict(out["mlp"]["shared"])
                shared["down"] = L.scale_columns(shared["down"], ad[g])
                out["mlp"]["shared"] = shared
    return out


def draft_params(
    cfg: ModelConfig,
    mc: M2R2Config,
    base: dict,
    m2r2: dict,
    draft_ids: jax.Array | None,
    depth: int | None = None,
    backend: Backend = XLA,
) -> dict:
    """What drafting reads, built once per checkpoint: the first `depth` fast layers with their
    adapters merged, the final norm, and the LM head rows of the draft vocabulary ([Vd, D]; packed
    for the CPU kernels on that backend)."""
    mc.for_base(cfg)  # an MoE layer's experts take no adapter: they are read as the base's
    layers = mc.base_layers(cfg.num_layers)[: depth or None]
    head = draft_head(cfg, base, draft_ids)
    return {
        "layers": [merge_fast_layer(base["layers"][j], m2r2["fast"][l]) for l, j in enumerate(layers)],
        "final_norm": base["final_norm"],
        "head": K.pack_rows(head) if backend.kernels else head,
    }


def draft_head(cfg: ModelConfig, base: dict, draft_ids: jax.Array | None) -> jax.Array:
    """The LM head's rows [Vd, D] for the draft vocabulary (all rows when None)."""
    if cfg.tie_word_embeddings:
        return base["embed"] if draft_ids is None else jnp.take(base["embed"], draft_ids, axis=0)
    head = L.dense(base["lm_head"])
    return (head if draft_ids is None else jnp.take(head, draft_ids, axis=1)).T


def draft_head_logits(cfg: ModelConfig, dp: dict, h: jax.Array) -> jax.Array:
    """Final norm + the draft head of `draft_params` -> [B, T, Vd] f32 (`DraftHead`)."""
    return DraftHead(cfg).apply({"params": {"final_norm": dp["final_norm"], "head": dp["head"]}}, h)


def draft_logits(cfg: ModelConfig, base: dict, h: jax.Array, draft_ids: jax.Array | None) -> jax.Array:
    """Final norm + LM head on a fast state; over the draft vocabulary subset when given."""
    if draft_ids is None:
        return D.logits_from_hidden(cfg, base, h)
    return draft_head_logits(cfg, {"final_norm": base["final_norm"], "head": draft_head(cfg, base, draft_ids)}, h)


def arla_router(cfg: ModelConfig, mc: M2R2Config, rp: dict, fast_hs: list, h_branch: jax.Array) -> jax.Array:
    """ARLA router logits [B, T, L] ("this token is already resolved at fast layer l"); see `ARLARouter`."""
    return ARLARouter(cfg, mc).apply({"params": rp}, fast_hs, h_branch)
