"""What the trained peers' parts share (exit_head, kangaroo, sps, medusa, eagle): the checks of their run
configs, the optimizer, the jitted training step, the copy of base weights they start from, and the
soft cross-entropy that distils a draft to the full model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from m2r2_jax.errors import M2R2Error
from m2r2_jax.kernels import PackedWeight
from m2r2_jax.model import layers as L


def check_run(c, names, label: str = "", lr_max: float | None = None) -> None:
    """One error line unless the fields `names` of c are integers >= 1 and c.lr is a number > 0 (below
    lr_max when given); `label` prefixes the message."""
    pre = f"{label}: " if label else ""
    for name in names:
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise M2R2Error(f"{pre}{name} must be an integer >= 1, got {v!r}")
    if not (isinstance(c.lr, (int, float)) and 0 < c.lr and (lr_max is None or c.lr < lr_max)):
        raise M2R2Error(f"{pre}lr must be {'> 0' if lr_max is None else f'in (0, {lr_max:g})'}, got {c.lr!r}")


def optimizer(c, clip: bool) -> optax.GradientTransformation:
    """AdamW (no weight decay) on a warmup-cosine schedule over c.steps (warmup c.steps // 20, down to 5%
    of c.lr), after a global-norm clip at 1.0 when `clip`."""
    sched = optax.warmup_cosine_decay_schedule(0.0, c.lr, max(1, c.steps // 20), c.steps, c.lr * 0.05)
    adamw = optax.adamw(sched, weight_decay=0.0)
    return optax.chain(optax.clip_by_global_norm(1.0), adamw) if clip else adamw


def train_step(loss_fn, opt):
    """loss_fn(params, base, tokens, mask) -> (loss, aux tuple) -> the jitted
    step(params, opt_state, base, tokens, mask) -> (params, opt_state, loss, *aux). The trainable tree and
    the frozen base are separate arguments; only the trainable tree is differentiated and updated."""

    @jax.jit
    def step(params, opt_state, base, tokens, mask):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(params, base, tokens, mask)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss, *aux

    return step


def copy_dense(tree):
    """A copy of base weights as plain arrays (packed weights unpacked): a trainable part's start."""
    return jax.tree.map(lambda x: jnp.array(L.dense(x)), tree, is_leaf=lambda x: isinstance(x, PackedWeight))


def soft_ce(full_logits, draft_logits, m):
    """-> (soft cross-entropy of the draft to the full model's softmax, KL, top-1 agreement), masked means."""
    t = jax.nn.log_softmax(full_logits, -1)
    s = jax.nn.log_softmax(draft_logits, -1)
    pt = jnp.exp(t)
    n = jnp.maximum(jnp.sum(m), 1.0)
    ce = -jnp.sum(pt * s, -1)
    kl = jnp.sum(pt * (t - s), -1)
    agree = (jnp.argmax(full_logits, -1) == jnp.argmax(draft_logits, -1)).astype(jnp.float32)
    return jnp.sum(ce * m) / n, jnp.sum(kl * m) / n, jnp.sum(agree * m) / n
