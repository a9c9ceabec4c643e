"""SkipDecode (Del Corro et al. 2023) on a frozen base: one depth per generated position for the whole
batch, decreasing monotonically along the generation, spent on the *upper* layers: the token's
embedding enters the stack at layer N - depth and runs to the top and the shared final norm + LM head.
Because depth never increases, a later token never runs a layer that an earlier generated token
skipped, so no cache slot it reads is missing (no K/V to propagate or recompute); the prompt runs the
full depth.

The schedule (`depth_at`): the token decided at step i (i = 1 for the first token after the one
prefill produces) runs depth(i) = N - floor((N - d_min) * min(1, (i - 1) / span)) layers: the full
model first, d_min from `span` steps on. d_min is the method's threshold.

SkipDecode fine-tunes the model for its schedule; here LoRA adapters (rank r) on every base layer learn
it with the base frozen: a KL loss to the full model's next-token distribution on the self-distilled
answers, each row's d_min drawn from `min_layers` (one set of adapters serves the whole sweep).
Decoding runs the adapters merged (`layerskip.merged_base`), prompt included.

Params: the M2R2 tree's `fast` list layout over all N base layers (peers/layerskip.py).
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
from m2r2_jax.model import decoder as D
from m2r2_jax.peers.layerskip import merged_base


@dataclasses.dataclass(frozen=True)
class SkipDecodeConfig:
    min_layers: tuple[int, ...] = (8, 12, 16, 20)  # the d_min values trained for (the eval's thresholds)
    span: int = 64  # generated tokens over which the depth falls from N to d_min
    rank: int = 16
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 160
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("span", "rank", "steps", "batch_size", "seq_len", "positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"{name} must be an integer >= 1, got {v!r}")
        if not self.min_layers or any(isinstance(d, bool) or not isinstance(d, int) for d in self.min_layers):
            raise M2R2Error(f"skipdecode: min_layers must be integers, got {self.min_layers!r}")
        if not self.lr > 0:
            raise M2R2Error("skipdecode: lr must be > 0")

    @property
    def layers(self) -> tuple[int, ...]:
        """The depths trained for (the peers' training loop checks them like exit layers)."""
        return self.min_layers

    def adapter_config(self, num_layers: int) -> M2R2Config:
        return M2R2Config(rate=1, num_fast_layers=num_layers, rank=self.rank, gain=False, layer_map="prefix")


def depth_at(num_layers: int, d_min, span: int, i):
    """Layers the token decided at step i runs (module doc); i and d_min may be traced."""
    N = num_layers
    frac = jnp.minimum(1.0, jnp.maximum(i - 1, 0).astype(jnp.float32) / span)
    d_min = jnp.clip(jnp.round(d_min).astype(jnp.int32), 1, N)
    return N - jnp.floor((N - d_min) * frac).astype(jnp.int32)


def init_adapters(cfg: ModelConfig, sc: SkipDecodeConfig) -> list:
    mc = sc.adapter_config(cfg.num_layers).validate(cfg.num_layers)
    return init_m2r2(cfg, mc, jax.random.key(sc.seed))["fast"]


def entry_layers(cfg: ModelConfig, mask: jax.Array, d_min: jax.Array, span: int) -> jax.Array:
    """Per position, the layer its token enters at, [B, T] int32: 0 on the prompt; answer token a (the
    input of decode step i = a + 1) enters at N - depth(i). mask [B, T] marks the answer tokens."""
    a = jnp.cumsum(mask > 0, axis=1) - 1  # answer index at answer positions
    depth = depth_at(cfg.num_layers, d_min[:, None], span, a + 1)
    return jnp.where(mask > 0, cfg.num_layers - depth, 0).astype(jnp.int32)


def skip_forward(cfg: ModelConfig, params: dict, tokens: jax.Array, entry: jax.Array) -> jax.Array:
    """Teacher-forced forward where position t's state stays its embedding below layer entry[b, t]
    -> the final states [B, T, D]. Exact for monotone entries: a position that runs layer l reads
    there only positions that ran it too (the others' K/V at l are computed but never attended)."""
    B, T = tokens.shape
    cache = D.init_cache(cfg, B, T)
    start = jnp.zeros((B,), jnp.int32)
    h = D.embed(cfg, params, tokens)
    for lay in range(cfg.num_layers):
        h_new, cache, _ = D.forward_hidden(cfg, params, tokens, cache, start, layer_range=(lay, lay + 1), h=h)
        h = jnp.where((lay >= entry)[..., None], h_new, h)
    return h


def optimizer(sc: SkipDecodeConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, sc.lr, max(1, sc.steps // 20), sc.steps, sc.lr * 0.05)
    return optax.adamw(sched, weight_decay=0.0)


def make_step(cfg: ModelConfig, sc: SkipDecodeConfig, opt):
    """step(adapters, opt_state, base, tokens, mask) -> (adapters, opt_state, loss): KL to the full
    model at the first `positions` answer positions; row b's d_min = min_layers[(step-independent) b %
    len(min_layers)], so every batch trains every depth."""
    choices = jnp.asarray(sc.min_layers, jnp.int32)

    def loss_fn(ads, base, tokens, mask):
        sel, m = S.loss_positions(mask, min(sc.positions, tokens.shape[1]))
        t = jax.nn.log_softmax(jax.lax.stop_gradient(S.slow_pass(cfg, base, tokens, select=sel).logits), -1)
        d_min = choices[jnp.arange(tokens.shape[0]) % len(sc.min_layers)]
        params = merged_base(base, ads)
        h = skip_forward(cfg, params, tokens, entry_layers(cfg, mask, d_min, sc.span))
        s = jax.nn.log_softmax(D.logits_from_hidden(cfg, params, S.gather_positions(h, sel)), -1)
        return jnp.sum(jnp.sum(jnp.exp(t) * (t - s), -1) * m) / jnp.maximum(jnp.sum(m), 1.0)

    @jax.jit
    def step(ads, opt_state, base, tokens, mask):
        loss, g = jax.value_and_grad(loss_fn)(ads, base, tokens, mask)
        upd, opt_state = opt.update(g, opt_state, ads)
        return optax.apply_updates(ads, upd), opt_state, loss

    return step
