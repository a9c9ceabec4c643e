"""EAGLE and EAGLE-2 in the shared loop: the trained one-layer feature-level draft model (peers/eagle.py)
expands a draft tree from the full model's final feature at slot pos - 1 (`view.hidden`, carried from the
verification forward: no extra forward), feeding its own predicted features back in.

Positions: the draft's input at position t is the pair (f_t, x_{t+1}). The drafter keeps its own K/V
cache of the pairs at positions < pos - 1 (its carried state): `init_state` fills it with the prompt's
pairs from the prefill's features, and `update_state` appends the pairs of each step's accepted path with
the *verified* features (`StepResult.hidden`), as EAGLE recomputes its draft cache from the real
features after acceptance: pairs (f_{pos-1}, cur), (f at node path[0], x at path[1]), ... at positions
pos - 1 .. (one W-token block through the draft layer; the pairs past the accepted count land at
positions >= the next pos - 1, which the next steps mask and overwrite). The root pair (f_{pos-1}, cur)
is run again in `propose`, where its output gives the first draft distribution.

EAGLE (static tree, `EagleDrafter`): depth by depth, every expanded node's pair (its parent's predicted
feature, its token) runs through the draft layer, attending to the draft cache and to its tree
ancestors' K/V (a draft-local buffer); its children are the top-ranked tokens of the LM head on its
output. The draft layer runs XLA's attention on every backend (one layer; the base's verification keeps
the CPU kernels).

EAGLE-2 (`Eagle2Drafter`, the same weights): a dynamic tree in static shapes. The root's top-k tokens are
the first candidates and the first frontier; then, for depth - 1 rounds, the k frontier nodes run through
the draft layer in one call and each proposes its top-k children, scored by cumulative draft
log-probability (parent's score + log p); the k best of those k^2 become the next frontier (their
ancestors' K/V visibility is carried as a per-row mask over the expanded nodes). That gives a fixed node
budget of k + (depth - 1) k^2 candidates, from which the `nodes` with the highest cumulative score are
kept (reranked to the verify budget; a node never scores above its parent and ties go to the earlier
candidate, so the kept set contains every kept node's parent). Mapped onto the loop's static verification
block: the Tv = nodes + 1 block holds cur and the kept candidates in candidate order (parents first), and
the proposal carries that step's per-row tables (`Proposal.layout`: ancestor mask, depths = RoPE offsets,
parents, children in score order, root paths), which verification and acceptance read in place of a
static tree's; the drafter's static `trees` is an envelope (Tv nodes, `depth` deep, k children) that
fixes the shapes W and K. With the block-attention kernels (one mask per batch) EAGLE-2 runs at batch 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.drafters import Drafter
from m2r2_jax.decoding.peer_drafters.trained import TrainedPeerOptions, check_tree_ranks
from m2r2_jax.decoding.state import DraftView, Proposal, StepResult, TreeLayout
from m2r2_jax.decoding.trees import DraftTree, build_tree, get_tree
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model.attention import CacheAttention, SetsAttention, cache_masks
from m2r2_jax.peers import eagle as E
from m2r2_jax.peers.medusa import final_features, lm_head


@struct.dataclass
class EagleState:
    k: jax.Array  # [B, KV, S, hd] the draft layer's K of the pairs at positions < pos - 1
    v: jax.Array


def _draft_attention(cfg, st: EagleState, plen, lk, lv, anc) -> SetsAttention:
    """n nodes per row over the draft cache's first plen[b] slots, the local buffer lk / lv [B, KV, E, hd]
    under anc [B, n, E] (their ancestors) and themselves."""
    B, n, S = anc.shape[0], anc.shape[1], st.k.shape[2]
    prefix = jnp.broadcast_to((jnp.arange(S)[None, :] < plen[:, None])[:, None, :], (B, n, S))
    eye = jnp.broadcast_to(jnp.eye(n, dtype=bool)[None], (B, n, n))
    return SetsAttention(cfg, XLA, sets=[(st.k, st.v, prefix), (lk, lv, anc)], self_mask=eye)


def _block_into_cache(cfg, base, draft, st: EagleState, feats, toks, start) -> EagleState:
    """Pairs (feats [B, T, D] before the final norm, toks [B, T]) at positions start[b] .. through the
    draft layer, their K/V written into the draft cache at those slots (causal within the block)."""
    T, S = toks.shape[1], st.k.shape[2]
    att = CacheAttention(cfg, XLA, st.k, st.v, start, cache_masks(XLA, start, T, S, None))
    pos = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    _, (k, v) = E.draft_apply(cfg, base, draft, final_features(cfg, base, feats), toks, pos, att)
    return EagleState(k, v)


class _EagleBase(Drafter):
    """The draft cache: prefill from the prompt's features, extension by each step's accepted path."""

    needs_hidden = True
    needs_text = True  # init_state reads the prompt's tokens
    stateful = True

    def prepare(self, base, params):
        """-> {"draft": the draft model, "base": the base's embedding, final norm (and untied head): what
        `update_state`, which has no base argument, reads of it}."""
        want = jax.tree.map(lambda x: tuple(x.shape), jax.eval_shape(lambda: E.init_draft(self.cfg)))
        try:
            same = jax.tree.map(lambda x: tuple(np.shape(x)), params) == want
        except (TypeError, ValueError):
            same = False
        if not same:
            raise M2R2Error("eagle: the draft params do not match this base model's shapes")
        return {"draft": params, "base": {k: base[k] for k in ("embed", "final_norm", "lm_head") if k in base}}

    def init_state(self, dparams, base, view: DraftView) -> EagleState:
        cfg = self.cfg
        B, P, _ = view.prompt_hidden.shape
        shape = (B, cfg.num_kv_heads, view.cache.length, cfg.head_dim)
        st = EagleState(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))
        toks = view.text[:, 1 : P + 1]  # x_{t+1} for t = 0 .. P-1 (past each prompt: masked, overwritten)
        return _block_into_cache(cfg, base, dparams["draft"], st, view.prompt_hidden, toks, jnp.zeros((B,), jnp.int32))

    def update_state(self, dparams, dstate: EagleState, view: DraftView, prop: Proposal, step: StepResult):
        feats = jnp.concatenate([view.hidden[:, None], step.hidden[:, :-1]], 1)  # f_{pos-1}, f at path[0], ...
        toks = jnp.take_along_axis(prop.tokens, step.path, 1)  # cur, x at path[1], ...
        new = _block_into_cache(self.cfg, dparams["base"], dparams["draft"], dstate, feats, toks, view.pos - 1)
        act = view.active[:, None, None, None]
        return EagleState(jnp.where(act, new.k, dstate.k), jnp.where(act, new.v, dstate.v))

    def root(self, dparams, base, view: DraftView, E_: int):
        """The root pair (f_{pos-1}, cur) at position pos - 1 -> (its output [B, 1, D], its K / V in slot 0
        of fresh local buffers [B, KV, E_, hd])."""
        cfg = self.cfg
        B = view.cur.shape[0]
        plen = view.pos - 1
        shape = (B, cfg.num_kv_heads, E_, cfg.head_dim)
        lk, lv = jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype)
        att = _draft_attention(cfg, view.dstate, plen, lk, lv, jnp.zeros((B, 1, E_), bool))
        f0 = final_features(cfg, base, view.hidden)[:, None]
        out, (k, v) = E.draft_apply(cfg, base, dparams["draft"], f0, view.cur[:, None], plen[:, None], att)
        return out, lk.at[:, :, :1].set(k.astype(lk.dtype)), lv.at[:, :, :1].set(v.astype(lv.dtype))


@dataclasses.dataclass(frozen=True, eq=True)
class EagleDrafter(_EagleBase):
    cfg: ModelConfig
    tree: Any = "tree16"

    def __post_init__(self):
        E.check_base(self.cfg)
        object.__setattr__(self, "tree", get_tree(self.tree))
        check_tree_ranks("eagle", self.tree, self.cfg)

    @property
    def trees(self):
        return (self.tree,)

    @property
    def kinds(self):
        return ("eagle",)

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        cfg, t = self.cfg, self.tree
        B, T = view.cur.shape[0], t.size
        plen = view.pos - 1
        out0, lk, lv = self.root(dparams, base, view, T)
        toks = jnp.zeros((B, T), jnp.int32).at[:, 0].set(view.cur)
        outs = jnp.zeros((B, T, cfg.hidden_size), out0.dtype).at[:, :1].set(out0)
        for d in range(t.max_depth):
            nodes = np.asarray([i for i in t.levels[d] if t.children[i, 0] >= 0], np.int32)
            if len(nodes) == 0:
                continue
            if d > 0:  # (the root ran in `root`)
                anc = t.ancestor_mask[nodes].copy()
                anc[np.arange(len(nodes)), nodes] = False
                att = _draft_attention(
                    cfg, view.dstate, plen, lk, lv, jnp.broadcast_to(jnp.asarray(anc)[None], (B,) + anc.shape)
                )
                pos = jnp.broadcast_to(plen[:, None] + d, (B, len(nodes)))
                feat = outs[:, t.parent[nodes]]
                o, (k, v) = E.draft_apply(cfg, base, dparams["draft"], feat, toks[:, nodes], pos, att)
                lk, lv = lk.at[:, :, nodes].set(k.astype(lk.dtype)), lv.at[:, :, nodes].set(v.astype(lv.dtype))
                outs = outs.at[:, nodes].set(o)
            _, top = lax.top_k(lm_head(cfg, base, outs[:, nodes]), t.topk)  # [B, n, topk]
            kids = [(ii, int(c)) for ii, i in enumerate(nodes) for c in t.children[i] if c >= 0]
            slot = np.asarray([ii for ii, _ in kids])
            ch = np.asarray([c for _, c in kids])
            toks = toks.at[:, ch].set(top[:, slot, t.rank[ch]].astype(jnp.int32))
        return Proposal(toks, jnp.int32(0))


def envelope_tree(topk: int, depth: int, nodes: int) -> DraftTree:
    """The static shapes of EAGLE-2's blocks: nodes + 1 nodes, `depth` deep, `topk` children at the root."""
    paths = [(r,) for r in range(topk)] + [(0,) * d for d in range(2, depth + 1)]
    frontier = [()]
    for _ in range(depth):  # then breadth-first over the full topk-ary tree until `nodes` paths
        frontier = [p + (r,) for p in frontier for r in range(topk)]
        paths += [p for p in frontier if p not in paths][: max(0, nodes - len(paths))]
    return build_tree(paths[:nodes], f"eagle2_k{topk}d{depth}n{nodes}")


