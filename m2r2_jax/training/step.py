"""The sharded train step: frozen base and trainable M2R2 tree as separate jit
arguments; gradients and optimizer state for the trainable tree only; the
trainable tree and optimizer state are donated, the base never is."""

from __future__ import annotations

import functools

import jax
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.losses import m2r2_loss, m2r2_loss_cached
from m2r2_jax.m2r2.params import m2r2_spec
from m2r2_jax.model.params import logical_axes, model_spec
from m2r2_jax.sharding import named_sharding, replicated, tree_shardings


def lr_schedule(tc) -> optax.Schedule:
    """Warmup, then cosine decay to lr * end_lr_ratio at the planned last step `tc.steps` (a resumed or
    stopped run keeps the schedule of the run it belongs to)."""
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.lr, max(tc.warmup_steps, 1), max(tc.steps, tc.warmup_steps + 1), tc.lr * tc.end_lr_ratio
    )


def make_optimizer(tc) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on `lr_schedule(tc)`."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm), optax.adamw(lr_schedule(tc), weight_decay=tc.weight_decay)
    )


def train_shardings(mesh, cfg: ModelConfig, mc: M2R2Config, base, m2r2, batch_shape):
    return {
        "base": tree_shardings(mesh, logical_axes(model_spec(cfg)), base),
        "m2r2": tree_shardings(mesh, logical_axes(m2r2_spec(cfg, mc)), m2r2),
        "batch": named_sharding(mesh, ("batch", "seq"), batch_shape),
        "rep": replicated(mesh),
        "teacher_hid": named_sharding(
            mesh, ("batch", None, "seq", "act_embed"), (batch_shape[0], 1) + batch_shape[1:] + (1,)
        ),
        "teacher_final": named_sharding(mesh, ("batch", "seq", "act_embed"), batch_shape + (1,)),
    }


def make_train_step(
    cfg: ModelConfig,
    mc: M2R2Config,
    opt: optax.GradientTransformation,
    shardings=None,
    opt_shardings=None,
    cached: bool = False,
):
    """-> jitted step(m2r2, opt_state, base, tokens, mask, draft_ids) -> (m2r2, opt_state, metrics).

    cached: step(..., draft_ids, hid, final) reads the slow pass from a teacher cache."""

    def step(m2r2, opt_state, base, tokens, mask, draft_ids, *teacher):
        loss_fn = functools.partial(m2r2_loss_cached if cached else m2r2_loss, cfg=cfg, mc=mc)
        (_, met), grads = jax.value_and_grad(loss_fn, has_aux=True)(m2r2, base, tokens, mask, draft_ids, *teacher)
        updates, opt_state = opt.update(grads, opt_state, m2r2)
        m2r2 = optax.apply_updates(m2r2, updates)
        met = dict(met, grad_norm=optax.tree.norm(grads))
        return m2r2, opt_state, met

    kw = {}
    if shardings is not None:
        s = shardings
        extra = (s["teacher_hid"], s["teacher_final"]) if cached else ()
        kw = dict(
            in_shardings=(s["m2r2"], opt_shardings, s["base"], s["batch"], s["batch"], s["rep"]) + extra,
            out_shardings=(s["m2r2"], opt_shardings, s["rep"]),
        )
    return jax.jit(step, donate_argnums=(0, 1), **kw)


def init_opt_state(opt, m2r2, mesh):
    """Optimizer state placed like the params it mirrors (jit propagates their shardings);
    scalars (step counts) replicated over the mesh."""
    state = jax.jit(opt.init)(m2r2)
    rep = replicated(mesh)
    state = jax.tree.map(
        lambda x: (
            x
            if isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
            else jax.device_put(x, rep)
        ),
        state,
    )
    return state, jax.tree.map(lambda x: x.sharding, state)
