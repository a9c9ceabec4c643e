"""Alignment evaluation: per fast layer, top-1 agreement with the full model
and mean KL, next to the base's plain early exit at the same depth.

Measured teacher-forced on the base's own greedy answers (answer tokens only),
with exactly the shared-KV attention the drafter uses at depth 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.model import decoder as D
from m2r2_jax.model.params import count_params
from m2r2_jax.stats import auc  # noqa: F401 (re-exported: callers read it here)


def _kl(p_logits, q_logits):
    lp = jax.nn.log_softmax(p_logits, -1)
    lq = jax.nn.log_softmax(q_logits, -1)
    return jnp.sum(jnp.exp(lp) * (lp - lq), -1)


def evaluate_alignment(
    cfg, base, mc: M2R2Config, m2r2, draft_ids, records, seq_len: int = 256, batch_size: int = 4
) -> dict:
    """records: [{prompt_ids, answer_ids}] -> per-layer agreement table."""
    from m2r2_jax.data.batches import pack_examples

    tokens, mask = pack_examples(records, seq_len)
    n = len(tokens)
    pad = (-n) % batch_size
    if pad:
        tokens = np.concatenate([tokens, np.zeros((pad, seq_len), np.int32)])
        mask = np.concatenate([mask, np.zeros((pad, seq_len), np.float32)])
    L = mc.n_fast(cfg.num_layers)
    tot = np.zeros((L, 6))
    count = 0.0
    sig = []  # (router logit, confidence, hit) per answer token and layer
    for i in range(0, len(tokens), batch_size):
        s, c, (r, cf, h) = _eval_batch(
            base,
            m2r2,
            jnp.asarray(tokens[i : i + batch_size]),
            jnp.asarray(mask[i : i + batch_size]),
            jnp.asarray(draft_ids),
            cfg,
            mc,
        )
        tot += np.asarray(s)
        count += float(c)
        sel = mask[i : i + batch_size] > 0
        sig.append(np.stack([np.asarray(r)[sel], np.asarray(cf)[sel], np.asarray(h)[sel]], -1))  # [n, L, 3]
    sig = np.concatenate(sig, 0) if sig else np.zeros((0, mc.n_fast(cfg.num_layers), 3))
    targets = mc.targets_of(cfg.num_layers)
    layers = []
    for l in range(L):
        a = tot[l] / max(count, 1.0)
        layers.append(
            {
                "fast_layer": l + 1,
                "target_layer": targets[l],
                "agreement": a[0],
                "draft_vocab_agreement": a[1],
                "baseline_agreement": a[2],
                "baseline_layer": l + 1 + mc.branch,
                "kl": a[3],
                "baseline_kl": a[4],
                "target_layer_exit_agreement": a[5],
                "router_auc": auc(sig[:, l, 0], sig[:, l, 2]),
                "confidence_auc": auc(sig[:, l, 1], sig[:, l, 2]),
            }
        )
    return {
        "layers": layers,
        "final_agreement": layers[-1]["agreement"],
        "final_draft_vocab_agreement": layers[-1]["draft_vocab_agreement"],
        "tokens": count,
    }


@functools.partial(jax.jit, static_argnames=("cfg", "mc"))
def _eval_batch(base, m2r2, tokens, mask, draft_ids, cfg, mc: M2R2Config):
    slow = S.slow_pass(cfg, base, tokens)
    hs = S.fast_train_pass(cfg, mc, base, m2r2, tokens, slow)
    top = jnp.argmax(slow.logits, -1)
    rows = []
    targets = mc.targets_of(cfg.num_layers)
    for l, h in enumerate(hs):
        fl = D.logits_from_hidden(cfg, base, h)
        dl = S.draft_logits(cfg, base, h, draft_ids)
        el = D.logits_from_hidden(cfg, base, slow.hiddens[mc.branch + l + 1])  # base exit at the same depth
        tl = D.logits_from_hidden(cfg, base, slow.hiddens[targets[l]])  # base exit at the target layer
        rows.append(
            jnp.stack(
                [
                    jnp.sum((jnp.argmax(fl, -1) == top) * mask),
                    jnp.sum((jnp.take(draft_ids, jnp.argmax(dl, -1)) == top) * mask),
                    jnp.sum((jnp.argmax(el, -1) == top) * mask),
                    jnp.sum(_kl(slow.logits, fl) * mask),
                    jnp.sum(_kl(slow.logits, el) * mask),
                    jnp.sum((jnp.argmax(tl, -1) == top) * mask),
                ]
            )
        )
    # exit signals for fast layer l: ARLA router logit vs the draft head's max probability
    router = S.arla_router(cfg, mc, m2r2["router"], hs, slow.hiddens[mc.branch])  # [B, T, L]
    conf, hit = [], []
    for h in hs:
        dl = S.draft_logits(cfg, base, h, draft_ids)
        conf.append(jnp.max(jax.nn.softmax(dl, -1), -1))
        hit.append(jnp.take(draft_ids, jnp.argmax(dl, -1)) == top)
    return jnp.stack(rows), jnp.sum(mask), (router, jnp.stack(conf, -1), jnp.stack(hit, -1))


def draft_weight_fraction(cfg, mc: M2R2Config, base: dict, m2r2: dict, draft_vocab_size: int) -> list[float]:
    """Per fast depth l: weights a draft through fast layers 1..l reads (the base layers it runs, their
    adapters and gains, the final norm and the draft head's rows) relative to one plain decode step (all
    base weights). Batch-1 decode on CPU/GPU is bound by these reads, so this is the draft's cost model."""
    size = count_params
    full = size(base)
    head = draft_vocab_size * cfg.hidden_size if draft_vocab_size else cfg.vocab_size * cfg.hidden_size
    layers = mc.base_layers(cfg.num_layers)
    out, acc = [], head + cfg.hidden_size
    for l, j in enumerate(layers):
        acc += size(base["layers"][j]) + size(m2r2["fast"][l])
        out.append(acc / full)
    return out
