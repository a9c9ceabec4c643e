"""M2R2 training objective (base frozen, adapters + router trained):

    L = sum_l w_l d(h_f^l, sg h_s^{t(l)}) + lambda_kd KL(p_s^tau || p_f^tau) tau^2 + lambda_r BCE(router)

Every term is averaged over the loss mask (answer tokens). Metrics include the
top-1 agreement of each fast layer with the full model (draft vocabulary) and
of the final fast layer over the full vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from m2r2_jax.config import ModelConfig
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config


def _rms(x):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def align_distance(a, b, metric: str):
    a, b = _rms(a), _rms(b)
    if metric == "cosine":
        return 1.0 - jnp.sum(a * b, -1) / a.shape[-1]  # RMS-normalised: |a|^2 = D
    return jnp.mean((a - b) ** 2, -1)


def masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def kd_kl(teacher_logits, student_logits, tau):
    pt = jax.nn.log_softmax(teacher_logits / tau, -1)
    ps = jax.nn.log_softmax(student_logits / tau, -1)
    return jnp.sum(jnp.exp(pt) * (pt - ps), -1) * tau * tau


def m2r2_loss(
    m2r2: dict, base: dict, tokens: jax.Array, mask: jax.Array, draft_ids: jax.Array, cfg: ModelConfig, mc: M2R2Config
):
    """tokens [B, T] int32, mask [B, T] float (1 on answer tokens). Returns (loss, metrics).

    With `mc.train_positions` = M > 0 the fast stream, heads and losses run on the first M
    loss positions of each row only (the slow pass still covers all T tokens): the same
    objective when no row has more than M loss positions, at a fraction of the cost."""
    mask = mask.astype(jnp.float32)
    select = None
    if mc.loss_width(tokens.shape[1]) < tokens.shape[1]:
        select, mask = S.loss_positions(mask, mc.train_positions)
    slow = S.slow_pass(cfg, base, tokens, select)
    return loss_from_slow(m2r2, base, tokens, mask, draft_ids, slow, select, cfg, mc)


def m2r2_loss_cached(
    m2r2: dict,
    base: dict,
    tokens: jax.Array,
    mask: jax.Array,
    draft_ids: jax.Array,
    hid: jax.Array,
    final: jax.Array,
    cfg: ModelConfig,
    mc: M2R2Config,
):
    """The same objective with the slow pass read from a teacher cache (training/teacher_cache.py):
    hid [B, n, T, D] = the slow states `mc.cached_layers` at every position, final [B, M, D] = h_s^N
    at the M loss positions. The fast layers' slow K/V are re-projected from the cached states
    (2 small matmuls per fast layer instead of the 30-layer forward)."""
    mask = mask.astype(jnp.float32)
    select, mask = S.loss_positions(mask, mc.loss_width(tokens.shape[1]))
    slow = S.slow_from_cache(cfg, mc, base, tokens, hid, final, select)
    return loss_from_slow(m2r2, base, tokens, mask, draft_ids, slow, select, cfg, mc)


def loss_from_slow(m2r2, base, tokens, mask, draft_ids, slow, select, cfg: ModelConfig, mc: M2R2Config):
    slow = jax.tree.map(jax.lax.stop_gradient, slow)
    # the teacher (slow pass, its logits) stays in cfg's precision; the student side may multiply in
    # mc.train_matmul_dtype (mixed precision: f32 params, residual stream and accumulation)
    cfg = dataclasses.replace(cfg, matmul_dtype=mc.train_matmul_dtype) if mc.train_matmul_dtype else cfg
    hs = S.fast_train_pass(cfg, mc, base, m2r2, tokens, slow, select=select)
    targets = mc.targets_of(cfg.num_layers)
    n = len(hs)
    teacher_top = jnp.argmax(slow.logits, -1)

    # alignment with the stop-gradient slow state at each target layer
    align = [masked_mean(align_distance(h, slow.hiddens[t], mc.align_metric), mask) for h, t in zip(hs, targets)]
    w = jnp.ones((n,)).at[-1].add(mc.align_final_weight)
    align_loss = jnp.sum(jnp.stack(align) * w) / jnp.sum(w)

    # KD on the fast stream's logits against the full model: over the full vocabulary, or
    # (kd_vocab=draft) over the draft head's vocabulary, the only logits a draft ever uses,
    # with the teacher renormalised over it (6x cheaper head forward + backward on SmolLM2)
    kd_ids = draft_ids if mc.kd_vocab == "draft" else None
    teacher = slow.logits if kd_ids is None else jnp.take(slow.logits, kd_ids, axis=-1)
    kd_layers = hs if mc.kd_layers == "all" else hs[-1:]
    student = [S.draft_logits(cfg, base, h, kd_ids) for h in kd_layers]
    kd_loss = jnp.mean(jnp.stack([masked_mean(kd_kl(teacher, lg, mc.kd_temperature), mask) for lg in student]))

    # router labels: does fast layer l's draft-vocab argmax equal the full model's token?
    per_layer_hit = []
    for h in hs:
        lg = jax.lax.stop_gradient(S.draft_logits(cfg, base, h, draft_ids))
        per_layer_hit.append(jnp.take(draft_ids, jnp.argmax(lg, -1)) == teacher_top)
    hits = jnp.stack(per_layer_hit, -1).astype(jnp.float32)  # [B, T, L]
    r_logits = S.arla_router(cfg, mc, m2r2["router"], hs, slow.hiddens[mc.branch])
    bce = jnp.mean(jnp.maximum(r_logits, 0) - r_logits * hits + jnp.log1p(jnp.exp(-jnp.abs(r_logits))), -1)
    router_loss = masked_mean(bce, mask)

    loss = mc.align_weight * align_loss + mc.kd_weight * kd_loss + mc.router_weight * router_loss
    # the final layer's full-vocabulary logits: the KD student's when KD uses them (computed once)
    final_lg = student[-1] if kd_ids is None else S.draft_logits(cfg, base, hs[-1], None)
    final_top = jnp.argmax(jax.lax.stop_gradient(final_lg), -1)
    agree_full = masked_mean((final_top == teacher_top).astype(jnp.float32), mask)
    router_acc = masked_mean(jnp.mean(((r_logits > 0) == (hits > 0.5)).astype(jnp.float32), -1), mask)
    metrics = {
        "loss": loss,
        "align": align_loss,
        "kd": kd_loss,
        "router_bce": router_loss,
        "agreement": agree_full,
        "router_acc": router_acc,
        "agreement_per_layer": jnp.stack([masked_mean(hits[..., i], mask) for i in range(n)]),
        "tokens": jnp.sum(mask),
    }
    return loss, metrics
