"""The Llama-family decoder as Flax (linen) modules, used functionally through `init` / `apply`.

    Transformer        embed [vocab, embed], layers (LayerStack), final_norm [embed], lm_head [embed, vocab]
      LayerStack       layers "0" .. "N-1" (DecoderLayer)
        DecoderLayer   attn_norm, attn (Attention), mlp_norm, mlp (the MLP slot, `MLP_SLOT`)
          Attention    wq / wk / wv [embed, heads | kv_heads] (+ bq / bk / bv), wo [heads, embed]
                       (+ OLMoE's q_norm [heads] / k_norm [kv_heads])
          DenseMLP     gate / up [embed, mlp], down [mlp, embed]                   (model/mlp.py)
          MoEMLP       router, experts' gate / up / down [expert, ...] (+ shared)  (model/moe.py)

Every param is declared with its logical axes (`nn.with_logical_partitioning`); `sharding.RULES`
maps them onto a mesh. The modules hold no state: params are a plain pytree passed to `apply` (the
project keeps it in the layout of model/params.py, where `layers` is a list; `params.module_tree`
converts), the KV cache travels through the attention context (model/attention.py), and the frozen
base and a trainable adapter tree are separate arguments (m2r2/modules.py composes them).

Two hooks let other streams reuse a layer unchanged: `adapters` (target -> low-rank delta, added to
each projection) and `gains` (per-channel scales of the two residual updates); the fast stream uses
both, the base model neither.

GraniteMoE's scalars act here too (each a no-op at its default, so other models run exactly as
before): `embed_tokens` scales by embedding_multiplier, each layer's two residual updates by
residual_multiplier, `logits` divides by logits_scaling; attention_multiplier is the attention scale
(`ModelConfig.attn_scale`, read by layers.attend).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2r2_jax.config import ModelConfig
from m2r2_jax.model import layers as L
from m2r2_jax.model.declare import INIT_STD, Adapters, declare, ones, zeros  # noqa: F401 (re-exported)
from m2r2_jax.model.mlp import DenseMLP
from m2r2_jax.model.moe import MoEMLP


def _project(c: ModelConfig, w: dict, x, cos, sin, ad: Adapters):
    """q [B,T,H,hd] (rotated), k / v [B,KV,T,hd] (k rotated)."""
    B, T, _ = x.shape
    mm = c.mm_dtype
    q, k, v = (
        L.linear(x, w["wq"], ad.get("q"), mm),
        L.linear(x, w["wk"], ad.get("k"), mm),
        L.linear(x, w["wv"], ad.get("v"), mm),
    )
    if c.qkv_bias:
        q, k, v = q + w["bq"].astype(x.dtype), k + w["bk"].astype(x.dtype), v + w["bv"].astype(x.dtype)
    if c.qk_norm:  # OLMoE: over the whole projection, before the head split
        q, k = L.rms_norm(q, w["q_norm"], c.rms_norm_eps), L.rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q = L.apply_rope(q.reshape(B, T, c.num_heads, c.head_dim), cos, sin)
    k = L.apply_rope(k.reshape(B, T, c.num_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, attend, adapters: Adapters | None = None):
        """x [B, T, D] -> (out [B, T, D], the attention context's state)."""
        c = self.cfg
        D, dt = c.hidden_size, c.jnp_param_dtype
        w = {
            "wq": declare(self, "wq", (D, c.q_dim), ("embed", "heads"), dt),
            "wk": declare(self, "wk", (D, c.kv_dim), ("embed", "kv_heads"), dt),
            "wv": declare(self, "wv", (D, c.kv_dim), ("embed", "kv_heads"), dt),
        }
        if c.qkv_bias:
            w.update(
                bq=zeros(self, "bq", (c.q_dim,), ("heads",), dt),
                bk=zeros(self, "bk", (c.kv_dim,), ("kv_heads",), dt),
                bv=zeros(self, "bv", (c.kv_dim,), ("kv_heads",), dt),
            )
        if c.qk_norm:
            w.update(
                q_norm=ones(self, "q_norm", (c.q_dim,), ("heads",), dt),
                k_norm=ones(self, "k_norm", (c.kv_dim,), ("kv_heads",), dt),
            )
        q, k, v = _project(c, w, x, cos, sin, adapters or {})
        a, state = attend(q, k, v)
        wo = declare(self, "wo", (c.q_dim, D), ("heads", "embed"), dt)
        return L.linear(a.astype(x.dtype), wo, (adapters or {}).get("o"), c.mm_dtype), state

    def project_kv(self, x, cos, sin):
        """The layer's K/V of x (apply only): k, v [B, KV, T, hd]."""
        c = self.cfg
        names = (
            ("wq", "wk", "wv")
            + (("bq", "bk", "bv") if c.qkv_bias else ())
            + (("q_norm", "k_norm") if c.qk_norm else ())
        )
        _, k, v = _project(self.cfg, {n: self.get_variable("params", n) for n in names}, x, cos, sin, {})
        return k, v


MLP_SLOT = {"dense": DenseMLP, "moe": MoEMLP}  # ModelConfig.layer_mlp(i) -> the module in the MLP slot


class DecoderLayer(nn.Module):
    """One pre-norm block: h + attn(norm h), then h + mlp(norm h). `index`: the layer's place in the
    stack, which picks its MLP in a model mixing dense and MoE layers (None: any other model)."""

    cfg: ModelConfig
    index: int | None = None

    @nn.compact
    def __call__(self, h, cos, sin, attend, adapters: Adapters | None = None, gains=None):
        """-> (h, attention state). `gains` = (g_attn, g_mlp) [D] scale the two residual updates."""
        c = self.cfg
        D, dt, eps = c.hidden_size, c.jnp_param_dtype, c.rms_norm_eps
        x = L.rms_norm(h, ones(self, "attn_norm", (D,), ("norm",), dt), eps)
        upd, state = Attention(c, name="attn")(x, cos, sin, attend, adapters)
        h = h + residual_update(c, upd, None if gains is None else gains[0].astype(h.dtype))
        x = L.rms_norm(h, ones(self, "mlp_norm", (D,), ("norm",), dt), eps)
        upd = MLP_SLOT[c.layer_mlp(self.index)](c, name="mlp")(x, adapters)
        return h + residual_update(c, upd, None if gains is None else gains[1].astype(h.dtype)), state


def residual_update(c: ModelConfig, upd, gain):
    """A residual update, scaled by GraniteMoE's residual_multiplier and then by a fast layer's gain."""
    if c.residual_multiplier != 1.0:
        upd = upd * c.residual_multiplier
    return upd if gain is None else gain * upd


class ExitPolicy:
    """The decoder's seam for per-token early exit. After each layer i in `exit_layers` (static), the
    layer stack asks `decide(i, h)` for a [B, T] bool "these tokens exit here". An exited token's state
    stays as it was at its exit; the layers after it still write its K/V, computed from that state
    (CALM's state propagation), so later tokens read a complete cache. Subclasses set the criterion;
    the default never exits, and the stack then runs exactly as without a policy."""

    exit_layers: tuple[int, ...] = ()

    def decide(self, layer: int, h: jax.Array) -> jax.Array:
        return jnp.zeros(h.shape[:2], bool)


class LayerStack(nn.Module):
    """Layers "0" .. "N-1"; runs [lo, hi) with one attention context per layer."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        h,
        cos,
        sin,
        attention_for: Callable[[int], Callable],
        lo: int = 0,
        hi: int | None = None,
        collect: bool = False,
        exit_policy: ExitPolicy | None = None,
    ):
        """-> (h, states {layer: attention state}, hiddens [h after each layer] or None, exit_at [B, T] or
        None: the number of layers each token ran, with an exit policy)."""
        hi = self.cfg.num_layers if hi is None else hi
        states, hiddens = {}, []
        exited = exit_at = None
        if exit_policy is not None:
            exited = jnp.zeros(h.shape[:2], bool)
            exit_at = jnp.full(h.shape[:2], hi, jnp.int32)
        for i in range(lo, hi):
            h_new, states[i] = DecoderLayer(self.cfg, index=i, name=str(i))(h, cos, sin, attention_for(i))
            if exit_policy is not None:
                h_new = jnp.where(exited[..., None], h, h_new)
                if i in exit_policy.exit_layers:
                    now = exit_policy.decide(i, h_new) & ~exited
                    exit_at = jnp.where(now, i + 1, exit_at)
                    exited = exited | now
            h = h_new
            if collect:
                hiddens.append(h)
        return h, states, (hiddens if collect else None), exit_at


class Transformer(nn.Module):
    """The model: `embed_tokens`, the layer stack over a layer range (`__call__`), `logits` (final norm +
    head). `apply` it to the whole param tree (methods read only what they use)."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        dt = c.jnp_param_dtype
        self.embedding = declare(self, "embed", (c.vocab_size, c.hidden_size), ("vocab", "embed"), dt)
        self.final_norm = ones(self, "final_norm", (c.hidden_size,), ("norm",), dt)
        # untied, or a tied head packed for the CPU kernels as `lm_head` (kernels.pack_decode_params)
        untied = not c.tie_word_embeddings or (not self.is_initializing() and self.has_variable("params", "lm_head"))
        self.head = declare(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), dt) if untied else None
        self.layers = LayerStack(c)

    def embed_tokens(self, tokens):
        h = jnp.take(self.embedding, tokens, axis=0).astype(self.cfg.jnp_dtype)
        return h if self.cfg.embedding_multiplier == 1.0 else h * self.cfg.embedding_multiplier

    def logits(self, h):
        """Final norm + LM head -> f32 [..., V] (tied: contract with embed's hidden axis, no transpose copy)."""
        c = self.cfg
        x = L.rms_norm(h, self.final_norm, c.rms_norm_eps)
        if self.head is None:
            return L.scale_logits(c, L.rows_logits(x, self.embedding, c.mm_dtype))
        return L.scale_logits(c, L.matmul(x, self.head, c.mm_dtype).astype(jnp.float32))

    def argmax_logits(self, h):
        """argmax of `logits(h)` over the vocabulary -> int32 [...]. With a head packed for the CPU kernels
        (and no logits scaling) the head's products are reduced as they are computed
        (`kernels.packed_argmax`: the same index, ties to the lowest, no [..., V] logits); else
        jnp.argmax of the logits."""
        c = self.cfg
        if L.fused_argmax(self.head) and c.logits_scaling == 1.0:
            return L.rows_argmax(L.rms_norm(h, self.final_norm, c.rms_norm_eps), self.head)
        return jnp.argmax(self.logits(h), -1).astype(jnp.int32)

    def __call__(
        self,
        tokens,
        cos,
        sin,
        attention_for,
        lo: int = 0,
        hi: int | None = None,
        h=None,
        collect: bool = False,
        exit_policy: ExitPolicy | None = None,
    ):
        if h is None:
            h = self.embed_tokens(tokens)
        return self.layers(h, cos, sin, attention_for, lo, hi, collect, exit_policy)

    def init_all(self, tokens, cos, sin, attention_for):
        """Touches every param (init only): the layers and the head."""
        h, *_ = self(tokens, cos, sin, attention_for)
        return self.logits(h)


class DraftHead(nn.Module):
    """A draft head: the final norm and the LM head's rows for a draft vocabulary, head [Vd, D]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        x = L.rms_norm(h, ones(self, "final_norm", (c.hidden_size,), ("norm",), c.jnp_param_dtype), c.rms_norm_eps)
        head = self.get_variable("params", "head")  # [Vd, D], or packed (kernels.pack_rows)
        return L.scale_logits(c, L.rows_logits(x, head, c.mm_dtype))
