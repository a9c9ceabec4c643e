"""The trainable M2R2 tree (separate from the frozen base):

    fast[l]   adapters {q,k,v,o,gate,up,down: {a: [in, rank], b: [rank, out]}},
              gain_attn / gain_mlp [embed] (when gain)
    router    ARLA: norm [embed], wk/wq/wv [embed, router], w_out [router, 1], layer_bias [L_f]

`b` is zero-initialised, gains start at 1: an untrained fast stream is exactly
the chosen base layers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from m2r2_jax.config import ModelConfig
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.model.params import ParamSpec, init_params

_DIMS = {  # target -> (in, out, in-axis, out-axis)
    "q": ("D", "Q", "embed", "heads"), "k": ("D", "K", "embed", "kv_heads"), "v": ("D", "K", "embed", "kv_heads"),
    "o": ("Q", "D", "heads", "embed"), "gate": ("D", "F", "embed", "mlp"), "up": ("D", "F", "embed", "mlp"),
    "down": ("F", "D", "mlp", "embed"),
}


def m2r2_spec(cfg: ModelConfig, mc: M2R2Config) -> dict:
    size = {"D": cfg.hidden_size, "Q": cfg.q_dim, "K": cfg.kv_dim, "F": cfg.intermediate_size}
    fast = []
    for _ in range(mc.n_fast(cfg.num_layers)):
        layer = {}
        for t in mc.targets:
            i, o, ia, oa = _DIMS[t]
            layer[t] = {"a": ParamSpec((size[i], mc.rank), (ia, "rank"), init="normal"),
                        "b": ParamSpec((mc.rank, size[o]), ("rank", oa), init="zeros")}
        if mc.gain:
            layer["gain_attn"] = ParamSpec((cfg.hidden_size,), ("norm",), init="ones")
            layer["gain_mlp"] = ParamSpec((cfg.hidden_size,), ("norm",), init="ones")
        fast.append(layer)
    R = mc.router_dim
    router = {
        "norm": ParamSpec((cfg.hidden_size,), ("norm",), init="ones"),
        "wq": ParamSpec((cfg.hidden_size, R), ("embed", "router")),
        "wk": ParamSpec((cfg.hidden_size, R), ("embed", "router")),
        "wv": ParamSpec((cfg.hidden_size, R), ("embed", "router")),
        "w_out": ParamSpec((R, 1), ("router", None)),
        "layer_bias": ParamSpec((mc.n_fast(cfg.num_layers),), (None,), init="zeros"),
    }
    return {"fast": fast, "router": router}


def init_m2r2(cfg: ModelConfig, mc: M2R2Config, key: jax.Array) -> dict:
    """Adapter `a` ~ N(0, 1/in) (LoRA-style), router ~ N(0, 1/in); `b` zeros, gains ones."""
    spec = m2r2_spec(cfg, mc)
    params = init_params(spec, key, scale=1.0)

    def rescale(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else ""
        if name in ("a", "wq", "wk", "wv", "w_out") and x.ndim == 2:
            return x / jnp.sqrt(x.shape[0])
        return x

    return jax.tree_util.tree_map_with_path(rescale, params)
