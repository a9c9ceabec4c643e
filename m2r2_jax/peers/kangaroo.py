"""Kangaroo (Liu et al. 2024): a self-draft model made of the base's first `exit_layer` layers (frozen,
shared with the base: their K/V for verified tokens are the base's own cache) and an adapter -- one
attention layer and two RMSNorms, no MLP -- under the base's frozen LM head. The adapter is trained
with soft cross-entropy to the full model's next-token distribution on the self-distilled answers.

    KangarooAdapter   attn_norm [embed], attn (wq / wk / wv [embed, heads | kv_heads], wo [heads, embed]),
                      norm [embed] (stands where the base's final norm stands, before the LM head)

draft state after E base layers h_E:  a = h_E + attn(rms_norm(h_E, attn_norm));  logits = head(rms_norm(a, norm)).
The adapter starts as a copy of base layer E's attention sublayer and norm, and of the final norm.
Decoding (decoding/peer_drafters/kangaroo.py) keeps the adapter's own K/V of past tokens as drafter state.
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
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import SetsAttention
from m2r2_jax.model.modules import Attention, ones, residual_update
from m2r2_jax.peers import common as C
from m2r2_jax.peers.common import soft_ce
from m2r2_jax.peers.draft_checkpoint import load_draft

KIND = "kangaroo"


@dataclasses.dataclass(frozen=True)
class KangarooConfig:
    """exit_layer: the shallow sub-network is base layers 0 .. exit_layer-1 (3 of SmolLM2's 30: its LM
    head, 576 x 49152, costs 8x a layer, so a third shallow layer adds ~10% to a draft token's MACs)."""

    exit_layer: int = 3
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 160  # answer positions per row the loss reads
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        C.check_run(self, ("exit_layer", "steps", "batch_size", "seq_len", "positions"), KIND, lr_max=1)

    def check(self, cfg: ModelConfig) -> None:
        if not 1 <= self.exit_layer < cfg.num_layers:
            raise M2R2Error(f"kangaroo: exit_layer must be in [1, {cfg.num_layers}), got {self.exit_layer}")


class KangarooAdapter(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.attn_norm = ones(self, "attn_norm", (c.hidden_size,), ("norm",), c.jnp_param_dtype)
        self.norm = ones(self, "norm", (c.hidden_size,), ("norm",), c.jnp_param_dtype)
        self.attn = Attention(c)

    def __call__(self, h, cos, sin, attend):
        """h [B, T, D] (after the shallow layers) -> (the adapted state, before `norm`; the attention
        context's state, e.g. the block's own (k, v))."""
        upd, state = self.attn(L.rms_norm(h, self.attn_norm, self.cfg.rms_norm_eps), cos, sin, attend)
        return h + residual_update(self.cfg, upd, None), state

    def init_all(self, h, cos, sin, attend):
        return self(h, cos, sin, attend), self.norm


def init_adapter(cfg: ModelConfig, base: dict, kc: KangarooConfig) -> dict:
    """Base layer E's attention sublayer (norm + attention) and the final norm, copied."""
    kc.check(cfg)
    lp = base["layers"][kc.exit_layer]
    return C.copy_dense({"attn_norm": lp["attn_norm"], "attn": lp["attn"], "norm": base["final_norm"]})


def adapter_spec(cfg: ModelConfig) -> dict:
    """The adapter's abstract params (shapes, dtypes) from the module."""
    B, T = 1, 1
    cos, sin = L.rope_cos_sin(cfg, jnp.zeros((B, T), jnp.int32))
    attend = SetsAttention(cfg, XLA, sets=[], self_mask=jnp.ones((B, T, T), bool))
    boxed = jax.eval_shape(
        lambda: KangarooAdapter(cfg).init(
            jax.random.key(0), jnp.zeros((B, T, cfg.hidden_size), cfg.jnp_dtype), cos, sin, attend, method="init_all"
        )
    )
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype) if hasattr(x, "value") else x,
        boxed["params"],
        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned),
    )


def adapter_apply(cfg: ModelConfig, ad: dict, h, cos, sin, attend):
    """-> (adapted state [B, T, D], the attention context's state)."""
    return KangarooAdapter(cfg).apply({"params": ad}, h, cos, sin, attend)


def adapter_logits(cfg: ModelConfig, base: dict, ad: dict, a) -> jax.Array:
    """The adapter's norm, then the base's frozen LM head -> f32 [..., V]."""
    return D.logits_from_hidden(cfg, dict(base, final_norm=ad["norm"]), a)


def teacher_forced(cfg: ModelConfig, kc: KangarooConfig, base: dict, ad: dict, tokens, select):
    """The draft model over whole sequences (each token sees the true tokens before it, as a draft after a
    verified prefix does) and the full model, at the positions `select` [B, M]:
    -> (draft logits, full-model logits), both f32 [B, M, V]. The base gets no gradient."""
    B, T = tokens.shape
    E, N = kc.exit_layer, cfg.num_layers
    zero = jnp.zeros((B,), jnp.int32)
    cache = D.init_cache(cfg, B, T)
    h_e, cache, _ = D.forward_hidden(cfg, base, tokens, cache, zero, layer_range=(0, E))
    h_n, _, _ = D.forward_hidden(cfg, base, tokens, cache, zero, layer_range=(E, N), h=h_e)
    full = D.logits_from_hidden(cfg, base, S.gather_positions(h_n, select))
    h_e = jax.lax.stop_gradient(h_e)
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    cos, sin = L.rope_cos_sin(cfg, pos)
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (B, T, T))
    a, _ = adapter_apply(cfg, ad, h_e, cos, sin, SetsAttention(cfg, XLA, sets=[], self_mask=causal))
    return adapter_logits(cfg, base, ad, S.gather_positions(a, select)), jax.lax.stop_gradient(full)


def optimizer(kc: KangarooConfig) -> optax.GradientTransformation:
    return C.optimizer(kc, clip=True)


def make_step(cfg: ModelConfig, kc: KangarooConfig, opt):
    """-> step(adapter, opt_state, base, tokens, mask) -> (adapter, opt_state, soft_ce, kl, top1)."""

    def loss_fn(ad, base, tokens, mask):
        sel, m = S.loss_positions(mask, min(kc.positions, tokens.shape[1]))
        draft, full = teacher_forced(cfg, kc, base, ad, tokens, sel)
        ce, kl, agree = soft_ce(full, draft, m)
        return ce, (kl, agree)

    return C.train_step(loss_fn, opt)


def load_kangaroo(path, cfg: ModelConfig, base: dict | None = None) -> tuple[dict, KangarooConfig, dict]:
    """A trained adapter (a run dir: its latest step; or a step dir) -> (adapter, its config, meta).
    With `base`, a checkpoint trained on another base model is refused (one line)."""
    return load_draft(path, KIND, KangarooConfig, cfg, base, lambda kc: adapter_spec(cfg))
