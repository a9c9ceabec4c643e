"""End-to-end distillation of a retrained MoE (the step after training/moe_retrain.py): KL(dense || MoE)
of the next-token distributions on the distilled answers, with only the layers' low-rank down-projection
deltas trained (the asset's down_a / down_b); attention, norms, embeddings, the routers and the split
experts stay frozen. The layer-by-layer fit matches each layer to its own target; this one lets all
layers' deltas move together toward the dense model's outputs.

Resumable: the deltas and Adam's state are Orbax checkpoints (training/checkpoint.py) every `save_every`
steps, at least every `save_minutes` of wall clock (10 at most) and at the end of a call; `max_minutes`
ends a call after the step that passes it (the budget of one call; the next resumes); the same call
resumes exactly (the data order is a function of the seed and the step). Metrics go to JSONL +
TensorBoard (training/metrics.py). train.moefy --e2e then writes the asset again with the new deltas
(everything else copied from the source).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import DELTA_EINSUM


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What defines the result (a resumed call must match it); when to save is the call's (`distill`)."""

    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    seed: int = 0

    def check(self) -> DistillConfig:
        for k in ("steps", "batch_size", "seq_len"):
            if getattr(self, k) < 1:
                raise M2R2Error(f"{k}={getattr(self, k)}: expected >= 1")
        if not np.isfinite(self.lr) or self.lr <= 0:
            raise M2R2Error(f"lr={self.lr}: expected a finite number > 0")
        return self


def student(base: dict, deltas: dict) -> dict:
    """The MoE params with each layer's down projections = split + down_a @ down_b (jnp)."""
    layers = []
    for i, layer in enumerate(base["layers"]):
        m = layer["mlp"]
        d = m["down"] + jnp.einsum(DELTA_EINSUM["down"], deltas["down_a"][i], deltas["down_b"][i])
        layers.append({**layer, "mlp": {**m, "down": d}})
    return {**base, "layers": layers}


def balance_factors(deltas: dict) -> dict:
    """The same deltas with each layer's two factors scaled to equal norm (a / s, b * s): the reduced-rank
    fit leaves b orthonormal and a carrying the scale, and Adam's per-entry steps would then move b
    far more, relative to its size, than a."""
    a, b = (np.asarray(deltas[n], np.float64) for n in ("down_a", "down_b"))
    na = np.sqrt(np.sum(a**2, axis=(1, 2, 3)))
    nb = np.sqrt(np.sum(b**2, axis=(1, 2)))
    s = np.sqrt(np.where(nb > 0, na / np.maximum(nb, 1e-30), 1.0))
    s = np.where(s > 0, s, 1.0)
    return {
        "down_a": (a / s[:, None, None, None]).astype(np.float32),
        "down_b": (b * s[:, None, None]).astype(np.float32),
    }


def kl_loss(moe_cfg, dense_cfg, deltas, base, dense, tokens, mask):
    """Mean KL(dense || MoE) over the positions predicting answer tokens (mask [B, T] on the answers)."""
    from m2r2_jax.model import decoder as D

    B, T = tokens.shape
    start = jnp.zeros((B,), jnp.int32)
    t_logits, _ = D.forward(dense_cfg, dense, tokens, D.init_cache(dense_cfg, B, T), start)
    s_logits, _ = D.forward(moe_cfg, student(base, deltas), tokens, D.init_cache(moe_cfg, B, T), start)
    sel = jnp.zeros_like(mask).at[:, :-1].set(mask[:, 1:])  # position t predicts token t + 1
    pt = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits), -1)
    kl = jnp.sum(jnp.exp(pt) * (pt - jax.nn.log_softmax(s_logits, -1)), -1)
    return jnp.sum(kl * sel) / jnp.maximum(jnp.sum(sel), 1.0)


