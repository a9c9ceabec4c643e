"""Training Medusa-1's heads (peers/medusa.py) and EAGLE's draft layer (peers/eagle.py) on a
self-distillation cache, base frozen, through the trained peers' one loop (`spec_peers.train_peer`:
Orbax checkpoints at least every `save_minutes` and at the end of a call, the base named by its
signature, trainable parameters and training minutes in the meta for eval.compare; metrics JSONL +
TensorBoard, tqdm, exact resume, `budget_minutes` of training over all calls).

Each step runs the frozen base once over the batch (teacher-forced, no gradient) for its final hidden
states, then the peer's loss on them: the trainable tree and the base are separate jit arguments.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from m2r2_jax.config import ModelConfig
from m2r2_jax.model import decoder as D
from m2r2_jax.peers import eagle as E
from m2r2_jax.peers import medusa as M
from m2r2_jax.peers.common import train_step
from m2r2_jax.training.spec_peers import Peer, train_peer

MEDUSA_METRICS = ("ce", "top1_head0", "top1_last_head")
EAGLE_METRICS = ("loss", "feature_l1", "ce", "top1")


def base_hidden(cfg: ModelConfig, base: dict, tokens: jax.Array) -> jax.Array:
    """The frozen base's final states [B, T, D] (before the final norm), teacher-forced, no gradient."""
    B, T = tokens.shape
    h, _, _ = D.forward_hidden(cfg, base, tokens, D.init_cache(cfg, B, T), jnp.zeros((B,), jnp.int32))
    return jax.lax.stop_gradient(h)


def medusa_step(cfg: ModelConfig, mc: M.MedusaConfig, opt):
    def loss_fn(heads, base, tokens, mask):
        loss, (_, acc) = M.medusa_loss(cfg, mc, heads, base_hidden(cfg, base, tokens), base, tokens, mask)
        return loss, (acc[0], acc[-1])

    return train_step(loss_fn, opt)


def eagle_step(cfg: ModelConfig, ec: E.EagleConfig, opt):
    def loss_fn(params, base, tokens, mask):
        # the noise key: a function of the seed and the batch, so a resumed run draws the same noise
        T = tokens.shape[1]
        salt = jnp.sum(tokens * (1 + jnp.arange(T, dtype=tokens.dtype))[None])
        key = jax.random.fold_in(jax.random.key(ec.seed), salt)
        return E.eagle_loss(cfg, ec, params, base_hidden(cfg, base, tokens), base, tokens, mask, key)

    return train_step(loss_fn, opt)


def medusa_peer(cfg: ModelConfig, base: dict, mc: M.MedusaConfig) -> Peer:
    """Medusa's heads, cross-entropy to the distilled answers' tokens (summary key "heads")."""
    opt = M.optimizer(mc)
    return Peer(M.KIND, M.init_heads(cfg, mc.heads, mc.seed), opt, medusa_step(cfg, mc, opt), MEDUSA_METRICS, "heads")


def eagle_peer(cfg: ModelConfig, base: dict, ec: E.EagleConfig) -> Peer:
    """EAGLE's draft layer, feature regression + token cross-entropy (summary key "draft")."""
    E.check_base(cfg)
    opt = E.optimizer(ec)
    return Peer(E.KIND, E.init_draft(cfg, ec.seed), opt, eagle_step(cfg, ec, opt), EAGLE_METRICS, "draft")


# train_medusa / train_eagle(cfg, base, records, config, out_dir, model_name="", fingerprint="", limits=None,
# progress=True) -> summary | {"heads" / "draft": ...}
train_medusa = functools.partial(train_peer, medusa_peer)
train_eagle = functools.partial(train_peer, eagle_peer)
