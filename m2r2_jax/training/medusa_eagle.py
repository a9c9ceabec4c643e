"""Training Medusa-1's heads (peers/medusa.py) and EAGLE's draft layer (peers/eagle.py) on a
self-distillation cache, base frozen, through the trained peers' one loop (`spec_peers._train_draft`:
Orbax checkpoints at least every `save_minutes` and at the end of a call, the base named by its
signature, trainable parameters and training minutes in the meta for eval.compare; metrics JSONL +
TensorBoard, tqdm, exact resume, `budget_minutes` of training over all calls).

Each step runs the frozen base once over the batch (teacher-forced, no gradient) for its final hidden
states, then the peer's loss on them: the trainable tree and the base are separate jit arguments.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.model import decoder as D
from m2r2_jax.peers import eagle as E
from m2r2_jax.peers import medusa as M
from m2r2_jax.training.spec_peers import RunLimits, _train_draft, identity_of

MEDUSA_METRICS = ("ce", "top1_head0", "top1_last_head")
EAGLE_METRICS = ("loss", "feature_l1", "ce", "top1")


def base_hidden(cfg: ModelConfig, base: dict, tokens: jax.Array) -> jax.Array:
    """The frozen base's final states [B, T, D] (before the final norm), teacher-forced, no gradient."""
    B, T = tokens.shape
    h, _, _ = D.forward_hidden(cfg, base, tokens, D.init_cache(cfg, B, T), jnp.zeros((B,), jnp.int32))
    return jax.lax.stop_gradient(h)


def medusa_step(cfg: ModelConfig, mc: M.MedusaConfig, opt):
    def loss_fn(heads, base, tokens, mask):
        return M.medusa_loss(cfg, mc, heads, base_hidden(cfg, base, tokens), base, tokens, mask)

    @jax.jit
    def step(heads, opt_state, base, tokens, mask):
        (loss, (_, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(heads, base, tokens, mask)
        upd, opt_state = opt.update(g, opt_state, heads)
        return optax.apply_updates(heads, upd), opt_state, loss, acc[0], acc[-1]

    return step


def eagle_step(cfg: ModelConfig, ec: E.EagleConfig, opt):
    def loss_fn(params, base, tokens, mask):
        # the noise key: a function of the seed and the batch, so a resumed run draws the same noise
        T = tokens.shape[1]
        salt = jnp.sum(tokens * (1 + jnp.arange(T, dtype=tokens.dtype))[None])
        key = jax.random.fold_in(jax.random.key(ec.seed), salt)
        return E.eagle_loss(cfg, ec, params, base_hidden(cfg, base, tokens), base, tokens, mask, key)

    @jax.jit
    def step(params, opt_state, base, tokens, mask):
        (loss, (vloss, ploss, acc)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, base, tokens, mask)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss, vloss, ploss, acc

    return step


def train_medusa(
    cfg: ModelConfig,
    base: dict,
    records: Sequence[dict],
    mc: M.MedusaConfig,
    out_dir,
    model_name: str = "",
    fingerprint: str = "",
    limits: RunLimits | None = None,
    progress: bool = True,
) -> dict:
    """Train the heads (cross-entropy to the distilled answers' tokens) -> summary | {"heads"}."""
    opt = M.optimizer(mc)
    heads, summary = _train_draft(
        M.KIND,
        cfg,
        base,
        records,
        mc,
        M.init_heads(cfg, mc.heads, mc.seed),
        opt,
        medusa_step(cfg, mc, opt),
        MEDUSA_METRICS,
        out_dir,
        identity_of(model_name, cfg, base, fingerprint),
        limits or RunLimits(),
        progress,
        {},
    )
    return summary | {"heads": heads}


def train_eagle(
    cfg: ModelConfig,
    base: dict,
    records: Sequence[dict],
    ec: E.EagleConfig,
    out_dir,
    model_name: str = "",
    fingerprint: str = "",
    limits: RunLimits | None = None,
    progress: bool = True,
) -> dict:
    """Train the draft layer (feature regression + token cross-entropy) -> summary | {"draft"}."""
    E.check_base(cfg)
    opt = E.optimizer(ec)
    draft, summary = _train_draft(
        E.KIND,
        cfg,
        base,
        records,
        ec,
        E.init_draft(cfg, ec.seed),
        opt,
        eagle_step(cfg, ec, opt),
        EAGLE_METRICS,
        out_dir,
        identity_of(model_name, cfg, base, fingerprint),
        limits or RunLimits(),
        progress,
        {},
    )
    return summary | {"draft": draft}
