"""REST (He et al. 2023): retrieval-based drafting. A datastore of text (here the base's self-distilled
answers) is searched for the longest suffix of the context; the continuations that followed its
occurrences are merged into a trie whose most frequent branches are verified as the draft tree.
(Prompt lookup, drafters.PromptLookup, is the same idea over the text so far.)

Host side (numpy, once): the documents concatenated with a separator (-1) between them, and a suffix
array truncated to `key_len` tokens: every position sorted by the `key_len` tokens from it (cut at its
document's end). The occurrences of any n-gram with n <= key_len are then one contiguous range.

In jit, per row: for n = max_ngram .. min_ngram the range of the text's last n tokens (two binary
searches comparing n-token windows; longest n with a match wins); `candidates` occurrences taken
evenly over the range (the range is ordered by continuation, so an even spread keeps the
continuations' frequencies); their continuations fill a static template tree as a trie: a node's
children are the distinct next tokens of the continuations through it, most frequent first (ties:
the smaller token id), laid on the template's ranks. Template nodes with no such token carry token 0
(verification accepts them only where the full model agrees, like any draft token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2r2_jax.decoding.drafters import Drafter
from m2r2_jax.decoding.state import DraftView, Proposal
from m2r2_jax.decoding.trees import DraftTree, get_tree
from m2r2_jax.errors import M2R2Error

SEP = -1


@dataclasses.dataclass(frozen=True)
class Datastore:
    tokens: np.ndarray  # [Nd] int32: documents separated (and followed) by SEP, then key_len SEPs
    sa: np.ndarray  # [Ns] int32: the token positions, sorted by their key_len-token windows
    key_len: int

    @classmethod
    def build(cls, docs: Sequence[Sequence[int]], key_len: int) -> Datastore:
        docs = [np.asarray(d, np.int64) for d in docs if len(d)]
        if not docs:
            raise M2R2Error("REST datastore: no non-empty documents")
        if any((d < 0).any() or (d >= 2**31 - 1).any() for d in docs):
            raise M2R2Error("REST datastore: token ids must be in [0, 2^31 - 1)")
        parts = []
        for d in docs:
            parts += [d, [SEP]]
        toks = np.concatenate(parts + [np.full(key_len, SEP)]).astype(np.int32)
        pos = np.nonzero(toks[: len(toks) - key_len] != SEP)[0]
        win = toks[pos[:, None] + np.arange(key_len)[None]]
        win = np.where(np.cumprod(win != SEP, 1).astype(bool), win, SEP)  # nothing past the document's end
        order = np.lexsort([pos] + [win[:, j] for j in range(key_len - 1, -1, -1)])
        return cls(toks, pos[order].astype(np.int32), key_len)

    @classmethod
    def from_distill_cache(cls, path, key_len: int, limit: int | None = None) -> Datastore:
        """The answers of a self-distillation cache (training.distill), the first `limit` of them."""
        from m2r2_jax.distill_cache import load_distill_cache

        ds = load_distill_cache(path)
        n = len(ds) if limit is None else min(limit, len(ds))
        if n == 0:
            raise M2R2Error(f"REST datastore: the distill cache at {path} holds no answers")
        return cls.build([ds[i]["answer_ids"] for i in range(n)], key_len)

    @property
    def size(self) -> int:
        return len(self.sa)


def _less(a, b):
    """Lexicographic a < b for equal-length int vectors."""
    d = a != b
    i = jnp.argmax(d)
    return jnp.any(d) & (a[i] < b[i])


def _bound(tokens, sa, q, upper: bool):
    """First index into sa whose n-token window is >= q (upper: > q)."""
    n, Ns = q.shape[0], sa.shape[0]

    def body(_, c):
        lo, hi = c
        mid = (lo + hi) // 2
        w = lax.dynamic_slice(tokens, (sa[jnp.minimum(mid, Ns - 1)],), (n,))
        go_right = ~_less(q, w) if upper else _less(w, q)
        open_ = lo < hi
        return jnp.where(open_ & go_right, mid + 1, lo), jnp.where(open_ & ~go_right, mid, hi)

    lo, _ = lax.fori_loop(0, int(Ns).bit_length() + 1, body, (jnp.int32(0), jnp.int32(Ns)))
    return lo


def retrieve(tokens, sa, text, text_len, max_ngram: int, min_ngram: int, M: int, depth: int):
    """Per row of text [B, H] (first text_len tokens): the longest n in [min_ngram, max_ngram] whose last-n
    window occurs in the datastore, and `M` of its occurrences' continuations.
    -> (n [B] (0: no match), count [B] occurrences, cont [B, M, depth], valid [B, M, depth])."""

    def row(h, hl):
        best = (jnp.int32(0), jnp.int32(0), jnp.int32(0))  # n, lo, hi
        for n in range(min_ngram, max_ngram + 1):  # longer matches override shorter ones
            q = lax.dynamic_slice(h, (jnp.maximum(hl - n, 0),), (n,))
            lo, hi = _bound(tokens, sa, q, False), _bound(tokens, sa, q, True)
            ok = (hl >= n) & (hi > lo)
            best = tuple(jnp.where(ok, x, y) for x, y in zip((jnp.int32(n), lo, hi), best))
        n, lo, hi = best
        cnt = hi - lo
        m = jnp.arange(M)
        idx = lo + jnp.where(cnt > M, (m * cnt) // M, m)
        start = sa[jnp.clip(idx, 0, sa.shape[0] - 1)] + n
        cont = tokens[start[:, None] + jnp.arange(depth)[None]]
        valid = (m < cnt)[:, None] & (jnp.cumprod(cont != SEP, 1) > 0)
        return n, cnt, jnp.where(valid, cont, 0), valid

    return jax.vmap(row)(text, text_len)


def fill_trie(tree: DraftTree, cont, valid):
    """One row: continuations cont [M, D] (valid [M, D]) -> the template's node tokens [T] (root: 0)."""
    M = cont.shape[0]
    T, K = tree.size, tree.children.shape[1]
    toks = jnp.zeros((T,), jnp.int32)
    cons = {0: jnp.ones((M,), bool)}  # node -> the continuations through it
    for d in range(tree.max_depth):
        parents = [int(i) for i in tree.levels[d] if tree.children[i, 0] >= 0]
        if not parents:
            continue
        c = jnp.stack([cons[p] for p in parents]) & valid[None, :, d]  # [P, M]
        x = cont[:, d]
        same = x[:, None] == x[None, :]  # [M, M]
        count = jnp.sum(c[:, None, :] & same[None], -1)  # [P, M]
        earlier = jnp.tril(jnp.ones((M, M), bool), -1)  # m' < m
        first = c & ~jnp.any(c[:, None, :] & same[None] & earlier[None], -1)
        score = jnp.where(first, count * (M + 1) + (M - jnp.arange(M))[None], -1)
        top_s, top_i = lax.top_k(score, K)  # [P, K]
        for pi, p in enumerate(parents):
            for r, ch in enumerate(tree.children[p]):
                if ch < 0:
                    continue
                real = top_s[pi, r] >= 0
                tok = jnp.where(real, x[top_i[pi, r]], 0)
                toks = toks.at[ch].set(tok)
                cons[int(ch)] = c[pi] & (x == tok) & real
    return toks


