"""Kangaroo (Liu et al. 2024) in the shared loop: the base's first E layers + the trained adapter
(peers/kangaroo.py) draft a chain under the base's LM head, with the paper's second early exit: drafting
stops once the top-1 probability falls below `threshold` (0.6), at most `max_steps` tokens.

The shallow layers are the base's own, so their K/V for verified tokens are read from the base's cache
(never written); draft tokens' shallow K/V go to a draft-local buffer. The adapter's attention needs its
own K/V of every past token: that is the drafter's carried state, a one-layer shadow cache (shadow.py):
filled over the prompt after the base's prefill (E layers + the adapter over the prompt), and extended
each step by the catch-up block -- the tokens accepted last step and `cur` through the E shallow layers
(reading the base's cache below them) and the adapter -- whose output at `cur` is the first draft token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from m2r2_jax import kernels as K
from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.peer_drafters.shadow import ShadowChain, check_chain_knobs, prefix_block_attention
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import tree_draft_attention
from m2r2_jax.model.modules import Transformer
from m2r2_jax.peers.kangaroo import adapter_apply, adapter_logits


@dataclasses.dataclass(frozen=True, eq=True)
class Kangaroo(ShadowChain):
    cfg: ModelConfig
    exit_layer: int = 3
    max_steps: int = 6
    threshold: float = 0.6
    backend: Backend = XLA

    def __post_init__(self):
        if not 1 <= self.exit_layer < self.cfg.num_layers:
            raise M2R2Error(f"kangaroo: exit layer must be in [1, {self.cfg.num_layers}), got {self.exit_layer}")
        check_chain_knobs("kangaroo", self.max_steps, self.threshold)

    @property
    def kinds(self):
        return ("kangaroo",)

    def prepare(self, base, adapter):
        """{"adapter": the trained adapter, its projections packed for the CPU kernels on that backend}."""
        if self.backend.kernels:
            adapter = dict(adapter, attn={k: K.pack(w) if w.ndim == 2 else w for k, w in adapter["attn"].items()})
        return {"adapter": adapter}

    def shadow_shape(self, B: int, S: int):
        c = self.cfg
        return 1, (B, c.num_kv_heads, S, c.head_dim)

    def catch_up(self, dparams, base, cache, k, v, toks, start):
        cfg, E = self.cfg, self.exit_layer
        T = toks.shape[1]
        cos, sin = L.rope_cos_sin(cfg, start[:, None] + jnp.arange(T, dtype=jnp.int32)[None])

        def shallow(j):
            return prefix_block_attention(cfg, self.backend, cache.k[j], cache.v[j], start, T)

        h, states, _, _ = Transformer(cfg).apply(D.variables(base), toks, cos, sin, shallow, 0, E)
        attend = prefix_block_attention(cfg, self.backend, k[0], v[0], start, T)
        a, (ak, av) = adapter_apply(cfg, dparams["adapter"], h, cos, sin, attend)
        return [L.write_cache(k[0], ak, start)], [L.write_cache(v[0], av, start)], a, states

    def logits(self, dparams, base, h):
        return adapter_logits(self.cfg, base, dparams["adapter"], h)

    def chain_init(self, dparams, extra, idx):
        """Local buffers of max_steps slots: the shallow layers' (slot 0 = cur's K/V from the catch-up
        block, slot d = chain token d) and the adapter's (slot d = chain token d; cur's is in the shadow)."""
        c, n = self.cfg, self.max_steps

        def buf(x):  # x [B, KV, T, hd] -> [B, KV, n, hd], slot 0 = x at idx
            first = jnp.take_along_axis(x, idx[:, None, None, None], 2)
            return jnp.zeros(x.shape[:2] + (n,) + x.shape[3:], x.dtype).at[:, :, :1].set(first)

        shallow = {j: (buf(kk), buf(vv)) for j, (kk, vv) in extra.items()}
        B = idx.shape[0]
        z = jnp.zeros((B, c.num_kv_heads, n, c.head_dim), c.jnp_dtype)
        return shallow, (z, z)

    def chain_step(self, dparams, base, view, k, v, local, tok, d: int):
        cfg, n = self.cfg, self.max_steps
        shallow, (ak, av) = local
        cos, sin = L.rope_cos_sin(cfg, view.pos[:, None] + d)
        anc = np.zeros((1, n), bool)
        anc[0, :d] = True  # cur and the chain tokens before this one

        def attention_for(j):
            lk, lv = shallow[j]
            return tree_draft_attention(cfg, self.backend, view.cache.k[j], view.cache.v[j], view.pos, lk, lv, anc)

        h, states, _, _ = Transformer(cfg).apply(D.variables(base), tok, cos, sin, attention_for, 0, self.exit_layer)
        shallow = {
            j: (shallow[j][0].at[:, :, d : d + 1].set(kk), shallow[j][1].at[:, :, d : d + 1].set(vv))
            for j, (kk, vv) in states.items()
        }
        anc_a = anc.copy()
        anc_a[0, 0] = False  # the adapter's cur is in the shadow cache (prefix pos + 1)
        attend = tree_draft_attention(cfg, self.backend, k[0], v[0], view.pos + 1, ak, av, anc_a)
        a, (nk, nv) = adapter_apply(cfg, dparams["adapter"], h, cos, sin, attend)
        ak, av = ak.at[:, :, d : d + 1].set(nk.astype(ak.dtype)), av.at[:, :, d : d + 1].set(nv.astype(av.dtype))
        return a, k, v, (shallow, (ak, av))