def layout_from_parents(parent, depth, K: int, W: int) -> TreeLayout:
    """Per-row tables from parent [B, Tv] (root: 0; parents before children) and depth [B, Tv]."""
    B, Tv = parent.shape
    ar = jnp.arange(Tv, dtype=jnp.int32)
    x = jnp.broadcast_to(ar[None], (B, Tv))
    mask = jnp.broadcast_to(jnp.eye(Tv, dtype=bool)[None], (B, Tv, Tv))
    slots = jnp.arange(W, dtype=jnp.int32)[None, None]
    path = jnp.where(slots == depth[..., None], x[..., None], 0)
    for _ in range(W - 1):  # walk up one ancestor at a time (the root is its own parent)
        x = jnp.take_along_axis(parent, x, 1)
        mask = mask | (x[..., None] == ar[None, None])
        path = jnp.where(slots == jnp.take_along_axis(depth, x, 1)[..., None], x[..., None], path)
    is_child = (parent[:, None, :] == ar[None, :, None]) & (ar[None, None, :] > 0)  # [B, parent, child]
    kids = jnp.sort(jnp.where(is_child, ar[None, None, :], Tv), -1)[..., :K]
    return TreeLayout(mask, depth.astype(jnp.int32), parent.astype(jnp.int32), jnp.where(kids < Tv, kids, -1), path)


