"""The decoder's functional API over the Flax `Transformer` (model/modules.py) and the KV cache.

`forward` processes a block of T tokens per row, written into the KV cache at per-row slots
`start[b]`; RoPE positions are the absolute slot indices. The same function serves prefill
(start = 0, T = prompt chunk), decode (T = 1) and draft-tree verification (T = tree size,
`local_mask` = ancestor mask, `positions` = start + depth). `backend` (static) picks XLA's attention
or the CPU kernels' (backend.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import CacheAttention, cache_masks
from m2r2_jax.model.modules import ExitPolicy, Transformer
from m2r2_jax.model.params import module_tree


class KVCache(NamedTuple):
    """Per-layer K/V buffers, each [B, KV, S, hd] (lists: one buffer per layer)."""

    k: list
    v: list

    @property
    def length(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]


CACHE_AXES = ("cache_batch", "cache_heads", "cache_seq", "head_dim")


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
    cfg.check_cache_len(length)
    dt = dtype or cfg.jnp_dtype
    shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(
        [jnp.zeros(shape, dt) for _ in range(cfg.num_layers)], [jnp.zeros(shape, dt) for _ in range(cfg.num_layers)]
    )


def variables(params: dict) -> dict:
    """Params in the project's layout -> the variables `Transformer.apply` reads."""
    return {"params": module_tree(params)}


def rope_for(cfg: ModelConfig, positions: jax.Array):
    return L.rope_cos_sin(cfg, positions)


def cache_attention_for(cfg: ModelConfig, backend: Backend, cache: KVCache, start, T: int, local_mask):
    """layer -> its `CacheAttention` for a T-token block at slot start[b]."""
    mask = cache_masks(backend, start, T, cache.length, local_mask)
    return lambda i: CacheAttention(cfg, backend, cache.k[i], cache.v[i], start, mask)


def embed(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    return Transformer(cfg).apply(variables(params), tokens, method="embed_tokens")


def logits_from_hidden(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """Final norm + LM head -> f32 [..., V]."""
    return Transformer(cfg).apply(variables(params), h, method="logits")


def argmax_from_hidden(cfg: ModelConfig, params: dict, h: jax.Array) -> jax.Array:
    """argmax of `logits_from_hidden` -> int32 [...] (greedy decoding's only use of the logits); with a head
    packed for the CPU kernels the [..., V] logits are never formed (Transformer.argmax_logits)."""
    return Transformer(cfg).apply(variables(params), h, method="argmax_logits")


def forward_hidden(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,
    cache: KVCache,
    start: jax.Array,
    positions: jax.Array | None = None,
    local_mask: jax.Array | None = None,
    layer_range: tuple[int, int] | None = None,
    h: jax.Array | None = None,
    collect: bool = False,
    backend: Backend = XLA,
    exit_policy: ExitPolicy | None = None,
):
    """Run layers [lo, hi) over a block. Returns (h, cache, hiddens or None).

    tokens [B, T] int32; start [B] int32 slot of the block's first token; positions [B, T] RoPE
    positions (default start + arange(T)). With an `exit_policy`, see `forward_exit`."""
    h, cache, hiddens, _, _ = _run(
        cfg, params, tokens, cache, start, positions, local_mask, layer_range, h, collect, backend, exit_policy
    )
    return h, cache, hiddens


def forward_exit(
    cfg: ModelConfig,
    params: dict,
    tokens,
    cache: KVCache,
    start,
    exit_policy: ExitPolicy,
    backend: Backend = XLA,
    positions=None,
    local_mask=None,
):
    """A forward under an exit policy: -> (h at each token's exit, cache, exit_at [B, T] layers run)."""
    h, cache, _, exit_at, _ = _run(
        cfg, params, tokens, cache, start, positions, local_mask, None, None, False, backend, exit_policy
    )
    return h, cache, exit_at


def forward_routing(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,
    cache: KVCache,
    start: jax.Array,
    positions: jax.Array | None = None,
    backend: Backend = XLA,
):
    """A full forward that also returns which experts each token used: (logits [B, T, V] f32, cache,
    routing), routing = {layer: {"expert_ids" [B, T, k] int32, "expert_weights" [B, T, k],
    "router_probs" [B, T, E]}} for each MoE layer (dense layers absent; see model/moe.py)."""
    h, cache, _, _, record = _run(
        cfg, params, tokens, cache, start, positions, None, None, None, False, backend, None, record=True
    )
    layers = record.get("intermediates", {}).get("layers", {})
    routing = {int(i): {name: v[0] for name, v in d["mlp"].items()} for i, d in layers.items() if "mlp" in d}
    return logits_from_hidden(cfg, params, h), cache, dict(sorted(routing.items()))


def _run(
    cfg,
    params,
    tokens,
    cache,
    start,
    positions,
    local_mask,
    layer_range,
    h,
    collect,
    backend,
    exit_policy,
    record=False,
):
    """-> (h, cache, hiddens, exit_at, the sown intermediates when `record`, else None)."""
    B, T = tokens.shape
    start = start.astype(jnp.int32)
    if positions is None:
        positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
    cos, sin = rope_for(cfg, positions)
    lo, hi = layer_range or (0, cfg.num_layers)
    attention_for = cache_attention_for(cfg, backend, cache, start, T, local_mask)
    out = Transformer(cfg).apply(
        variables(params),
        tokens,
        cos,
        sin,
        attention_for,
        lo,
        hi,
        h,
        collect,
        exit_policy,
        mutable=["intermediates"] if record else False,
    )
    out, recorded = out if record else (out, None)
    h, states, hiddens, exit_at = out
    ks, vs = list(cache.k), list(cache.v)
    for i, (k, v) in states.items():
        ks[i], vs[i] = k, v
    return h, KVCache(ks, vs), hiddens, exit_at, recorded


def forward(
    cfg: ModelConfig,
    params: dict,
    tokens: jax.Array,
    cache: KVCache,
    start: jax.Array,
    positions: jax.Array | None = None,
    local_mask: jax.Array | None = None,
    backend: Backend = XLA,
):
    """Full model over a block: (logits [B, T, V] f32, updated cache)."""
    h, cache, _ = forward_hidden(cfg, params, tokens, cache, start, positions, local_mask, backend=backend)
    return logits_from_hidden(cfg, params, h), cache
