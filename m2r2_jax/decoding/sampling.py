"""Token selection: greedy, or temperature / top-k / top-p sampling (all dynamic
scalars, so changing them never recompiles)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from m2r2_jax.errors import M2R2Error


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Validated once, here: every decoder and CLI builds one of these."""

    temperature: float = 0.0  # 0 -> greedy (static branch)
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    seed: int = 0

    def __post_init__(self):
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise M2R2Error(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise M2R2Error(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise M2R2Error(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise M2R2Error(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def filtered_logits(logits: jax.Array, temperature, top_k, top_p):
    """Sorted (descending) tempered logits with top-k/top-p masked to -inf, and the sort order."""
    x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-x, axis=-1)
    xs = jnp.take_along_axis(x, order, axis=-1)
    rank = jnp.arange(x.shape[-1])
    keep = jnp.where(top_k > 0, rank < top_k, True)
    probs = jax.nn.softmax(jnp.where(keep, xs, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above this token
    keep = keep & ((before < top_p) | (rank == 0))
    return jnp.where(keep, xs, -jnp.inf), order


def sample_probs(logits: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """The sampling distribution over the vocabulary after filtering (for rejection sampling)."""
    xs, order = filtered_logits(logits, temperature, top_k, top_p)
    ps = jax.nn.softmax(xs, axis=-1)
    inv = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(ps, inv, axis=-1)


def select(logits: jax.Array, key: jax.Array, greedy: bool, temperature=1.0, top_k=0, top_p=1.0):
    """logits [B, V] -> token ids [B]."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    xs, order = filtered_logits(logits, temperature, top_k, top_p)
    idx = jax.random.categorical(key, xs, axis=-1)
    return jnp.take_along_axis(order, idx[:, None], axis=-1)[:, 0].astype(jnp.int32)
