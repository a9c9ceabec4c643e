"""The M2R2 fast residual stream and the ARLA router as Flax (linen) modules.

    M2R2                the trainable tree: fast (FastStream), router (ARLARouter)
      FastStream        fast layers "0" .. "L_f-1" (FastLayer)
        FastLayer       accelerator adapters q, k, v, o, gate, up, down (LowRank: a [in, rank],
                        b [rank, out]; or FullDelta: d [in, out]) and gains gain_attn / gain_mlp [embed]
                        around one frozen base layer
      ARLARouter        norm, wq / wk / wv [embed, router], w_out [router, 1], layer_bias [L_f]

A fast layer is a base `DecoderLayer` (model/modules.py) applied to the frozen base layer's params,
which arrive as an argument (`base_layers`), with this module's adapters and gains plugged into the
layer's hooks: base and trainable params stay separate pytrees and separate jit arguments. `b` is
zero-initialised (as is `d`) and the gains start at 1, so an untrained fast stream is exactly its base
layers.

With `merged=True` the stream has no params of its own: its layers' params already carry the adapters
(W + A B) and gains (`stream.merge_fast_layer`), as drafting uses them, and it runs the same loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from m2r2_jax.config import ModelConfig
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.model import layers as L
from m2r2_jax.model.modules import DecoderLayer, declare, ones, zeros

# adapter target -> (in, out, in-axis, out-axis)
TARGET_DIMS = {
    "q": ("D", "Q", "embed", "heads"),
    "k": ("D", "K", "embed", "kv_heads"),
    "v": ("D", "K", "embed", "kv_heads"),
    "o": ("Q", "D", "heads", "embed"),
    "gate": ("D", "F", "embed", "mlp"),
    "up": ("D", "F", "embed", "mlp"),
    "down": ("F", "D", "mlp", "embed"),
}


def _fan_in(std_scale: float = 1.0):
    """N(0, 1/fan_in) for a [in, out] matrix (LoRA-style `a`, the router's projections)."""

    def init(key, shape, dtype=jnp.float32):
        return (jax.random.normal(key, shape, jnp.float32) * std_scale / jnp.sqrt(shape[0])).astype(dtype)

    return init


class LowRank(nn.Module):
    """An accelerator adapter: delta(x) = (x a) b, a [in, rank], b [rank, out] (b starts at zero)."""

    features_in: int
    features_out: int
    rank: int
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x, mm=None):
        a = declare(self, "a", (self.features_in, self.rank), (self.axes[0], "rank"), init=_fan_in())
        b = zeros(self, "b", (self.rank, self.features_out), ("rank", self.axes[1]))
        return L.matmul(L.matmul(x, a, mm), b, mm)


class FullDelta(nn.Module):
    """A full-rank accelerator: delta(x) = x d, d [in, out] (starts at zero): the fast layer's weights
    become trainable copies of its base layer's, initialised from them."""

    features_in: int
    features_out: int
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x, mm=None):
        return L.matmul(x, zeros(self, "d", (self.features_in, self.features_out), self.axes), mm)


class FastLayer(nn.Module):
    cfg: ModelConfig
    mc: M2R2Config
    merged: bool = False
    base_index: int | None = None  # the base layer it runs (picks its MLP in a model mixing dense and MoE)

    @nn.compact
    def __call__(self, base_layer: dict | None, h=None, cos=None, sin=None, attend: Callable | None = None):
        """-> (h, the attention context's state). `base_layer` None only declares the params (init)."""
        c, mc = self.cfg, self.mc
        adapters, gains = None, None
        if not self.merged:
            size = {"D": c.hidden_size, "Q": c.q_dim, "K": c.kv_dim, "F": c.intermediate_size}
            adapters = {}
            for t in mc.targets:
                i, o, ia, oa = TARGET_DIMS[t]
                if mc.adapter == "full":
                    adapters[t] = FullDelta(size[i], size[o], (ia, oa), name=t)
                else:
                    adapters[t] = LowRank(size[i], size[o], mc.rank, (ia, oa), name=t)
            if mc.gain:
                gains = (
                    ones(self, "gain_attn", (c.hidden_size,), ("norm",)),
                    ones(self, "gain_mlp", (c.hidden_size,), ("norm",)),
                )
            if base_layer is None:  # init: create the adapters' params
                for t, ad in adapters.items():
                    ad(jnp.zeros((1, size[TARGET_DIMS[t][0]]), jnp.float32))
                return None
        layer = DecoderLayer(c, self.base_index, parent=None)  # the frozen base layer: its params are an argument
        return layer.apply({"params": base_layer}, h, cos, sin, attend, adapters, gains)