def _optimizer(c: DistillConfig):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(optax.cosine_decay_schedule(c.lr, c.steps, 0.1)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _step(moe_cfg, dense_cfg, c: DistillConfig, params, state, base, dense, tok, m):
    """One Adam step (module-level: compiled once per configuration and shape, not once per call)."""
    loss, g = jax.value_and_grad(functools.partial(kl_loss, moe_cfg, dense_cfg))(params, base, dense, tok, m)
    upd, state = _optimizer(c).update(g, state, params)
    return optax.apply_updates(params, upd), state, loss


def distill(
    moe_cfg,
    base: dict,
    deltas: dict,
    dense_cfg,
    dense: dict,
    records,
    c: DistillConfig,
    out_dir,
    fingerprint: str,
    progress: bool = True,
    until: int | None = None,
    max_minutes: float | None = None,
    save_every: int = 10,
    save_minutes: float = 10.0,
) -> tuple[dict, dict]:
    """Train `deltas` ({down_a [L, E, Fe, r], down_b [L, r, D]}) of the MoE `base` (params with the split
    down projections) toward `dense`. Resumes from out_dir/checkpoints; `until` (a step) or `max_minutes`
    ends this call early, as an interruption would; a checkpoint every `save_every` steps and at least
    every `save_minutes`. -> (the deltas (numpy), summary)."""
    from m2r2_jax.data.batches import pack_examples
    from m2r2_jax.training.checkpoint import Checkpointer
    from m2r2_jax.training.metrics import Tracker

    c = c.check()
    if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
        raise M2R2Error(f"save_every={save_every!r}: expected an integer >= 1")
    if not 0 < save_minutes <= 10:
        raise M2R2Error(f"save_minutes={save_minutes}: expected in (0, 10]")
    if max_minutes is not None and not max_minutes > 0:
        raise M2R2Error(f"max_minutes={max_minutes}: expected > 0")
    if set(deltas) != {"down_a", "down_b"}:
        raise M2R2Error(f"end-to-end distillation trains down_a / down_b deltas; the asset holds {sorted(deltas)}")
    tokens, mask = pack_examples(records, c.seq_len)
    if len(tokens) < c.batch_size:
        raise M2R2Error(f"{len(tokens)} distilled records, fewer than one batch of {c.batch_size}")
    params = {n: jnp.asarray(v, jnp.float32) for n, v in balance_factors(deltas).items()}
    state = _optimizer(c).init(params)
    out = Path(out_dir)
    ck = Checkpointer(out / "checkpoints", save_every=save_every, keep=2)
    meta = {"kind": "moe_distill", "base": {"fingerprint": fingerprint}, "config": dataclasses.asdict(c)}
    start, spent = 0, 0.0
    last = ck.latest_step()
    if last is not None:
        old = ck.read_meta(last)
        if old["config"] != meta["config"] or old["base"].get("fingerprint") != fingerprint:
            raise M2R2Error(
                f"{out / 'checkpoints'} holds another distillation (config or base differs): use a new --out"
            )
        params, state, extra, _ = ck.restore(last, params, state, {"seconds": np.float64(0)})
        start, spent = last, float(extra["seconds"])
    tr = Tracker(out, resume_step=start)

    base = jax.tree.map(jnp.asarray, base)
    dense = jax.tree.map(jnp.asarray, dense)
    order = np.random.RandomState(c.seed).permutation(len(tokens) * (1 + c.steps * c.batch_size // len(tokens)))
    order %= len(tokens)
    end = c.steps if until is None else min(until, c.steps)
    t0 = t_saved = time.perf_counter()
    loss = None
    for i in tqdm(range(start, end), desc="moe distill", disable=not progress, initial=start, total=c.steps):
        idx = order[i * c.batch_size : (i + 1) * c.batch_size]
        tok, m = jnp.asarray(tokens[idx]), jnp.asarray(mask[idx])
        params, state, loss = _step(moe_cfg, dense_cfg, c, params, state, base, dense, tok, m)
        tr.log(i + 1, {"kl": loss})
        now = time.perf_counter()
        stop = max_minutes is not None and now - t0 > 60 * max_minutes
        force = i + 1 == end or stop or now - t_saved >= 60 * save_minutes
        if ck.save(
            i + 1, params, state, {"seconds": np.float64(spent + now - t0)}, dict(meta, step=i + 1), force=force
        ):
            t_saved = now
        if stop:
            end = i + 1
            break
    ck.close()
    tr.close()
    summary = {
        "steps": end,
        "finished": end == c.steps,
        "minutes": round((spent + time.perf_counter() - t0) / 60, 2),
        "last_kl": None if loss is None else float(loss),
        "trainable_params": int(sum(np.size(v) for v in params.values())),
        "records": len(tokens),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return {n: np.asarray(v) for n, v in params.items()}, summary
