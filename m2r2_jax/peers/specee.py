"""SpecEE's exit predictors (Xu et al. 2025, "speculative early exiting"), on a frozen base: a draft
proposes K candidate tokens for the next position (here the M2R2 fast stream's top-K over its draft
vocabulary); at chosen base layers a small MLP reads features computed on the candidates only — the
layer state's logits for the K candidate rows of the LM head (after the final norm) and their softmax —
and predicts "the layer's best candidate is the full model's token". An exiting token is that
candidate. Only the K head rows are multiplied per check, never the full vocabulary.

    SpecEEPredictors   w1 [n, 2K, hidden], b1 [n, hidden], w2 [n, hidden], b2 [n]   (n check layers)

Deviation from the paper, stated: its features also include each candidate's probability change from
the previous layer; the loop's per-layer exit rule is stateless (`ExitPolicy.decide(layer, h)`), so the
change is left out.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.model import layers as L
from m2r2_jax.model.modules import declare, zeros


class SpecEEPredictors(nn.Module):
    n: int
    k: int
    hidden: int = 32

    @nn.compact
    def __call__(self, feats, idx):
        """feats [B, 2K] at check `idx` -> exit logit [B]."""
        w1 = declare(
            self, "w1", (self.n, 2 * self.k, self.hidden), (None, None, None), init=nn.initializers.lecun_normal()
        )
        b1 = zeros(self, "b1", (self.n, self.hidden), (None, None))
        w2 = declare(self, "w2", (self.n, self.hidden), (None, None), init=nn.initializers.normal(self.hidden**-0.5))
        b2 = zeros(self, "b2", (self.n,), (None,))
        x = jax.nn.relu(feats @ w1[idx] + b1[idx])
        return x @ w2[idx] + b2[idx]


def candidate_features(cfg: ModelConfig, final_norm, rows, h) -> tuple[jax.Array, jax.Array]:
    """rows [B, K, D]: the LM head rows of the candidates; h [B, D] -> (logits z [B, K], feats [B, 2K])."""
    x = L.rms_norm(h, final_norm, cfg.rms_norm_eps).astype(jnp.float32)
    z = jnp.einsum("bd,bkd->bk", x, rows.astype(jnp.float32))
    return z, jnp.concatenate([z, jax.nn.softmax(z, -1)], -1)


def head_rows(cfg: ModelConfig, base: dict, ids) -> jax.Array:
    """The LM head rows of token ids [...] -> [..., D]."""
    return jnp.take(S.draft_head(cfg, base, None), ids, axis=0)


def init_predictors(n: int, k: int, hidden: int = 32, seed: int = 0) -> dict:
    p = SpecEEPredictors(n, k, hidden).init(jax.random.key(seed), jnp.zeros((1, 2 * k)), 0)["params"]
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, p, is_leaf=lambda x: hasattr(x, "value"))


def predict(pred: dict, feats, idx) -> jax.Array:
    n, k2, hidden = pred["w1"].shape
    return SpecEEPredictors(n, k2 // 2, hidden).apply({"params": pred}, feats, idx)


@dataclasses.dataclass(frozen=True)
class SpecEEConfig:
    layers: tuple[int, ...] = (12, 15, 18, 21, 24, 27)  # check after this many base layers
    k: int = 4  # candidates from the draft
    hidden: int = 32
    examples: int = 256  # distilled answers whose positions make the training set
    seq_len: int = 256
    positions: int = 160
    batch_size: int = 8
    epochs: int = 30
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("k", "hidden", "examples", "seq_len", "positions", "batch_size", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"{name} must be an integer >= 1, got {v!r}")
        if not self.layers:
            raise M2R2Error("specee: at least one check layer")


def collect(cfg, mc, base, m2r2, draft_ids, tokens, mask, sc: SpecEEConfig):
    """Teacher-forced features and labels at every answer position: candidates = the fast stream's top-K
    (draft vocabulary), per check layer the features and whether the layer's best candidate is the full
    model's argmax. -> (feats [n, P, 2K], labels [n, P], reachable [P]: the full token is a candidate)."""
    ids = jnp.asarray(draft_ids, jnp.int32)

    @jax.jit
    def batch(tokens, mask):
        sel, m = S.loss_positions(mask, min(sc.positions, tokens.shape[1]))
        slow = S.slow_pass(cfg, base, tokens, select=sel)
        hf = S.fast_train_pass(cfg, mc, base, m2r2, tokens, slow, select=sel)[-1]
        _, top = jax.lax.top_k(S.draft_logits(cfg, base, hf, ids), sc.k)
        cands = jnp.take(ids, top)  # [B, M, K]
        rows = head_rows(cfg, base, cands)  # [B, M, K, D]
        full = jnp.argmax(slow.logits, -1)  # [B, M]
        out_f, out_y = [], []
        for E in sc.layers:
            B, M = cands.shape[:2]
            z, f = candidate_features(
                cfg, base["final_norm"], rows.reshape(B * M, sc.k, -1), slow.hiddens[E].reshape(B * M, -1)
            )
            best = jnp.take_along_axis(cands.reshape(B * M, sc.k), jnp.argmax(z, -1)[:, None], 1)[:, 0]
            out_f.append(f)
            out_y.append(best == full.reshape(-1))
        reach = jnp.any(cands == full[..., None], -1).reshape(-1)
        return jnp.stack(out_f), jnp.stack(out_y), reach, m.reshape(-1) > 0

    F, Y, R = [], [], []
    for i in range(0, len(tokens), sc.batch_size):
        t, mk = tokens[i : i + sc.batch_size], mask[i : i + sc.batch_size]
        if len(t) < sc.batch_size:
            break
        f, y, r, keep = jax.device_get(batch(jnp.asarray(t), jnp.asarray(mk)))
        F.append(f[:, keep])
        Y.append(y[:, keep])
        R.append(r[keep])
    return np.concatenate(F, 1), np.concatenate(Y, 1).astype(np.float32), np.concatenate(R)
