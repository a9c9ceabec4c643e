"""EAGLE (Li et al. 2024) draft model on a frozen base: one decoder layer (the base's Llama layer, own
weights) that autoregresses at the feature level. Its input at position t is
fc([embedding(x_{t+1}), f_t]) -- the full model's final feature f_t (the final-normed state, the LM
head's input, as EAGLE takes the base's last hidden states) with the token one step ahead, which tells
the draft which of the sampled continuations it is on -- and its output predicts f_{t+1}; the base's
frozen LM head on the output gives the draft distribution of x_{t+2}. Drafting feeds its own predicted
features back in (decoding/peer_drafters/eagle.py); training is teacher-forced on the real features
with uniform noise on them (as EAGLE's data augmentation, so the draft tolerates its own errors).

    EagleDraft   fc [2 * embed, embed] + fc_b [embed], layer (DecoderLayer: attn_norm, attn, mlp_norm, mlp)

Loss (EAGLE's): v_weight * smooth-L1(predicted f_{t+1}, f_{t+1}) + p_weight * cross-entropy of the LM
head on the prediction to x_{t+2}, the self-distilled answer token (the base's greedy token; the
cache holds no soft targets), both over positions whose x_{t+2} is an answer token. EAGLE's first
layer drops the decoder layer's input norm; this one keeps the base layer as it is.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m2r2_jax.backend import XLA
from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import SetsAttention
from m2r2_jax.model.modules import DecoderLayer, declare, zeros
from m2r2_jax.peers import common as C
from m2r2_jax.peers.medusa import final_features, lm_head, shifted_positions

KIND = "eagle"  # the checkpoint kind (peers/draft_checkpoint.py)


class EagleDraft(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, feat, emb, cos, sin, attend):
        """feat / emb [B, T, D] -> (predicted features [B, T, D], the attention context's state)."""
        D_ = self.cfg.hidden_size
        w = declare(self, "fc", (2 * D_, D_), ("embed", None), init=nn.initializers.normal((2 * D_) ** -0.5))
        b = zeros(self, "fc_b", (D_,), (None,))
        x = L.matmul(jnp.concatenate([emb, feat.astype(emb.dtype)], -1), w, self.cfg.mm_dtype) + b.astype(emb.dtype)
        return DecoderLayer(self.cfg, name="layer")(x, cos, sin, attend)


def check_base(cfg: ModelConfig) -> None:
    if cfg.mlp_type != "dense":
        raise M2R2Error(f"eagle: the draft layer is a dense Llama layer; this base has {cfg.mlp_type} MLPs")


def init_draft(cfg: ModelConfig, seed: int = 0) -> dict:
    check_base(cfg)
    T, D_ = 1, cfg.hidden_size
    x = jnp.zeros((1, T, D_), cfg.jnp_dtype)
    cos, sin = L.rope_cos_sin(cfg, jnp.zeros((1, T), jnp.int32))
    att = SetsAttention(cfg, XLA, self_mask=jnp.ones((1, T, T), bool))
    p = EagleDraft(cfg).init(jax.random.key(seed), x, x, cos, sin, att)["params"]
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, p, is_leaf=lambda x: hasattr(x, "value"))


def draft_apply(cfg: ModelConfig, base: dict, params: dict, feat, tokens, positions, attend):
    """The draft layer over pairs (feat [B, n, D] = f_t, tokens [B, n] = x_{t+1}) at RoPE positions
    [B, n] (= t) under an attention context -> (predicted features [B, n, D], the context's state)."""
    cos, sin = L.rope_cos_sin(cfg, positions)
    return EagleDraft(cfg).apply({"params": params}, feat, D.embed(cfg, base, tokens), cos, sin, attend)


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 96  # positions per row whose LM-head cross-entropy is taken
    lr: float = 5e-4
    v_weight: float = 1.0  # feature regression (smooth L1)
    p_weight: float = 0.1  # token cross-entropy
    noise: float = 0.2  # uniform noise on the input features, U(-noise/2, noise/2)
    seed: int = 0

    def __post_init__(self):
        C.check_run(self, ("steps", "batch_size", "seq_len", "positions"))
        for name in ("v_weight", "p_weight", "noise"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise M2R2Error(f"eagle: {name} must be a number >= 0, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise M2R2Error(f"seed must be an integer >= 0, got {self.seed!r}")


def optimizer(c: EagleConfig) -> optax.GradientTransformation:
    return C.optimizer(c, clip=True)


def eagle_loss(cfg: ModelConfig, ec: EagleConfig, params: dict, h, base: dict, tokens, mask, key):
    """h [B, T, D]: the frozen base's final states (before the norm). -> (loss, (v-loss, p-loss, top-1
    acc of the draft head against the answer token))."""
    B, T = tokens.shape
    f = jax.lax.stop_gradient(final_features(cfg, base, h))
    feat = f[:, :-1]
    if ec.noise:
        feat = feat + (jax.random.uniform(key, feat.shape, feat.dtype) - 0.5) * ec.noise
    n = T - 1
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[None], (B, n))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool))[None], (B, n, n))
    out, _ = draft_apply(cfg, base, params, feat, tokens[:, 1:], pos, SetsAttention(cfg, XLA, self_mask=causal))
    m = jnp.pad(mask[:, 2:], ((0, 0), (0, 1)))  # [B, n]: x_{t+2} is an answer token
    err = optax.huber_loss(out.astype(jnp.float32), f[:, 1:].astype(jnp.float32), delta=1.0).mean(-1)
    vloss = jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)
    sel, valid = shifted_positions(mask, 2, min(ec.positions, T))
    lg = lm_head(cfg, base, jnp.take_along_axis(out, jnp.minimum(sel, n - 1)[..., None], 1))
    tgt = jnp.take_along_axis(tokens, jnp.minimum(sel + 2, T - 1), 1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), tgt[..., None], -1)[..., 0]
    cnt = jnp.maximum(jnp.sum(valid), 1.0)
    ploss = jnp.sum(nll * valid) / cnt
    acc = jnp.sum((jnp.argmax(lg, -1) == tgt) * valid) / cnt
    return ec.v_weight * vloss + ec.p_weight * ploss, (vloss, ploss, acc)
