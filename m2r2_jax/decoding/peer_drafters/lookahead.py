"""Lookahead decoding (Fu et al. 2024) in the shared loop: Jacobi iteration over a 2D window feeds an
n-gram pool, and the pool's n-grams starting with the current token are verified as guesses.

The window holds N-1 levels of W tokens each (a Jacobi trajectory): column i is a chain
g_0[i], g_1[i], .., g_{N-2}[i] at positions pos+1+i .. pos+i+N-1, where each token was the model's
prediction after the one above it, with the level-0 tokens g_0[0..i-1] as the context before the
chain. Laid out as a tree, that is exactly a static draft tree: the level-0 row is a spine under the
root (g_0[i] at depth i+1) and each spine node carries its column's chain as a branch (g_l[i] at depth
i+1+l), so each window token sees precisely the prefix, the spine before it and its own column.
The G guesses (the pool's (N-1)-token continuations of `cur`) are G chains under the root. One
verification forward over this tree (the shared verify step) therefore does both of Lookahead's
branches at once: it checks the guesses -- and the window, which is itself a guess (accepting along
it is plain Jacobi decoding) -- and its argmax at the last level's nodes is the next Jacobi level o[i].

After each step (update_state): the n-grams (g_0[i], .., g_{N-2}[i], o[i]) go into the pool (once the
window holds only model-made levels, i.e. after N-2 steps); the levels move up (level l <- level l+1,
the last <- o), which keeps every column at its positions when one token was emitted; when a drafts
were accepted, the columns also shift left by a (the positions now decided drop out; the vacated
right columns repeat the last one). The window starts as prompt tokens, as in the paper.

The pool is a fixed array per row, indexed by the n-gram's first token: [V, G, N-1] continuations
(a ring of the G most recent distinct ones per first token) and a fill count per token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from m2r2_jax.decoding.drafters import Drafter
from m2r2_jax.decoding.state import DraftView, Proposal, StepResult
from m2r2_jax.decoding.trees import DraftTree, build_tree
from m2r2_jax.errors import M2R2Error


@struct.dataclass
class LookaheadState:
    levels: jax.Array  # [B, N-1, W] the Jacobi window (level 0 = oldest)
    pool: jax.Array  # [B, V, G, N-1] the continuations of each first token (ring of G)
    fill: jax.Array  # [B, V] n-grams inserted per first token (the ring's next slot = fill % G)
    age: jax.Array  # [B] steps so far (the window is all model-made from N-2 on)


def lookahead_layout(window: int, ngram: int, guesses: int):
    """-> (tree, guess_nodes [G, N-1], level_nodes [N-1, W]): the node ids of each guess token and
    each window token. Root children: the guesses (ranks 0..G-1), then the spine (rank G)."""
    W, N, G = window, ngram, guesses
    gp = [[(g,) + (0,) * j for j in range(N - 1)] for g in range(G)]
    lp = [[(G,) + (0,) * i + ((1,) + (0,) * (lv - 1) if lv else ()) for i in range(W)] for lv in range(N - 1)]
    tree = build_tree([p for row in gp + lp for p in row], f"lookahead_w{W}n{N}g{G}")
    ids = {p: n + 1 for n, p in enumerate(tree.paths)}
    return (
        tree,
        np.array([[ids[p] for p in r] for r in gp], np.int32),
        np.array([[ids[p] for p in r] for r in lp], np.int32),
    )


def pool_insert(pool, fill, ngrams, ok):
    """One row: add the n-grams [n, N] (first token = key) to pool [V, G, N-1] / fill [V] in order, a
    duplicate of a stored continuation skipped; ok (bool scalar) False adds none."""
    G = pool.shape[1]

    def body(i, c):
        pool, fill = c
        key, val = ngrams[i, 0], ngrams[i, 1:]
        slots, n = pool[key], jnp.minimum(fill[key], G)
        dup = jnp.any(jnp.all(slots == val[None], -1) & (jnp.arange(G) < n))
        do = ok & ~dup
        slot = fill[key] % G
        pool = pool.at[key, slot].set(jnp.where(do, val, slots[slot]))
        return pool, fill.at[key].add(do.astype(fill.dtype))

    return lax.fori_loop(0, ngrams.shape[0], body, (pool, fill))


@dataclasses.dataclass(frozen=True, eq=True)
class Lookahead(Drafter):
    vocab: int
    window: int = 5  # W
    ngram: int = 4  # N
    guesses: int = 5  # G
    needs_text = True  # the window starts as prompt tokens
    stateful = True

    def __post_init__(self):
        for name, v, lo in (("window", self.window, 1), ("ngram", self.ngram, 2), ("guesses", self.guesses, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise M2R2Error(f"lookahead: {name} must be an integer >= {lo}, got {v!r}")
        if self.guesses >= 64:
            raise M2R2Error(f"lookahead: guesses must be < 64, got {self.guesses}")
        nodes = 1 + (self.window + self.guesses) * (self.ngram - 1)
        if nodes > 256:
            raise M2R2Error(f"lookahead: 1 + (window + guesses) * (ngram - 1) = {nodes} nodes; at most 256 verify")

    @property
    def layout(self) -> tuple[DraftTree, np.ndarray, np.ndarray]:
        return lookahead_layout(self.window, self.ngram, self.guesses)

    @property
    def trees(self):
        return (self.layout[0],)

    @property
    def kinds(self):
        return ("lookahead",)

    def init_state(self, dparams, base, view: DraftView) -> LookaheadState:
        W, N, G = self.window, self.ngram, self.guesses
        B = view.cur.shape[0]
        pick = np.random.RandomState(0).randint(0, 1 << 20, (N - 1, W))  # "random prompt tokens", fixed
        idx = jnp.asarray(pick)[None] % view.text_len[:, None, None]
        levels = jnp.take_along_axis(view.text, idx.reshape(B, -1), 1).reshape(B, N - 1, W)
        return LookaheadState(
            levels=levels.astype(jnp.int32),
            pool=jnp.zeros((B, self.vocab, G, N - 1), jnp.int32),
            fill=jnp.zeros((B, self.vocab), jnp.int32),
            age=jnp.zeros((B,), jnp.int32),
        )

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        st: LookaheadState = view.dstate
        tree, gn, ln = self.layout
        B, G = view.cur.shape[0], self.guesses
        rows = jnp.arange(B)
        guess = st.pool[rows, view.cur]  # [B, G, N-1]
        n = jnp.minimum(st.fill[rows, view.cur], G)
        guess = jnp.where(jnp.arange(G)[None, :, None] < n[:, None, None], guess, 0)  # empty slots: token 0
        toks = jnp.zeros((B, tree.size), jnp.int32).at[:, 0].set(view.cur)
        toks = toks.at[:, gn.ravel()].set(guess.reshape(B, -1))
        toks = toks.at[:, ln.ravel()].set(st.levels.reshape(B, -1))
        return Proposal(toks, jnp.int32(0))

    def update_state(self, dparams, dstate, view: DraftView, prop: Proposal, step: StepResult) -> LookaheadState:
        st: LookaheadState = dstate
        _, _, ln = self.layout
        W, N = self.window, self.ngram
        act = view.active
        o = step.target[:, ln[-1]]  # [B, W] the next Jacobi level
        ngrams = jnp.concatenate([jnp.swapaxes(st.levels, 1, 2), o[..., None]], -1)  # [B, W, N]
        pool, fill = jax.vmap(pool_insert)(st.pool, st.fill, ngrams, act & (st.age >= N - 2))
        new = jnp.concatenate([st.levels[:, 1:], o[:, None]], 1)
        cols = jnp.minimum(jnp.arange(W)[None] + step.accepted[:, None], W - 1)
        new = jnp.take_along_axis(new, jnp.broadcast_to(cols[:, None], new.shape), 2)
        return LookaheadState(
            levels=jnp.where(act[:, None, None], new, st.levels),
            pool=pool,
            fill=fill,
            age=st.age + act.astype(jnp.int32),
        )