@dataclasses.dataclass(frozen=True, eq=True)
class Eagle2Drafter(_EagleBase):
    cfg: ModelConfig
    topk: int = 4  # children expanded per frontier node, and the frontier's width
    tree_depth: int = 4  # the root's expansion, then tree_depth - 1 rounds (not `depth`: M2R2's draft layers)
    nodes: int = 15  # drafted nodes verified (the verify block is nodes + 1)
    dynamic = True

    def __post_init__(self):
        E.check_base(self.cfg)
        check_eagle2(self.topk, self.tree_depth, self.nodes)
        if self.topk > self.cfg.vocab_size:
            raise M2R2Error(f"eagle2: topk {self.topk} exceeds the vocabulary")

    @property
    def candidates(self) -> int:
        return self.topk + (self.tree_depth - 1) * self.topk**2

    @property
    def trees(self):
        return (envelope_tree(self.topk, self.tree_depth, self.nodes),)

    @property
    def kinds(self):
        return ("eagle2",)

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        cfg, k, n = self.cfg, self.topk, self.nodes
        B = view.cur.shape[0]
        plen = view.pos - 1
        E_ = 1 + (self.tree_depth - 1) * k  # expanded nodes: the root, then k per round
        out0, lk, lv = self.root(dparams, base, view, E_)
        score, tok = lax.top_k(jax.nn.log_softmax(lm_head(cfg, base, out0[:, 0]), -1), k)  # [B, k]
        toks, scores, parents = [tok], [score], [jnp.full((B, k), -1, jnp.int32)]
        fidx = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None], (B, k))  # the frontier's candidate ids
        fin = jnp.broadcast_to(out0, (B, k, cfg.hidden_size))  # its input features (the parents' outputs)
        fanc = jnp.zeros((B, k, E_), bool).at[:, :, 0].set(True)  # its ancestors among the expanded nodes
        for i in range(1, self.tree_depth):
            ent = 1 + (i - 1) * k  # this round's local buffer slots ent .. ent + k - 1
            att = _draft_attention(cfg, view.dstate, plen, lk, lv, fanc)
            pos = jnp.broadcast_to(plen[:, None] + i, (B, k))
            out, (kk, vv) = E.draft_apply(cfg, base, dparams["draft"], fin, tok, pos, att)
            lk = lk.at[:, :, ent : ent + k].set(kk.astype(lk.dtype))
            lv = lv.at[:, :, ent : ent + k].set(vv.astype(lv.dtype))
            lp, ct = lax.top_k(jax.nn.log_softmax(lm_head(cfg, base, out), -1), k)  # [B, k, k]
            cum = (score[:, :, None] + lp).reshape(B, k * k)
            toks.append(ct.reshape(B, k * k).astype(jnp.int32))
            scores.append(cum)
            parents.append(jnp.repeat(fidx, k, axis=1))
            if i < self.tree_depth - 1:  # the next frontier: the k best of the k^2 by cumulative score
                score, flat = lax.top_k(cum, k)
                j = flat // k
                fidx = (k + (i - 1) * k * k + flat).astype(jnp.int32)
                fin = jnp.take_along_axis(out, j[..., None], 1)
                tok = jnp.take_along_axis(toks[-1], flat, 1)
                own = jax.nn.one_hot(ent + j, E_, dtype=bool)
                fanc = jnp.take_along_axis(fanc, j[..., None], 1) | own
        toks, scores, parents = (jnp.concatenate(x, 1) for x in (toks, scores, parents))  # [B, N]
        cdepth = jnp.asarray(
            np.repeat(np.arange(1, self.tree_depth + 1), [k] + [k * k] * (self.tree_depth - 1)), jnp.int32
        )
        keep = jnp.sort(jnp.argsort(-scores, axis=1, stable=True)[:, :n], axis=1)  # [B, n], candidate order
        block = jnp.zeros((B, self.candidates), jnp.int32).at[jnp.arange(B)[:, None], keep].set(1 + jnp.arange(n))
        par = jnp.take_along_axis(parents, keep, 1)
        par = jnp.where(par < 0, 0, jnp.take_along_axis(block, jnp.maximum(par, 0), 1))
        z = jnp.zeros((B, 1), jnp.int32)
        lay = layout_from_parents(
            jnp.concatenate([z, par], 1), jnp.concatenate([z, cdepth[keep]], 1), k, self.tree_depth + 1
        )
        btoks = jnp.concatenate([view.cur[:, None], jnp.take_along_axis(toks, keep, 1)], 1)
        return Proposal(btoks, jnp.int32(0), lay)


