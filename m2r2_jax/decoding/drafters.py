"""Drafters: what proposes the candidate block of each speculative step.

A drafter is a static object (hashable config: part of the jitted loop's closure) with

  trees        its static draft trees; a proposal says which one laid its block out (verify.py pads
               and stacks them, so every kind of step verifies the same Tv-node block)
  kinds        one name per tree, for the per-kind statistics ("m2r2", "lookup", ...)
  needs_text   the loop keeps the text so far (prompt + emitted tokens) for it
  lookahead    tokens it may read past the end of the text (sizes the text buffer)
  prepare(base, ...) -> its jit argument (trained weights etc.), built once per checkpoint
  propose(dparams, base, view: DraftView) -> Proposal(tokens [B, Tv], tree)

`propose` reads the cache and never writes it. Verification, acceptance, the lossless checks and
the cost accounting (verify.py, speculative.py) are the same for every drafter: a new one (a peer's
drafter, a test fixture) plugs in by implementing these.

A drafter that keeps state across steps (Lookahead's n-gram pool and Jacobi window) sets `stateful`
and implements `init_state` (after prefill) and `update_state` (after each verification, from the
full model's argmax at every node of the block, `StepResult`); the loop carries that pytree in its
state and hands it to `propose` as `view.dstate`. Stateless drafters never see any of this.

A drafter that reads the full model's final hidden states (Medusa's heads, EAGLE's features) sets
`needs_hidden`: the loop then takes them from the prefill and verification forwards it runs anyway
(no extra forward) and hands `view.hidden` (the state at slot pos - 1, whose logits chose cur),
`view.prompt_hidden` (every prompt slot, in `init_state`) and `StepResult.hidden` (the accepted
path's nodes), all before the final norm (state.py). A drafter that builds its tree per step (EAGLE-2)
sets `dynamic` and returns the tree's tables with each proposal (`Proposal.layout`); its `trees`
then only fix the static shapes (Tv nodes, depth, children per node) its trees stay within.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2r2_jax import kernels as K
from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.state import DraftView, Proposal, StepResult
from m2r2_jax.decoding.trees import DraftTree, build_tree, chain
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.modules import FastStream
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import tree_draft_attention


class Drafter:
    trees: tuple[DraftTree, ...] = ()
    kinds: tuple[str, ...] = ()
    needs_text: bool = False
    lookahead: int = 0
    block: int = 0  # verify at least this many nodes (a composite pads its parts to one block)
    stateful: bool = False  # carries `init_state`'s pytree through the loop
    needs_hidden: bool = False  # reads the full model's final hidden states (view.hidden, ...)
    dynamic: bool = False  # its proposals carry their own per-row tree (Proposal.layout)

    def prepare(self, base, *sources) -> Any:
        return None

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        raise NotImplementedError

    def init_state(self, dparams, base, view: DraftView) -> Any:
        """The carried state after prefill (stateful drafters; `view.dstate` is None here)."""
        return None

    def update_state(self, dparams, dstate, view: DraftView, prop: Proposal, step: StepResult) -> Any:
        """The state after one verification step (rows with `view.active` False must keep theirs)."""
        return dstate

    @property
    def block_size(self) -> int:
        return max([t.size for t in self.trees] + [self.block])


def pad_block(x: jax.Array, n: int) -> jax.Array:
    """[B, t] -> [B, n] (padding nodes carry token 0)."""
    return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))


# ----------------------------------------------------------------------------- M2R2


def confident_step(going: jax.Array, step, carry):
    """The chain drafters' confidence stop (Draft & Verify, Kangaroo, SpS, M2R2 with `stop`): `step(carry)`
    runs only while some row of `going` [B] is still confident, else `carry` passes through unchanged, so
    once every row has stopped the remaining draft steps cost nothing. Static shapes: the slots a skipped
    step would have drafted keep their token 0 and are verified like any draft (accepted only where the
    full model agrees: the loop stays lossless without a per-row length); a row that stopped while
    another goes on keeps what the batch drafts for it (free: the block is verified whole)."""
    return lax.cond(jnp.any(going), step, lambda c: c, carry)


def check_stop(label: str, stop) -> None:
    if isinstance(stop, bool) or not isinstance(stop, (int, float)) or not 0.0 <= stop < 1.0:
        raise M2R2Error(f"{label}: draft stop must be a probability in [0, 1) (0 = off), got {stop!r}")


DRAFT_DTYPES = ("float32", "bfloat16")


def check_draft_dtype(label: str, dtype) -> None:
    if dtype not in DRAFT_DTYPES:
        raise M2R2Error(f"{label}: draft dtype must be one of {', '.join(DRAFT_DTYPES)}, got {dtype!r}")


@dataclasses.dataclass(frozen=True, eq=True)
class M2R2Drafter(Drafter):
    """The fast stream expands a static tree depth by depth: all nodes of a depth in one batched call
    of the merged fast layers (`FastStream(merged=True)`), reading the slow cache for the prefix and a
    draft-local K/V buffer for each node's tree ancestors; each node's children are the draft head's
    top-ranked tokens.

    `stop` > 0 (the confidence stop, `confident_step`): after each depth's pass a row goes on only while
    some node the next pass would expand was drafted with probability >= `stop` (the draft head's softmax
    over the draft vocabulary; on a chain, the top-1 probability of the token just drafted, as Draft &
    Verify's stop); once no active row goes on, the remaining depths' fast-stream passes do not run and
    their nodes keep token 0. The first pass always runs, so a one-depth tree (the default star4) is
    unaffected. 0: today's loop exactly (no `lax.cond`).

    `draft_dtype` bfloat16: the merged fast layers and the draft head stored in bf16 (cast once in
    `prepare`, after the adapters are merged) and multiplied in bf16 with f32 accumulation
    (`ModelConfig.matmul_dtype`); activations, the draft-local K/V and verification stay in the model's
    dtype, so the output still equals AR's. float32: the weights as loaded."""

    cfg: ModelConfig
    mc: M2R2Config
    tree: DraftTree
    draft_layers: int = 0  # fast layers used to draft (0 = all L_f)
    backend: Backend = XLA
    stop: float = 0.0  # the confidence stop (0 = off)
    draft_dtype: str = "float32"  # the draft weights' dtype

    def __post_init__(self):
        n = self.mc.n_fast(self.cfg.num_layers)
        if not 0 <= self.draft_layers <= n:
            raise M2R2Error(f"draft_layers={self.draft_layers} must be in [0, {n}] (0 = all)")
        if self.mc.branch:
            raise M2R2Error(
                "drafting with branch > 0 is not implemented (the slow stream would have to run "
                "the first b layers for draft tokens)"
            )
        check_stop("m2r2", self.stop)
        check_draft_dtype("m2r2", self.draft_dtype)

    @property
    def depth(self) -> int:
        return self.draft_layers or self.mc.n_fast(self.cfg.num_layers)

    @property
    def trees(self):
        return (self.tree,)

    @property
    def kinds(self):
        return ("m2r2",)

    @property
    def dcfg(self) -> ModelConfig:
        """The config the draft runs under (bf16 draft weights: bf16 matmul inputs, f32 accumulation)."""
        if self.draft_dtype == "float32":
            return self.cfg
        return dataclasses.replace(self.cfg, matmul_dtype=self.draft_dtype)

    @property
    def expansions(self) -> list[tuple[int, np.ndarray]]:
        """(depth, the nodes of that depth with children) per fast-stream pass of a full draft."""
        tree = self.tree
        out = []
        for d in range(tree.max_depth):
            nodes = np.asarray([i for i in tree.levels[d] if tree.children[i, 0] >= 0], np.int32)
            if len(nodes):
                out.append((d, nodes))
        return out

    @property
    def max_passes(self) -> int:
        """Fast-stream passes of a full draft (the depths with nodes to expand)."""
        return len(self.expansions)

    def prepare(self, base, m2r2, draft_ids):
        """{"dp": `stream.draft_params` (merged adapters, the draft head), "draft_ids"}."""
        ids = jnp.asarray(draft_ids, jnp.int32)
        if self.tree.topk > ids.shape[0]:
            raise M2R2Error(
                f"draft tree {self.tree.name!r} ranks up to {self.tree.topk} candidates per node, more than "
                f"the draft vocabulary's {ids.shape[0]} tokens"
            )
        cast = self.draft_dtype != "float32"
        backend = XLA if cast else self.backend  # bf16 weights stay plain arrays (XLA's dot, not the kernels)
        dp = jax.jit(lambda b, m, d: S.draft_params(self.cfg, self.mc, b, m, d, self.depth, backend))(base, m2r2, ids)
        if cast:  # the matrices (unpacked when the base is packed for the kernels); norms stay as they are
            dt = jnp.dtype(self.draft_dtype)
            dp = jax.tree.map(
                lambda x: L.dense(x).astype(dt) if L.dense(x).ndim == 2 else x,
                dp,
                is_leaf=lambda x: isinstance(x, K.PackedWeight),
            )
        return {"dp": dp, "draft_ids": ids}

    def draft(self, dparams, base, cache, pos, cur, active=None):
        """-> (the tree's node tokens [B, T] (node 0 = cur), the fast-stream passes run: int32 scalar).
        `active` [B]: the rows still decoding (the stop waits only for them; None: all)."""
        cfg, tree, dp, ids = self.dcfg, self.tree, dparams["dp"], dparams["draft_ids"]
        B, T = cur.shape[0], tree.size
        layers = self.mc.base_layers(cfg.num_layers)[: len(dp["layers"])]
        toks = jnp.zeros((B, T), jnp.int32).at[:, 0].set(cur)
        kv_shape = (B, cfg.num_kv_heads, T, cfg.head_dim)
        lk = [jnp.zeros(kv_shape, cfg.jnp_dtype) for _ in layers]
        lv = [jnp.zeros(kv_shape, cfg.jnp_dtype) for _ in layers]
        stream = FastStream(cfg, self.mc, merged=True)
        plan = self.expansions

        def expand(d, nodes, carry, nxt=None):
            """One pass over `nodes` (depth d), writing their children. -> (carry, with `nxt` (the next
            pass's nodes): [B] the highest draft probability among them, else None)."""
            toks, lk, lv = carry
            lk, lv = list(lk), list(lv)
            anc = tree.ancestor_mask[nodes].copy()
            anc[np.arange(len(nodes)), nodes] = False  # a node's own K/V comes from the block itself
            cos, sin = L.rope_cos_sin(cfg, pos[:, None] + jnp.full((1, len(nodes)), d, jnp.int32))

            def attention_for(l):
                j = layers[l]
                return tree_draft_attention(cfg, self.backend, cache.k[j], cache.v[j], pos, lk[l], lv[l], anc)

            hs, states = stream.apply(
                {"params": {}}, dp["layers"], D.embed(cfg, base, toks[:, nodes]), cos, sin, attention_for, len(layers)
            )
            for l, (k, v) in enumerate(states):
                lk[l] = lk[l].at[:, :, nodes].set(k.astype(lk[l].dtype))
                lv[l] = lv[l].at[:, :, nodes].set(v.astype(lv[l].dtype))
            logits = S.draft_head_logits(cfg, dp, hs[-1])  # [B, n, Vd] f32
            top_v, top = lax.top_k(logits, tree.topk)
            cand = jnp.take(ids, top)  # [B, n, topk]
            for ii, i in enumerate(nodes):
                for c in tree.children[i]:
                    if c >= 0:
                        toks = toks.at[:, c].set(cand[:, ii, tree.rank[c]])
            if nxt is None:
                return (toks, lk, lv), None
            where = {int(i): ii for ii, i in enumerate(nodes)}
            ii = np.asarray([where[int(tree.parent[c])] for c in nxt])
            p = jnp.exp(top_v[:, ii, tree.rank[nxt]] - jax.nn.logsumexp(logits[:, ii], -1))  # [B, len(nxt)]
            return (toks, lk, lv), jnp.max(p, -1)

        carry = (toks, lk, lv)
        if not self.stop:
            for d, nodes in plan:
                carry, _ = expand(d, nodes, carry)
            return carry[0], jnp.int32(len(plan))
        going = jnp.ones((B,), bool) if active is None else active
        passes = jnp.int32(1)
        for k, (d, nodes) in enumerate(plan):
            nxt = plan[k + 1][1] if k + 1 < len(plan) else None

            def step(c, d=d, nodes=nodes, nxt=nxt):
                carry, conf = expand(d, nodes, c[0], nxt)
                return carry, c[1] if conf is None else c[1] & (conf >= self.stop)

            if k == 0:
                carry, going = step((carry, going))
            else:  # each later depth only while some active row is still confident
                passes = passes + jnp.any(going).astype(jnp.int32)
                carry, going = confident_step(going, step, (carry, going))
        return carry[0], passes

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        toks, passes = self.draft(dparams, base, view.cache, view.pos, view.cur, view.active)
        return Proposal(toks, jnp.int32(0), passes=passes)


# ----------------------------------------------------------------------------- prompt lookup


def lookup_continuation(text, text_len, K: int, nmax: int, nmin: int):
    """For each row of text [B, H] (its first text_len [B] tokens are the text so far), the K tokens
    after the latest earlier occurrence of the last n tokens, n = nmax..nmin (longest first).
    -> (found [B] bool, candidates [B, K] int32; arbitrary where not found or past the text)."""
    H = text.shape[1]
    idx = jnp.arange(H)

    def row(h, hl):
        best_i, best_n = jnp.int32(-1), jnp.int32(0)
        shifted = [jnp.roll(h, -k) for k in range(nmax)]  # shifted[k][i] = h[i + k]
        for n in range(nmin, nmax + 1):  # longer n-grams override shorter ones
            key = lax.dynamic_slice(h, (jnp.maximum(hl - n, 0),), (n,))
            m = idx + n < hl  # the occurrence ends before the text's last token
            for k in range(n):
                m &= shifted[k] == key[k]
            i = jnp.max(jnp.where(m, idx, -1))
            ok = (i >= 0) & (hl > n)
            best_i, best_n = jnp.where(ok, i, best_i), jnp.where(ok, n, best_n)
        return best_n > 0, lax.dynamic_slice(h, (jnp.maximum(best_i, 0) + best_n,), (K,))

    return jax.vmap(row)(text, text_len)


@dataclasses.dataclass(frozen=True, eq=True)
class PromptLookup(Drafter):
    """Prompt lookup: when the last `ngram` (down to `min_ngram`) tokens occurred earlier in the prompt
    or the answer, the `k` tokens that followed their latest occurrence, verified as a chain."""

    k: int = 4
    ngram: int = 3
    min_ngram: int = 2
    needs_text = True

    def __post_init__(self):
        if self.k < 1 or not 1 <= self.min_ngram <= self.ngram:
            raise M2R2Error(
                f"prompt lookup: need k >= 1 and 1 <= min_ngram <= ngram (got {self.k}, {self.min_ngram}, {self.ngram})"
            )

    @property
    def trees(self):
        return (chain(self.k),)

    @property
    def kinds(self):
        return ("lookup",)

    @property
    def lookahead(self):
        return self.k

    def search(self, view: DraftView, K: int | None = None, text=None, text_len=None):
        return lookup_continuation(
            view.text if text is None else text,
            view.text_len if text_len is None else text_len,
            K or self.k,
            self.ngram,
            self.min_ngram,
        )

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        _, cand = self.search(view)
        return Proposal(jnp.concatenate([view.cur[:, None], cand], 1), jnp.int32(0))


# ----------------------------------------------------------------------------- M2R2 + lookup


def extension_tree(tree: DraftTree, Tv: int) -> DraftTree | None:
    """The lookup extension's block for a one-depth star `tree` verified in blocks of Tv nodes: the
    star's ranks 0 and 1, then Tv - 3 lookup tokens chained under rank 0 (node order: root, [0], [1],
    [0, 0], [0, 0, 0], ...). None when it does not apply (a deeper tree, a star of one, Tv < 4)."""
    if tree.max_depth != 1 or tree.size < 3 or Tv < 4:
        return None
    return build_tree([[0], [1]] + [[0] * (k + 1) for k in range(1, Tv - 2)], name="lookup-extension")


@dataclasses.dataclass(frozen=True, eq=True)
class M2R2WithLookup(Drafter):
    """Prompt lookup where the text repeats itself, the M2R2 tree elsewhere (one `lax.cond` on "any
    active row has a lookup match": only the drafting sits in it, both branches read the cache and
    never write it, so XLA keeps the cache in place).

    With `extend` (a one-depth star tree of >= 3 nodes): on an M2R2 step the fast stream's top-1
    token x1 is appended to the text and looked up in turn; where the last n tokens ending in x1
    occurred earlier, the block becomes [cur, x1, x2, c1, c2, ...] (the star's top-2 and the lookup's
    continuation chained under x1), the same block size, so the same verification."""

    m2r2: M2R2Drafter
    lookup: PromptLookup
    extend: bool = True
    needs_text = True

    @property
    def block(self):
        return max(self.m2r2.tree.size, self.lookup.k + 1)

    @property
    def ext(self) -> DraftTree | None:
        return extension_tree(self.m2r2.tree, self.block) if self.extend else None

    @property
    def trees(self):
        return (self.m2r2.tree, self.lookup.trees[0]) + ((self.ext,) if self.ext is not None else ())

    @property
    def kinds(self):
        return ("m2r2", "lookup") + (("m2r2+lookup",) if self.ext is not None else ())

    @property
    def lookahead(self):
        return max(self.lookup.k, self.block)

    def prepare(self, base, m2r2, draft_ids):
        return self.m2r2.prepare(base, m2r2, draft_ids)

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        Tv = self.block
        found, cand = self.lookup.search(view)
        use_lookup = jnp.any(found & view.active)

        def from_lookup():
            return pad_block(jnp.concatenate([view.cur[:, None], cand], 1), Tv), jnp.int32(1), jnp.int32(0)

        def from_m2r2():
            toks, passes = self.m2r2.draft(dparams, base, view.cache, view.pos, view.cur, view.active)
            toks = pad_block(toks, Tv)
            if self.ext is None:
                return toks, jnp.int32(0), passes
            # the text + the top-1 draft, looked up again: its continuation is chained under it
            hx = jax.vmap(lambda h, x, n: h.at[n].set(x))(view.text, toks[:, 1], view.text_len)
            fx, cont = self.lookup.search(view, Tv - 3, hx, view.text_len + 1)
            use_ext = jnp.any(fx & view.active)
            ext = jnp.concatenate([toks[:, :3], cont], 1)
            return jnp.where(use_ext, ext, toks), jnp.where(use_ext, 2, 0).astype(jnp.int32), passes

        toks, tree, passes = lax.cond(use_lookup, from_lookup, from_m2r2)
        return Proposal(toks, tree, passes=passes)


# ----------------------------------------------------------------------------- options


def _count(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise M2R2Error(f"{name} must be an integer >= {lo}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DraftOptions:
    """How M2R2 drafts, validated once: the static tree (a preset name, a JSON file of paths or a
    DraftTree), the fast layers it runs (0 = all), prompt lookup (`lookup` tokens per lookup step,
    0 = off; n-grams `lookup_ngram` down to `lookup_min_ngram`), the lookup extension, the confidence
    stop (`draft_stop`, 0 = off) and the draft weights' dtype (`draft_dtype`): `M2R2Drafter`."""

    tree: Any = "star4"
    draft_layers: int = 0
    lookup: int = 4
    lookup_ngram: int = 3
    lookup_min_ngram: int = 2
    extend: bool = True
    draft_stop: float = 0.0
    draft_dtype: str = "float32"
    name = "m2r2"  # `--drafter` name (peer_drafters.options.DRAFTERS); the other drafters' options match
    needs_m2r2 = True  # drafts with a trained M2R2 checkpoint

    def __post_init__(self):
        from m2r2_jax.decoding.trees import get_tree

        object.__setattr__(self, "tree", get_tree(self.tree))
        _count("draft_layers", self.draft_layers, 0)
        _count("lookup", self.lookup, 0)
        _count("lookup_ngram", self.lookup_ngram, 1)
        _count("lookup_min_ngram", self.lookup_min_ngram, 1)
        if self.lookup and self.lookup_min_ngram > self.lookup_ngram:
            raise M2R2Error(f"lookup_min_ngram ({self.lookup_min_ngram}) must be <= lookup_ngram ({self.lookup_ngram})")
        check_stop("m2r2", self.draft_stop)
        check_draft_dtype("m2r2", self.draft_dtype)

    def drafter(self, cfg: ModelConfig, mc: M2R2Config, backend: Backend = XLA) -> Drafter:
        m = M2R2Drafter(cfg, mc, self.tree, self.draft_layers, backend, self.draft_stop, self.draft_dtype)
        if not self.lookup:
            return m
        return M2R2WithLookup(m, PromptLookup(self.lookup, self.lookup_ngram, self.lookup_min_ngram), self.extend)

    def prepare(self, spec, base, m2r2) -> Any:
        """The drafter's jit argument: `spec.prepare` over the checkpoint (an `M2R2Bundle`)."""
        return spec.prepare(base, m2r2.params, np.asarray(m2r2.draft_ids))

    def describe(self) -> dict:
        return dict(
            tree=self.tree.name,
            draft_layers=self.draft_layers,
            lookup=self.lookup,
            lookup_ngram=self.lookup_ngram,
            lookup_min_ngram=self.lookup_min_ngram,
            extend=self.extend,
            draft_stop=self.draft_stop,
            draft_dtype=self.draft_dtype,
        )