class FastStream(nn.Module):
    cfg: ModelConfig
    mc: M2R2Config
    merged: bool = False

    @nn.compact
    def __call__(
        self,
        base_layers: Sequence[dict] | None,
        h=None,
        cos=None,
        sin=None,
        attention_for: Callable[[int], Callable] | None = None,
        depth: int | None = None,
    ):
        """Fast layers 0 .. depth-1 over a block; fast layer l runs `base_layers[l]` (the frozen base
        layer it accelerates, or merged params) with attention context `attention_for(l)`.
        -> ([h_f^1, ..., h_f^depth], [attention state per layer])."""
        n = self.mc.n_fast(self.cfg.num_layers) if depth is None else depth
        if base_layers is None:
            for l in range(n):
                FastLayer(self.cfg, self.mc, self.merged, name=str(l))(None)
            return None
        hs, states = [], []
        index = self.mc.base_layers(self.cfg.num_layers)
        for l in range(n):
            h, st = FastLayer(self.cfg, self.mc, self.merged, index[l], name=str(l))(
                base_layers[l], h, cos, sin, attention_for(l)
            )
            hs.append(h)
            states.append(st)
        return hs, states


class ARLARouter(nn.Module):
    """ARLA: per fast layer l, attention over the fast latents (or per-layer changes, the "velocities")
    of layers <= l -> logits [B, T, L] of "this token is already resolved at fast layer l"."""

    cfg: ModelConfig
    mc: M2R2Config

    @nn.compact
    def __call__(self, fast_hs: Sequence[jax.Array], h_branch: jax.Array):
        c, mc = self.cfg, self.mc
        D, R, n = c.hidden_size, mc.router_dim, mc.n_fast(c.num_layers)
        norm = ones(self, "norm", (D,), ("norm",))
        wq = declare(self, "wq", (D, R), ("embed", "router"), init=_fan_in())
        wk = declare(self, "wk", (D, R), ("embed", "router"), init=_fan_in())
        wv = declare(self, "wv", (D, R), ("embed", "router"), init=_fan_in())
        w_out = declare(self, "w_out", (R, 1), ("router", None), init=_fan_in())
        layer_bias = zeros(self, "layer_bias", (n,), (None,))
        hs = jnp.stack(fast_hs, axis=2)  # [B, T, L, D]
        if mc.router_input == "delta":
            z = hs - jnp.concatenate([h_branch[:, :, None], hs[:, :, :-1]], axis=2)
        else:
            z = hs
        z = L.rms_norm(jax.lax.stop_gradient(z), norm, c.rms_norm_eps)
        q, k, v = L.linear(z, wq), L.linear(z, wk), L.linear(z, wv)
        m = hs.shape[2]
        s = jnp.einsum("btlr,btmr->btlm", q, k) / jnp.sqrt(q.shape[-1])
        s = jnp.where(jnp.tril(jnp.ones((m, m), bool)), s, -1e30)
        o = jnp.einsum("btlm,btmr->btlr", jax.nn.softmax(s, -1), v)
        return L.linear(jax.nn.silu(o + q), w_out)[..., 0] + layer_bias[:m]


class M2R2(nn.Module):
    """The trainable tree: `fast` and `router`. `init` (method `declare`) creates it; the streams
    apply their parts (stream.py)."""

    cfg: ModelConfig
    mc: M2R2Config

    def setup(self):
        self.fast = FastStream(self.cfg, self.mc)
        self.router = ARLARouter(self.cfg, self.mc)

    def declare(self):
        self.fast(None)
        n = self.mc.n_fast(self.cfg.num_layers)
        dummy = jnp.zeros((1, 1, self.cfg.hidden_size), jnp.float32)
        return self.router([dummy] * n, dummy)
