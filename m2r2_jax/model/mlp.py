"""The dense MLP: SwiGLU, the Llama family's feed-forward block (and Qwen2-MoE's shared expert)."""

from __future__ import annotations

import flax.linen as nn
import jax

from m2r2_jax.config import ModelConfig
from m2r2_jax.model import layers as L
from m2r2_jax.model.declare import Adapters, declare


class DenseMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x), gate / up [embed, mlp], down [mlp, embed]; `features` (default
    cfg.intermediate_size) is the hidden width."""

    cfg: ModelConfig
    features: int | None = None

    @nn.compact
    def __call__(self, x, adapters: Adapters | None = None):
        c, ad = self.cfg, adapters or {}
        D, F, dt, mm = c.hidden_size, self.features or c.intermediate_size, c.jnp_param_dtype, c.mm_dtype
        gate = declare(self, "gate", (D, F), ("embed", "mlp"), dt)
        up = declare(self, "up", (D, F), ("embed", "mlp"), dt)
        down = declare(self, "down", (F, D), ("mlp", "embed"), dt)
        g, u = L.linear(x, gate, ad.get("gate"), mm), L.linear(x, up, ad.get("up"), mm)
        return L.linear(jax.nn.silu(g) * u, down, ad.get("down"), mm)
