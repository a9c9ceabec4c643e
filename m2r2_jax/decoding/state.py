"""The speculative loop's named state (flax.struct dataclasses: pytrees with named fields).

Shapes: B rows, Tv nodes per verification block, W = the most tokens one step can emit (deepest
tree + 1), nK step kinds (the drafter's trees), D0 / T0 the depth / size of the drafter's first tree.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class SpecStats:
    steps: jax.Array  # [B] verification steps
    accepted: jax.Array  # [B] drafted tokens accepted (the bonus token not counted)
    kind_steps: jax.Array  # [B, nK] steps per step kind (the drafter's tree that drafted it)
    kind_accepted: jax.Array  # [B, nK] ... and their accepted tokens
    depth_hits: jax.Array  # [B, D0 + 1] first-tree steps whose accepted depth >= d
    node_tries: jax.Array  # [B, T0] first-tree steps where the node's parent was accepted (greedy)
    node_hits: jax.Array  # [B, T0] ... and the node itself matched


@struct.dataclass
class SpecState:
    pos: jax.Array  # [B] tokens in the slow cache (the slot `cur` goes to)
    cur: jax.Array  # [B] the last accepted token, not yet in the cache
    cache: object  # model.decoder.KVCache
    out: jax.Array  # [B, max_new + W] emitted tokens
    n_out: jax.Array  # [B] how many are valid
    done: jax.Array  # [B] row finished (stop token or max_new)
    key: jax.Array  # PRNG key (sampling)
    stats: SpecStats
    text: jax.Array | None  # [B, H] prompt + emitted tokens (only when the drafter reads the text)
    dstate: object = None  # a stateful drafter's own carried state (Drafter.init_state); None otherwise


@struct.dataclass
class DraftView:
    """What a drafter reads each step (read-only: a drafter never writes the cache)."""

    cache: object  # KVCache, pos[b] slots filled
    pos: jax.Array  # [B]
    cur: jax.Array  # [B] the root of the block (the last accepted token)
    text: jax.Array | None  # [B, H] the text so far (when the drafter asked for it)
    text_len: jax.Array  # [B] its length (prompt + emitted)
    active: jax.Array  # [B] rows still decoding
    dstate: object = None  # the drafter's carried state (stateful drafters only)


@struct.dataclass
class StepResult:
    """What a stateful drafter learns from one verification step (`Drafter.update_state`)."""

    target: jax.Array  # [B, Tv] the full model's argmax at every node of the block (also when sampling)
    accepted: jax.Array  # [B] drafted tokens accepted (a)
    path: jax.Array  # [B, W] the accepted node ids, root first
    emitted: jax.Array  # [B, W] the tokens emitted this step (the accepted drafts, then the bonus token)
    n_new: jax.Array  # [B] how many of them count (a + 1, fewer at a stop token or max_new)


@struct.dataclass
class Proposal:
    tokens: jax.Array  # [B, Tv] the block: node 0 = cur, then the drafted nodes (padded)
    tree: jax.Array  # int32 scalar: which of the drafter's trees laid the block out
