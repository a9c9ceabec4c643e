"""A trained exit head for static early exit: at base layer E, a residual low-rank adapter on the state
(h + (rms_norm(h) a) b, b zero-initialised) before the frozen final norm and LM head, distilled to the
full model's next-token distribution on the self-distilled answers. One head per exit layer in one
param tree (stacked [n_exits, ...]); the base stays frozen.

    ExitHeads   norm [n, embed], a [n, embed, rank], b [n, rank, embed]
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.modules import declare, ones, zeros
from m2r2_jax.peers import common as C


class ExitHeads(nn.Module):
    cfg: ModelConfig
    n: int
    rank: int

    @nn.compact
    def __call__(self, h, idx):
        """h [B, T, D] at exit layer `layers[idx]` -> the adapted state (then final norm + LM head)."""
        D_ = self.cfg.hidden_size
        norm = ones(self, "norm", (self.n, D_), (None, "norm"))
        a = declare(self, "a", (self.n, D_, self.rank), (None, "embed", "rank"), init=nn.initializers.normal(D_**-0.5))
        b = zeros(self, "b", (self.n, self.rank, D_), (None, "rank", "embed"))
        x = L.rms_norm(h, norm[idx], self.cfg.rms_norm_eps)
        return h + ((x @ a[idx]) @ b[idx]).astype(h.dtype)


def init_heads(cfg: ModelConfig, n: int, rank: int, seed: int = 0) -> dict:
    p = ExitHeads(cfg, n, rank).init(jax.random.key(seed), jnp.zeros((1, 1, cfg.hidden_size)), 0)["params"]
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, p, is_leaf=lambda x: hasattr(x, "value"))


def head_logits(cfg: ModelConfig, base: dict, heads: dict, h, idx) -> jax.Array:
    n, rank = heads["a"].shape[0], heads["a"].shape[2]
    return D.logits_from_hidden(cfg, base, ExitHeads(cfg, n, rank).apply({"params": heads}, h, idx))


@dataclasses.dataclass(frozen=True)
class ExitHeadConfig:
    layers: tuple[int, ...] = (20, 24, 27, 29)  # exit after this many base layers
    rank: int = 64
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 160  # answer positions per row the loss reads
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        C.check_run(self, ("rank", "steps", "batch_size", "seq_len", "positions"))
        if not self.layers:
            raise M2R2Error("exit heads: at least one exit layer")


def optimizer(hc: ExitHeadConfig) -> optax.GradientTransformation:
    return C.optimizer(hc, clip=False)


def make_step(cfg: ModelConfig, hc: ExitHeadConfig, opt):
    layers = tuple(hc.layers)

    def loss_fn(heads, base, tokens, mask):
        B, T = tokens.shape
        sel, m = S.loss_positions(mask, min(hc.positions, T))
        slow = S.slow_pass(cfg, base, tokens, select=sel)
        t = jax.nn.log_softmax(jax.lax.stop_gradient(slow.logits), -1)
        losses = []
        for i, E in enumerate(layers):
            s = jax.nn.log_softmax(head_logits(cfg, base, heads, jax.lax.stop_gradient(slow.hiddens[E]), i), -1)
            kl = jnp.sum(jnp.exp(t) * (t - s), -1)
            losses.append(jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0))
        return sum(losses), (jnp.stack(losses),)

    return C.train_step(loss_fn, opt)
