"""Verification and acceptance, shared by every drafter.

A drafter proposes a block of Tv nodes laid out by one of its static trees. The trees are stacked
into `TreeTables` (padded to Tv nodes; a padding node sees only itself, sits at depth 0 and is never
a child, so it is never accepted), and the block's tree is selected as data: one verification
forward and one acceptance serve every kind of step with the same shapes.

  verify   one full-model forward over the block (tree mask over the prefix cache), writing the
           nodes' K/V at slots pos .. pos+Tv-1; greedy, it returns only each node's argmax (with the
           CPU kernels the LM head is reduced to it on the fly: no [B, Tv, V] logits);
  accept   greedy: the deepest node whose every token equals the full model's argmax at its parent,
           plus the bonus token; sampling: recursive rejection sampling over each node's ranked
           children (lossless for one-hot proposals);
  compact  the accepted nodes' K/V move to contiguous slots pos+1 .. pos+a.

A dynamic drafter (EAGLE-2) builds its tree per step and row: its proposal carries the tables as data
(`state.TreeLayout`, [B, ...]); verification then masks each row with its own ancestor mask and
acceptance reads its rows' tables, with the same static Tv / W / K as the drafter's static trees.
`verify_hidden` also returns the final hidden states of the block (for drafters that read them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.backend import Backend
from m2r2_jax.decoding.state import TreeLayout
from m2r2_jax.decoding.trees import DraftTree
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import CacheAttention
from m2r2_jax.model.modules import Transformer


@dataclasses.dataclass(frozen=True)
class TreeTables:
    """Static trees padded to `block` nodes and stacked: [nT, ...] numpy tables."""

    trees: tuple[DraftTree, ...]
    block: int  # Tv
    width: int  # W = deepest tree + 1 (tokens one step can emit)
    mask: np.ndarray  # [nT, Tv, Tv] ancestor mask (itself included)
    depth: np.ndarray  # [nT, Tv]
    parent: np.ndarray  # [nT, Tv] (root and padding: 0)
    children: np.ndarray  # [nT, Tv, K] child nodes in rank order, -1 padded
    path: np.ndarray  # [nT, Tv, W] each node's ancestor at depth 0..W-1 (itself at its depth), 0 below

    @classmethod
    def of(cls, trees: Sequence[DraftTree], block: int | None = None) -> TreeTables:
        trees = tuple(trees)
        Tv = max([t.size for t in trees] + [block or 0])
        W = max(t.max_depth for t in trees) + 1
        K = max(t.children.shape[1] for t in trees)
        nT = len(trees)
        mask = np.zeros((nT, Tv, Tv), bool)
        depth = np.zeros((nT, Tv), np.int32)
        parent = np.zeros((nT, Tv), np.int32)
        children = np.full((nT, Tv, K), -1, np.int32)
        path = np.zeros((nT, Tv, W), np.int32)
        for i, t in enumerate(trees):
            n = t.size
            mask[i] = np.eye(Tv, dtype=bool)
            mask[i, :n, :n] = t.ancestor_mask
            depth[i, :n] = t.depth
            parent[i, :n] = np.maximum(t.parent, 0)
            children[i, :n, : t.children.shape[1]] = t.children
            for j in range(n):
                k = j
                while k >= 0:
                    path[i, j, t.depth[k]] = k
                    k = t.parent[k]
        return cls(trees, Tv, W, mask, depth, parent, children, path)

    def layout(self, tree: int, B: int) -> TreeLayout:
        """Static tree `tree`'s tables as a per-row layout (what a dynamic drafter's composite hands
        the loop when one of its static trees drafted)."""

        def rows(x):
            return jnp.broadcast_to(jnp.asarray(x[tree])[None], (B,) + x.shape[1:])

        return TreeLayout(rows(self.mask), rows(self.depth), rows(self.parent), rows(self.children), rows(self.path))

    def __hash__(self):
        return hash((self.trees, self.block))

    def __eq__(self, other):
        return isinstance(other, TreeTables) and (self.trees, self.block) == (other.trees, other.block)


def verify(cfg, backend: Backend, base, tt: TreeTables, tree, toks, cache, pos, greedy: bool = False):
    """-> (logits [B, Tv, V] f32, cache with the block's K/V at slots pos ..); `greedy`: the full model's
    argmax at each node [B, Tv] int32 in place of the logits (all greedy acceptance reads)."""
    out, cache, _ = verify_hidden(cfg, backend, base, tt, tree, toks, cache, pos, greedy=greedy)
    return out, cache


def verify_hidden(
    cfg,
    backend: Backend,
    base,
    tt: TreeTables,
    tree,
    toks,
    cache,
    pos,
    layout: TreeLayout | None = None,
    greedy: bool = False,
):
    """`verify`, also returning the block's final hidden states: -> (logits [B, Tv, V] f32, cache,
    hidden [B, Tv, D] before the final norm); `verify` is the same forward, returning no hidden states.
    With a `layout` (a dynamic tree) each row is masked by its own ancestor mask; the block-attention
    kernels take one mask for the batch, so there the batch must be one row. `greedy`: the argmax at
    each node [B, Tv] int32 in place of the logits; with the CPU kernels' packed head the [B, Tv, V]
    logits are then never formed (`decoder.argmax_from_hidden`: the same indices, ties to the lowest)."""
    head = D.argmax_from_hidden if greedy else D.logits_from_hidden
    if layout is None:
        depth = jnp.asarray(tt.depth)[tree]
        h, cache, _ = D.forward_hidden(
            cfg,
            base,
            toks,
            cache,
            pos,
            positions=pos[:, None] + depth[None],
            local_mask=jnp.asarray(tt.mask)[tree],
            backend=backend,
        )
        return head(cfg, base, h), cache, h
    B, T = toks.shape
    start = pos.astype(jnp.int32)
    if backend.block_attention is not None:
        if B != 1:
            raise M2R2Error("a dynamic draft tree with the block-attention kernels needs batch size 1")
        mask = layout.mask[0]
    else:  # per row: the cached prefix, then the block under the row's own ancestor mask
        rel = jnp.arange(cache.length)[None, :] - start[:, None]  # [B, S]
        loc = jnp.take_along_axis(
            layout.mask, jnp.broadcast_to(jnp.clip(rel, 0, T - 1)[:, None], (B, T, cache.length)), 2
        )
        mask = (rel < 0)[:, None] | (((rel >= 0) & (rel < T))[:, None] & loc)
    cos, sin = D.rope_for(cfg, start[:, None] + layout.depth)
    h, states, _, _ = Transformer(cfg).apply(
        D.variables(base), toks, cos, sin, lambda i: CacheAttention(cfg, backend, cache.k[i], cache.v[i], start, mask)
    )
    ks, vs = list(cache.k), list(cache.v)
    for i, (k, v) in states.items():
        ks[i], vs[i] = k, v
    return head(cfg, base, h), D.KVCache(ks, vs), h


def accept_greedy(tt: TreeTables, tree, toks, target, layout: TreeLayout | None = None):
    """target [B, Tv]: the full model's argmax at each node.
    -> (accepted depth a [B], path [B, W] node ids root..deepest accepted, bonus [B], correct [B, Tv])."""
    Tv = tt.block
    if layout is not None:  # the same, each row under its own tables
        correct = (toks == jnp.take_along_axis(target, layout.parent, 1)).at[:, 0].set(True)
        ok = node_accepted(layout.mask, correct)
        best = jnp.argmax(jnp.where(ok, layout.depth * Tv + (Tv - jnp.arange(Tv))[None], -1), -1)
        path = jnp.take_along_axis(layout.path, best[:, None, None], 1)[:, 0]
        bonus = jnp.take_along_axis(target, best[:, None], 1)[:, 0]
        return jnp.take_along_axis(layout.depth, best[:, None], 1)[:, 0], path, bonus, correct
    par, anc = jnp.asarray(tt.parent)[tree], jnp.asarray(tt.mask)[tree]
    depth = jnp.asarray(tt.depth)[tree]
    correct = (toks == target[:, par]).at[:, 0].set(True)
    ok = node_accepted(anc, correct)
    score = jnp.where(ok, depth[None] * Tv + (Tv - jnp.arange(Tv)), -1)
    best = jnp.argmax(score, -1)
    path = jnp.asarray(tt.path)[tree][best]
    bonus = jnp.take_along_axis(target, best[:, None], 1)[:, 0]
    return depth[best], path, bonus, correct


def node_accepted(anc, correct):
    """anc [Tv, Tv] (or per row [B, Tv, Tv]), correct [B, Tv] -> [B, Tv]: the node and all its
    ancestors matched."""
    return jnp.all(jnp.where(anc[None] if anc.ndim == 2 else anc, correct[:, None, :], True), -1)


def accept_sampling(tt: TreeTables, tree, toks, probs, key, layout: TreeLayout | None = None):
    """Recursive rejection sampling with one-hot (top-k) proposals; exact for the base distribution.
    probs [B, Tv, V]: the sampling distribution at each node. -> (a, path [B, W], bonus, correct).
    The proposals only have to be fixed before the target is sampled (any deterministic draft, a
    dynamic tree's included)."""
    if layout is None:
        children, paths, axis = jnp.asarray(tt.children)[tree], jnp.asarray(tt.path)[tree], None
    else:
        children, paths, axis = layout.children, layout.path, 0

    def row(toks, probs, key, children, paths):
        node, alive, a = jnp.int32(0), jnp.bool_(True), jnp.int32(0)
        p = probs[0]
        for _ in range(tt.width):
            found, nxt = jnp.bool_(False), node
            for r in range(children.shape[1]):
                c = children[node, r]
                valid = alive & ~found & (c >= 0)
                x = toks[jnp.maximum(c, 0)]
                key, sub = jax.random.split(key)
                u = jax.random.uniform(sub)
                ok = valid & (u * jnp.sum(p) < p[x])
                found, nxt = found | ok, jnp.where(ok, c, nxt)
                p = jnp.where(valid & ~ok, p.at[x].set(0.0), p)
            a = a + (alive & found)
            node = jnp.where(alive & found, nxt, node)
            p = jnp.where(alive & found, probs[nxt], p)
            alive = alive & found
        key, sub = jax.random.split(key)
        bonus = jax.random.categorical(sub, jnp.log(jnp.maximum(p, 0.0)))
        return a, paths[node], bonus.astype(jnp.int32)

    keys = jax.random.split(key, toks.shape[0])
    a, path, bonus = jax.vmap(row, (0, 0, 0, axis, axis))(toks, probs, keys, children, paths)
    return a, path, bonus, jnp.zeros(toks.shape, bool)


def compact(cache: D.KVCache, pos, path) -> D.KVCache:
    """Move accepted nodes' K/V (slots pos + path[k]) to slots pos + k, k = 1..W-1."""
    src = pos[:, None] + path[:, 1:]  # [B, W-1]

    def move(c):
        g = jnp.take_along_axis(c, src[:, None, :, None], axis=2)  # [B, KV, W-1, hd]
        return L.write_cache(c, g, pos + 1)

    return D.KVCache([move(c) for c in cache.k], [move(c) for c in cache.v])
