"""The speculative loop's named state (flax.struct dataclasses: pytrees with named fields).

Shapes: B rows, Tv nodes per verification block, W = the most tokens one step can emit (deepest
tree + 1), nK step kinds (the drafter's trees), D0 / T0 the depth / size of the drafter's first tree,
D the model's hidden size, P the padded prompt length, K the most children a node has.

"Hidden" below is the full model's final-layer state *before* the final norm (the residual stream
after the last decoder layer, what `decoder.forward_hidden` returns); a drafter applies the frozen
final norm itself where it wants the LM head's input. The loop carries it only for drafters that set
`needs_hidden` (Medusa, EAGLE), taken from the prefill and verification forwards that run anyway.
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
    draft_passes: jax.Array  # [B] draft-model passes run for the row's steps (drafters that count them; else 0)


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
    hidden: jax.Array | None = None  # [B, D] the hidden state at slot pos - 1 (needs_hidden drafters only)


@struct.dataclass
class TreeLayout:
    """Per-row tree tables of one verification block, for drafters whose tree is built per step
    (`Drafter.dynamic`, EAGLE-2): the [B, ...] form of one `verify.TreeTables` row."""

    mask: jax.Array  # [B, Tv, Tv] ancestor mask (itself included; a padding node sees only itself)
    depth: jax.Array  # [B, Tv] (root and padding: 0)
    parent: jax.Array  # [B, Tv] (root and padding: 0)
    children: jax.Array  # [B, Tv, K] child nodes in rank order, -1 padded
    path: jax.Array  # [B, Tv, W] each node's ancestor at depth 0..W-1 (itself at its depth), 0 below


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
    hidden: jax.Array | None = None  # [B, D] the hidden state at slot pos - 1, whose logits chose cur
    prompt_hidden: jax.Array | None = None  # [B, P, D] every prompt slot's hidden state (init_state only)


@struct.dataclass
class StepResult:
    """What a stateful drafter learns from one verification step (`Drafter.update_state`)."""

    target: jax.Array  # [B, Tv] the full model's argmax at every node of the block (also when sampling)
    accepted: jax.Array  # [B] drafted tokens accepted (a)
    path: jax.Array  # [B, W] the accepted node ids, root first
    emitted: jax.Array  # [B, W] the tokens emitted this step (the accepted drafts, then the bonus token)
    n_new: jax.Array  # [B] how many of them count (a + 1, fewer at a stop token or max_new)
    hidden: jax.Array | None = None  # [B, W, D] the hidden state at each node of `path` (needs_hidden)


@struct.dataclass
class Proposal:
    tokens: jax.Array  # [B, Tv] the block: node 0 = cur, then the drafted nodes (padded)
    tree: jax.Array  # int32 scalar: which of the drafter's trees laid the block out
    layout: TreeLayout | None = None  # a dynamic drafter's per-row tree (then `tree` only names the kind)
    passes: jax.Array | None = None  # int32 scalar: draft-model passes run for this block (M2R2: depths drafted)
