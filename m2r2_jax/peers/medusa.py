"""Medusa-1 heads on a frozen base (Cai et al. 2024): K residual blocks on the full model's final hidden
state, each followed by the base's own LM head (frozen, shared; tied to the embedding on SmolLM2).
Head k (0-based) reads the state at position t and predicts token t + k + 2: the base's head predicts
t + 1 from the same state, so the heads continue where it stops. Medusa-1 trains the heads only, the
backbone frozen, which keeps greedy decoding lossless; here the heads also share the frozen LM head
instead of one trainable head copy each (Medusa's), so a head is D x D + D parameters.

    MedusaHeads   w [heads, embed, embed] (zero-initialised, as Medusa's ResBlock), b [heads, embed]

head_k(x) = lm_head(x + SiLU(x w_k + b_k)), x = the final-normed state (the LM head's input), so an
untrained head is the base's own head. Trained by cross-entropy to the self-distilled answers (the
base's greedy tokens: `training/spec_peers.py`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import layers as L
from m2r2_jax.model.modules import zeros
from m2r2_jax.peers import common as C

KIND = "medusa"  # the checkpoint kind (peers/draft_checkpoint.py)


def final_features(cfg: ModelConfig, base: dict, h: jax.Array) -> jax.Array:
    """The final norm of the base on a hidden state (before the norm) -> the LM head's input."""
    return L.rms_norm(h, base["final_norm"], cfg.rms_norm_eps)


def lm_head(cfg: ModelConfig, base: dict, x: jax.Array) -> jax.Array:
    """The base's LM head alone (no final norm) on x [..., D] -> f32 [..., V]; a tied head reads the
    embedding's rows, or the head packed for the CPU kernels as `lm_head` (as `Transformer.logits`)."""
    lead = x.shape[:-1]
    x = x.reshape(1, -1, x.shape[-1])  # the head's primitives take [B, T, D]
    if "lm_head" in base:
        out = L.matmul(x, base["lm_head"], cfg.mm_dtype).astype(jnp.float32)
    else:
        out = L.rows_logits(x, base["embed"], cfg.mm_dtype)
    return L.scale_logits(cfg, out).reshape(lead + (out.shape[-1],))


class MedusaHeads(nn.Module):
    cfg: ModelConfig
    heads: int

    @nn.compact
    def __call__(self, x):
        """x [..., D] (final-normed) -> the heads' LM-head inputs [..., heads, D]."""
        D = self.cfg.hidden_size
        w = zeros(self, "w", (self.heads, D, D), (None, "embed", None))
        b = zeros(self, "b", (self.heads, D), (None, None))
        y = jnp.einsum("...d,kde->...ke", x.astype(w.dtype), w) + b
        return (x[..., None, :] + jax.nn.silu(y)).astype(x.dtype)


def init_heads(cfg: ModelConfig, heads: int, seed: int = 0) -> dict:
    p = MedusaHeads(cfg, heads).init(jax.random.key(seed), jnp.zeros((1, cfg.hidden_size)))["params"]
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, p, is_leaf=lambda x: hasattr(x, "value"))


def head_logits(cfg: ModelConfig, base: dict, heads: dict, h: jax.Array, n: int | None = None) -> jax.Array:
    """h [..., D] (before the final norm) -> the first n (default all) heads' logits [..., n, V] f32."""
    if n is not None:
        heads = jax.tree.map(lambda x: x[:n], heads)
    K = heads["w"].shape[0]
    return lm_head(cfg, base, MedusaHeads(cfg, K).apply({"params": heads}, final_features(cfg, base, h)))


@dataclasses.dataclass(frozen=True)
class MedusaConfig:
    heads: int = 4
    steps: int = 400
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 96  # loss positions per row (answer tokens); each costs `heads` LM-head rows
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        C.check_run(self, ("heads", "steps", "batch_size", "seq_len", "positions"))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise M2R2Error(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.heads > 16:
            raise M2R2Error(f"medusa: at most 16 heads, got {self.heads}")


def optimizer(c) -> optax.GradientTransformation:
    return C.optimizer(c, clip=False)


def shifted_positions(mask: jax.Array, shift: int, m: int):
    """The first m positions t of each row whose token t + shift is a loss token (mask > 0): ->
    (select [B, m], valid [B, m]). Medusa's head k and EAGLE read such a t."""
    from m2r2_jax.m2r2.stream import loss_positions

    ahead = jnp.pad(mask[:, shift:], ((0, 0), (0, shift)))
    return loss_positions(ahead, m)


def medusa_loss(cfg: ModelConfig, mc: MedusaConfig, heads: dict, h: jax.Array, base: dict, tokens, mask):
    """h [B, T, D]: the frozen base's final states (before the norm). Head k at position t: cross-entropy
    to token t + k + 2 where that token is an answer token. -> (mean over heads, (ce [K], top-1 acc [K]))."""
    B, T = tokens.shape
    sel, valid = shifted_positions(mask, 2, min(mc.positions, T))  # head 0's targets; deeper heads: fewer
    x = jnp.take_along_axis(h, sel[..., None], 1)
    ces, accs = [], []
    for k in range(mc.heads):
        tgt_pos = sel + k + 2
        ok = valid * (tgt_pos < T) * jnp.take_along_axis(mask, jnp.minimum(tgt_pos, T - 1), 1)
        tgt = jnp.take_along_axis(tokens, jnp.minimum(tgt_pos, T - 1), 1)

        @jax.checkpoint  # one head's [B, M, V] logits at a time, not all K kept for the backward pass
        def ce_k(heads, x, tgt, k=k):
            lg = head_logits(cfg, base, jax.tree.map(lambda a: a[k : k + 1], heads), x)[..., 0, :]
            lp = jax.nn.log_softmax(lg, -1)
            return -jnp.take_along_axis(lp, tgt[..., None], -1)[..., 0], jnp.argmax(lg, -1) == tgt

        nll, hit = ce_k(heads, x, tgt)
        n = jnp.maximum(jnp.sum(ok), 1.0)
        ces.append(jnp.sum(nll * ok) / n)
        accs.append(jnp.sum(hit * ok) / n)
    ces = jnp.stack(ces)
    return jnp.mean(ces), (ces, jnp.stack(accs))