@dataclasses.dataclass(frozen=True, eq=True)
class Rest(Drafter):
    tree: Any = "tree16"
    max_ngram: int = 8
    min_ngram: int = 2
    candidates: int = 32
    needs_text = True

    def __post_init__(self):
        object.__setattr__(self, "tree", get_tree(self.tree))
        for name, v in (("max_ngram", self.max_ngram), ("min_ngram", self.min_ngram), ("candidates", self.candidates)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"rest: {name} must be an integer >= 1, got {v!r}")
        if self.min_ngram > self.max_ngram:
            raise M2R2Error(f"rest: min_ngram ({self.min_ngram}) must be <= max_ngram ({self.max_ngram})")
        if self.tree.topk > self.candidates:
            raise M2R2Error(
                f"rest: tree {self.tree.name!r} ranks {self.tree.topk} children per node, more than the "
                f"{self.candidates} retrieved candidates"
            )

    @property
    def trees(self):
        return (self.tree,)

    @property
    def kinds(self):
        return ("rest",)

    @property
    def key_len(self) -> int:
        return self.max_ngram + self.tree.max_depth

    def datastore(self, docs: Sequence[Sequence[int]]) -> Datastore:
        return Datastore.build(docs, self.key_len)

    def prepare(self, base, store) -> dict:
        """store: a Datastore (key_len >= max_ngram) or the documents (token lists) to build one from."""
        if not isinstance(store, Datastore):
            store = self.datastore(store)
        if store.key_len < self.max_ngram:
            raise M2R2Error(f"REST datastore sorted on {store.key_len} tokens; max_ngram {self.max_ngram} needs more")
        pad = np.full(self.tree.max_depth, SEP, np.int32)  # continuations never read past the end
        return {"tokens": jnp.asarray(np.concatenate([store.tokens, pad])), "sa": jnp.asarray(store.sa)}

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        _, _, cont, valid = retrieve(
            dparams["tokens"],
            dparams["sa"],
            view.text,
            view.text_len,
            self.max_ngram,
            self.min_ngram,
            self.candidates,
            self.tree.max_depth,
        )
        toks = jax.vmap(lambda c, v: fill_trie(self.tree, c, v))(cont, valid)
        return Proposal(toks.at[:, 0].set(view.cur), jnp.int32(0))