def check_eagle2(topk, depth, nodes) -> None:
    for name, v, lo in (("topk", topk, 1), ("depth", depth, 1), ("nodes", nodes, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise M2R2Error(f"eagle2: {name} must be an integer >= {lo}, got {v!r}")
    if topk > 16 or depth > 12:
        raise M2R2Error(f"eagle2: topk must be <= 16 and depth <= 12 (got {topk}, {depth})")
    budget = topk + (depth - 1) * topk**2
    if not topk + depth - 1 <= nodes <= min(budget, 255):
        raise M2R2Error(
            f"eagle2: nodes must be in [topk + depth - 1, min(topk + (depth - 1) topk^2, 255)] = "
            f"[{topk + depth - 1}, {min(budget, 255)}], got {nodes}"
        )


@dataclasses.dataclass(frozen=True)
class EagleOptions(TrainedPeerOptions):
    """checkpoint: train.train_eagle's --out (or a step dir); tree: the static tree, a preset or JSON file
    (default tree16); lookup N > 0: combined with prompt lookup (`eagle+lookup` in eval.compare)."""

    tree: Any = "tree16"
    name = "eagle"
    kind = E.KIND

    def __post_init__(self):
        self.check_common()
        object.__setattr__(self, "tree", get_tree(self.tree))
        self.peer_config()

    def peer_config(self) -> E.EagleConfig:
        return self.config_from_meta(E.EagleConfig)

    def abstract_params(self, cfg):
        return jax.eval_shape(lambda: E.init_draft(cfg))

    def peer(self, cfg, backend: Backend = XLA) -> EagleDrafter:
        return EagleDrafter(cfg, self.tree)


@dataclasses.dataclass(frozen=True)
class Eagle2Options(TrainedPeerOptions):
    """EAGLE-2 on an EAGLE checkpoint: topk children per frontier node, depth, nodes verified."""

    topk: int = 4
    depth: int = 4
    nodes: int = 15
    name = "eagle2"
    kind = E.KIND

    def __post_init__(self):
        self.check_common()
        check_eagle2(self.topk, self.depth, self.nodes)
        self.peer_config()

    def peer_config(self) -> E.EagleConfig:
        return self.config_from_meta(E.EagleConfig)

    def abstract_params(self, cfg):
        return jax.eval_shape(lambda: E.init_draft(cfg))

    def peer(self, cfg, backend: Backend = XLA) -> Eagle2Drafter:
        return Eagle2Drafter(cfg, self.topk, self.depth, self.nodes)
