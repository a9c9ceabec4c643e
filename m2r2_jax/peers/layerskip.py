"""LayerSkip-style early exit on a frozen base (Elhoushi et al. 2024, adapted): LoRA adapters (rank r)
on the base layers below the deepest exit layer, trained so that the shared final norm + LM head read
the full model's next token off layer E (an early-exit KL loss at each exit layer E) while the adapted
model's own last layer stays close to the original (a full-depth KL term). LayerSkip fine-tunes the
whole model with layer dropout and a curriculum; here only the adapters train (the base stays frozen),
and decoding runs the adapted weights merged (`merged_base`) with the static exit at E.

Params: the M2R2 tree's `fast` list layout (per base layer 0 .. n-1: adapters a [in, rank], b [rank,
out] on q k v o gate up down; no gains), so `stream.merge_fast_layer` folds them in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2


@dataclasses.dataclass(frozen=True)
class LayerSkipConfig:
    layers: tuple[int, ...] = (20, 24, 27, 29)  # exit layers (after this many base layers)
    rank: int = 16
    full_weight: float = 1.0  # the full-depth KL term
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 160
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "seq_len", "positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"{name} must be an integer >= 1, got {v!r}")
        if not self.layers:
            raise M2R2Error("layerskip: at least one exit layer")
        if not (self.lr > 0 and self.full_weight >= 0):
            raise M2R2Error("layerskip: lr must be > 0 and full_weight >= 0")

    def adapter_config(self) -> M2R2Config:
        return M2R2Config(rate=1, num_fast_layers=max(self.layers), rank=self.rank, gain=False, layer_map="prefix")


def init_adapters(cfg: ModelConfig, lc: LayerSkipConfig) -> list:
    return init_m2r2(cfg, lc.adapter_config().validate(cfg.num_layers), jax.random.key(lc.seed))["fast"]


def merged_base(base: dict, adapters: list) -> dict:
    """The base with the adapters folded into layers 0 .. len(adapters)-1."""
    layers = list(base["layers"])
    for j, ad in enumerate(adapters):
        layers[j] = S.merge_fast_layer(layers[j], ad)
    return dict(base, layers=layers)


def optimizer(lc: LayerSkipConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, lc.lr, max(1, lc.steps // 20), lc.steps, lc.lr * 0.05)
    return optax.adamw(sched, weight_decay=0.0)


def make_step(cfg: ModelConfig, lc: LayerSkipConfig, opt):
    def kl(t, logits, m):
        s = jax.nn.log_softmax(logits, -1)
        return jnp.sum(jnp.sum(jnp.exp(t) * (t - s), -1) * m) / jnp.maximum(jnp.sum(m), 1.0)

    def loss_fn(ads, base, tokens, mask):
        sel, m = S.loss_positions(mask, min(lc.positions, tokens.shape[1]))
        t = jax.nn.log_softmax(jax.lax.stop_gradient(S.slow_pass(cfg, base, tokens, select=sel).logits), -1)
        mb = merged_base(base, ads)
        slow = S.slow_pass(cfg, mb, tokens, select=sel)
        per = [kl(t, S.draft_logits(cfg, mb, slow.hiddens[E], None), m) for E in lc.layers]
        full = kl(t, slow.logits, m)
        return sum(per) + lc.full_weight * full, (jnp.stack(per), full)

    @jax.jit
    def step(ads, opt_state, base, tokens, mask):
        (loss, (per, full)), g = jax.value_and_grad(loss_fn, has_aux=True)(ads, base, tokens, mask)
        upd, opt_state = opt.update(g, opt_state, ads)
        return optax.apply_updates(ads, upd), opt_state, loss, per, full

    return step
