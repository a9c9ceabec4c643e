"""The trainable M2R2 tree (separate from the frozen base), read off the `M2R2` Flax module:

    fast[l]   adapters {q,k,v,o,gate,up,down: {a: [in, rank], b: [rank, out]}},
              gain_attn / gain_mlp [embed] (when gain)
    router    ARLA: norm [embed], wk/wq/wv [embed, router], w_out [router, 1], layer_bias [L_f]

`b` is zero-initialised, gains start at 1: an untrained fast stream is exactly the chosen base layers.
"""

from __future__ import annotations

import functools

import jax

from m2r2_jax.config import ModelConfig
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.modules import M2R2
from m2r2_jax.model.params import spec_of, unboxed


@functools.lru_cache(maxsize=32)
def m2r2_spec(cfg: ModelConfig, mc: M2R2Config) -> dict:
    """Shape, dtype and logical axes of every trainable param."""
    return spec_of(jax.eval_shape(lambda: M2R2(cfg, mc).init(jax.random.key(0), method="declare")))


def init_m2r2(cfg: ModelConfig, mc: M2R2Config, key: jax.Array) -> dict:
    """Adapter `a` ~ N(0, 1/in) (LoRA-style), router ~ N(0, 1/in); `b` zeros, gains ones."""
    return unboxed(M2R2(cfg, mc).init(key, method="declare"))
