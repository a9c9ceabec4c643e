"""Self-speculative decoding with the M2R2 fast stream: static draft tree, one
jitted `lax.while_loop`, lossless.

Per step and row (pos = tokens already in the slow cache, cur = the last
accepted token, not yet in the cache):
  1. draft: the tree is expanded depth by depth, all nodes of a depth in one
     batched fast-stream call that reads the slow cache for the prefix and a
     draft-local K/V buffer for the node's tree ancestors;
  2. verify: one full forward over all tree nodes (tree mask over the prefix
     cache), writing their K/V at slots pos .. pos+T-1;
  3. accept: greedy — the deepest node whose every token equals the full
     model's argmax at its parent, plus the bonus token; sampling — recursive
     rejection sampling over each node's ranked children (lossless);
  4. the accepted nodes' K/V move to contiguous slots; pos += accepted + 1.
Rows advance independently (per-row positions), so a batch equals its rows
one by one.

Prompt lookup (`lookup` = K > 0): before drafting, the last n tokens (n =
`lookup_ngram` down to `lookup_min_ngram`) are searched for in the prompt and
the text generated so far; when they occur earlier, the K tokens that followed
their latest occurrence are verified as a chain instead, and the fast stream
does not draft that step (both branches sit in one `lax.cond`; a batch takes
the lookup branch when any active row has a match). Verification is the same,
so the output is unchanged.

Lookup extension (`extend`, with lookup and a one-depth star tree of at least two nodes): on an
M2R2-drafted step the fast stream's top-1 token x1 is appended to the text and looked up in turn;
when the last n tokens ending in x1 occurred earlier, the block becomes [cur, x1, x2, c1, c2, ...]:
the star's top-2 and a chain of the lookup's continuation under x1 (the same block size, so the same
verification). It turns a one-token M2R2 draft into a longer one where the text repeats itself.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.generate import bucket, pad_prompts, prefill, round_cache, stop_tuple
from m2r2_jax.decoding.sampling import SamplingConfig, sample_probs, select
from m2r2_jax.decoding.trees import DraftTree, build_tree, chain
from m2r2_jax import kernels as K
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: tuple[int, ...] | None = None
    draft_layers: int = 0      # fast layers used to draft (0 = all L_f)


def _draft(cfg, mc, tree: DraftTree, base, dp, draft_ids, cache, pos, cur, adapters=None):
    """Fill the tree's node tokens [B, T] with the fast stream's ranked candidates.
    dp: `S.draft_params` (the fast layers with merged adapters, the draft head); `adapters`
    (per-layer adapter dicts applied on top, for timing the unmerged form) is normally None."""
    B, T = cur.shape[0], tree.size
    layers = mc.base_layers(cfg.num_layers)[:len(dp["layers"])]
    toks = jnp.zeros((B, T), jnp.int32).at[:, 0].set(cur)
    KVd = (B, cfg.num_kv_heads, T, cfg.head_dim)
    lk = [jnp.zeros(KVd, cfg.jnp_dtype) for _ in layers]
    lv = [jnp.zeros(KVd, cfg.jnp_dtype) for _ in layers]
    m_prefix_1 = jnp.arange(cache.length)[None, :] < pos[:, None]  # [B, S]
    packed = isinstance(dp["layers"][0]["attn"]["wq"], K.PackedWeight)
    for d in range(tree.max_depth):
        nodes = np.asarray([i for i in tree.levels[d] if tree.children[i, 0] >= 0], np.int32)
        n = len(nodes)
        if n == 0:
            continue
        h = D.embed(cfg, base, toks[:, nodes])
        if mc.branch:
            raise M2R2Error("drafting with branch > 0 is not implemented (the slow stream would have to run "
                            "the first b layers for draft tokens)")
        positions = pos[:, None] + jnp.full((1, n), d, jnp.int32)
        cos, sin = L.rope_cos_sin(cfg, positions)
        m_prefix = jnp.broadcast_to(m_prefix_1[:, None, :], (B, n, cache.length))
        anc = tree.ancestor_mask[nodes].copy()
        anc[np.arange(n), nodes] = False  # own K/V comes from the block itself
        m_anc = jnp.broadcast_to(jnp.asarray(anc)[None], (B, n, T))
        m_self = jnp.broadcast_to(jnp.eye(n, dtype=bool)[None], (B, n, n))
        # CPU kernel form: the prefix is pos[b] cache slots; local keys = the ancestor buffer + the block
        l_mask = np.concatenate([anc, np.eye(n, dtype=bool)], 1)   # [n, T + n]
        for l, j in enumerate(layers):
            attend = None
            if packed:
                def attend(q, k, v, j=j, l=l):
                    return K.block_attention(q, cache.k[j], cache.v[j], pos, jnp.concatenate([lk[l], k], 2),
                                             jnp.concatenate([lv[l], v], 2), l_mask)
            h, (k, v) = S.fast_layer(cfg, dp["layers"][l], adapters[l] if adapters else {}, h,
                                     [(cache.k[j], cache.v[j], m_prefix), (lk[l], lv[l], m_anc)], m_self, cos, sin,
                                     attend)
            lk[l] = lk[l].at[:, :, nodes].set(k.astype(lk[l].dtype))
            lv[l] = lv[l].at[:, :, nodes].set(v.astype(lv[l].dtype))
        logits = S.draft_head_logits(cfg, dp, h)            # [B, n, Vd]
        _, top = lax.top_k(logits, tree.topk)
        cand = jnp.take(draft_ids, top)                    # [B, n, topk]
        for ii, i in enumerate(nodes):
            for c in tree.children[i]:
                if c >= 0:
                    toks = toks.at[:, c].set(cand[:, ii, tree.rank[c]])
    return toks


def _verify(cfg, tree: DraftTree, base, toks, cache, pos):
    """One full-model forward over all tree nodes (tree mask over the prefix cache) -> (logits, cache)."""
    return D.forward(cfg, base, toks, cache, pos, positions=pos[:, None] + jnp.asarray(tree.depth)[None],
                     local_mask=jnp.asarray(tree.ancestor_mask))


def _anc_at_depth(tree: DraftTree) -> np.ndarray:
    """[T, D+1]: the ancestor of each node at each depth (itself at its own depth), -1 below."""
    out = np.full((tree.size, tree.max_depth + 1), -1, np.int32)
    for i in range(tree.size):
        j = i
        while j >= 0:
            out[i, tree.depth[j]] = j
            j = tree.parent[j]
    return out


def _accept_greedy(tree: DraftTree, toks, logits=None, target=None):
    """-> (accepted depth a [B], path node ids [B, D+1], bonus [B], node_correct [B, T]).
    `target` [B, >= T]: the argmax of the logits at each node, when already computed."""
    if target is None:
        target = jnp.argmax(logits, -1).astype(jnp.int32)             # [B, T]
    target = target[:, :tree.size]
    par = jnp.asarray(np.maximum(tree.parent, 0))
    correct = (toks == target[:, par]).at[:, 0].set(True)             # [B, T]
    anc = jnp.asarray(tree.ancestor_mask)
    acc = jnp.all(jnp.where(anc[None], correct[:, None, :], True), -1)  # [B, T]
    score = jnp.where(acc, jnp.asarray(tree.depth)[None] * tree.size + (tree.size - jnp.arange(tree.size)), -1)
    best = jnp.argmax(score, -1)
    path = jnp.asarray(_anc_at_depth(tree))[best]
    bonus = jnp.take_along_axis(target, best[:, None], 1)[:, 0]
    return jnp.asarray(tree.depth)[best], path, bonus, correct


def _accept_sampling(tree: DraftTree, toks, probs, key):
    """Recursive rejection sampling with one-hot (top-k) proposals; exact for the base distribution.
    probs [B, T, V] sampling distributions at each node. -> (a, path, bonus, node_correct)."""
    children = jnp.asarray(tree.children)
    anc_d = jnp.asarray(_anc_at_depth(tree))

    def row(toks, probs, key):
        node, alive, a = jnp.int32(0), jnp.bool_(True), jnp.int32(0)
        p = probs[0]
        for d in range(tree.max_depth + 1):
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
        return a, anc_d[node], bonus.astype(jnp.int32)

    keys = jax.random.split(key, toks.shape[0])
    a, path, bonus = jax.vmap(row)(toks, probs, keys)
    return a, path, bonus, jnp.zeros(toks.shape, bool)


def _lookup(hist, hlen, K: int, nmax: int, nmin: int):
    """Prompt lookup: for each row of hist [B, H] (the first hlen [B] tokens are the text so far), the
    K tokens after the latest earlier occurrence of the last n tokens, n = nmax..nmin (longest first).
    -> (found [B] bool, candidates [B, K] int32; arbitrary where not found or past the text)."""
    H = hist.shape[1]
    idx = jnp.arange(H)

    def row(h, hl):
        best_i, best_n = jnp.int32(-1), jnp.int32(0)
        shifted = [jnp.roll(h, -k) for k in range(nmax)]  # shifted[k][i] = h[i + k]
        for n in range(nmin, nmax + 1):  # longer n-grams override shorter ones
            key = lax.dynamic_slice(h, (jnp.maximum(hl - n, 0),), (n,))
            m = idx + n < hl             # the occurrence ends before the text's last token
            for k in range(n):
                m &= shifted[k] == key[k]
            i = jnp.max(jnp.where(m, idx, -1))
            ok = (i >= 0) & (hl > n)
            best_i, best_n = jnp.where(ok, i, best_i), jnp.where(ok, n, best_n)
        return best_n > 0, lax.dynamic_slice(h, (jnp.maximum(best_i, 0) + best_n,), (K,))

    return jax.vmap(row)(hist, hlen)


def _compact(cache: D.KVCache, pos, path) -> D.KVCache:
    """Move accepted nodes' K/V (slots pos + path[k]) to slots pos + k, k = 1..D."""
    src = pos[:, None] + jnp.maximum(path[:, 1:], 0)                 # [B, D]

    def move(c):
        g = jnp.take_along_axis(c, src[:, None, :, None], axis=2)      # [B, KV, D, hd]
        return L.write_cache(c, g, pos + 1)

    return D.KVCache([move(c) for c in cache.k], [move(c) for c in cache.v])


def block_size(tree: DraftTree, lookup: int) -> int:
    """Nodes per verification: every kind of step (tree, lookup chain, extension) verifies this many."""
    return max(tree.size, lookup + 1)


def extension_tree(tree: DraftTree, Tv: int) -> DraftTree | None:
    """The lookup extension's block for a one-depth star `tree` verified in blocks of Tv nodes: the
    star's ranks 0 and 1, then Tv - 3 lookup tokens chained under rank 0 (node order: root, [0], [1],
    [0, 0], [0, 0, 0], ...). None when it does not apply (a deeper tree, a star of one, Tv < 4)."""
    if tree.max_depth != 1 or tree.size < 3 or Tv < 4:
        return None
    return build_tree([[0], [1]] + [[0] * (k + 1) for k in range(1, Tv - 2)], name="lookup-extension")


def speculative_fn(cfg: ModelConfig, mc: M2R2Config, tree: DraftTree, greedy: bool, max_new: int,
                   cache_len: int, draft_layers: int, filtered: bool, lookup: int = 0, lookup_ngram: int = 3,
                   lookup_min_ngram: int = 2, extend: bool = False):
    T, Dm = tree.size, tree.max_depth
    ltree = chain(lookup) if lookup else None
    W = max(Dm, lookup) + 1   # tokens one step can emit
    Tv = block_size(tree, lookup)
    etree = extension_tree(tree, Tv) if (lookup and extend) else None
    n_cont = (Tv - 3) if etree is not None else 0  # lookup tokens chained under the top-1 draft

    def padded(tr: DraftTree):
        """The tree's ancestor mask and depths on Tv nodes; extra nodes are dummies that see only
        themselves (their rows are computed and ignored: they are never accepted)."""
        m = np.eye(Tv, dtype=bool)
        m[:tr.size, :tr.size] = tr.ancestor_mask
        return jnp.asarray(m), jnp.asarray(np.pad(tr.depth, (0, Tv - tr.size)).astype(np.int32))

    if lookup:
        (t_mask, t_depth), (l_mask, l_depth) = padded(tree), padded(ltree)
    if etree is not None:
        e_mask, e_depth = padded(etree)

    def run(base, dp, draft_ids, tokens, lengths, stop_ids, key, temperature, top_k, top_p):
        """dp: `S.draft_params` of the M2R2 checkpoint (built once per checkpoint, not per call)."""
        B, P = tokens.shape
        cache = D.init_cache(cfg, B, cache_len)
        logits, cache = prefill(cfg, base, tokens, lengths, cache)
        key, sub = jax.random.split(key)
        cur = select(logits, sub, greedy, temperature, top_k, top_p)
        out = jnp.zeros((B, max_new + W), jnp.int32).at[:, 0].set(cur)
        done = jnp.isin(cur, stop_ids) | (max_new <= 1)
        zeros_b = jnp.zeros((B,), jnp.int32)
        stats = dict(steps=zeros_b, accepted=zeros_b, depth_hits=jnp.zeros((B, Dm + 1), jnp.int32),
                     node_tries=jnp.zeros((B, T), jnp.int32), node_hits=jnp.zeros((B, T), jnp.int32),
                     lookup_steps=zeros_b, lookup_accepted=zeros_b, ext_steps=zeros_b, ext_accepted=zeros_b)
        hist = None  # prompt lookup: the text so far (prompt, then the emitted tokens)
        if lookup:
            hist = jnp.zeros((B, P + max_new + W + lookup), jnp.int32).at[:, :P].set(tokens)
            hist = jax.vmap(lambda h, c, n: h.at[n].set(c))(hist, cur, lengths)
        state = (lengths, cur, cache, out, jnp.ones((B,), jnp.int32), done, key, stats, hist)
        par = np.maximum(tree.parent, 0)

        def accept(tr, toks, logits, sub, target=None):
            if greedy:
                return _accept_greedy(tr, toks, logits, target)
            if filtered:
                probs = jax.vmap(lambda lg: sample_probs(lg, temperature, top_k, top_p), 1, 1)(logits)
            else:
                probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6), -1)
            return _accept_sampling(tr, toks, probs, sub)

        def pad_nodes(x, n):  # [B, t] -> [B, n] (dummy nodes carry token 0)
            return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))

        def pad_path(path):  # [B, d+1] -> [B, W]; extra entries point at the root (harmless slots)
            return jnp.pad(path, ((0, 0), (0, W - path.shape[1])))

        def step(toks, cache, pos, use_lookup, use_ext, sub):
            """One verification over the Tv-node block, then acceptance under the tree that drafted it,
            then compaction -> (a, accepted tokens [B, W-1], bonus, cache, node_correct [B, T])."""
            if lookup:  # the block's tree (mask, depths) is data: the same shapes for every kind of step
                local = jnp.where(use_lookup, l_mask, t_mask)
                depth = jnp.where(use_lookup, l_depth, t_depth)
                if etree is not None:
                    local = jnp.where(use_ext, e_mask, local)
                    depth = jnp.where(use_ext, e_depth, depth)
            else:
                local, depth = jnp.asarray(tree.ancestor_mask), jnp.asarray(tree.depth)
            logits, cache = D.forward(cfg, base, toks, cache, pos, positions=pos[:, None] + depth[None],
                                      local_mask=local)
            target = jnp.argmax(logits, -1).astype(jnp.int32) if greedy else None  # once for every tree
            a, path, bonus, correct = accept(tree, toks[:, :T], logits[:, :T], sub, target)
            path = pad_path(path)
            if lookup:
                la, lpath, lbonus, _ = accept(ltree, toks[:, :lookup + 1], logits[:, :lookup + 1], sub, target)
                a, bonus = jnp.where(use_lookup, la, a), jnp.where(use_lookup, lbonus, bonus)
                path = jnp.where(use_lookup, pad_path(lpath), path)
                correct = jnp.where(use_lookup, False, correct)
            if etree is not None:
                ea, epath, ebonus, _ = accept(etree, toks[:, :Tv], logits[:, :Tv], sub, target)
                a, bonus = jnp.where(use_ext, ea, a), jnp.where(use_ext, ebonus, bonus)
                path = jnp.where(use_ext, pad_path(epath), path)
                correct = jnp.where(use_ext, False, correct)
            cache = _compact(cache, pos, path)
            pt = jnp.take_along_axis(toks, path[:, 1:], 1)
            return a, pt, bonus, cache, correct

        def cond(st):
            return ~jnp.all(st[5])

        def body(st):
            pos, cur, cache, out, n_out, done, key, stats, hist = st
            active = ~done
            key, sub = jax.random.split(key)
            if lookup:
                hlen = lengths + n_out
                found, cand = _lookup(hist, hlen, lookup, lookup_ngram, lookup_min_ngram)
                use_lookup = jnp.any(found & active)

                def m2r2_draft():
                    toks = pad_nodes(_draft(cfg, mc, tree, base, dp, draft_ids, cache, pos, cur), Tv)
                    if etree is None:
                        return toks, jnp.bool_(False)
                    # the text + the top-1 draft, looked up again: its continuation is chained under it
                    hx = jax.vmap(lambda h, x, n: h.at[n].set(x))(hist, toks[:, 1], hlen)
                    fx, cont = _lookup(hx, hlen + 1, n_cont, lookup_ngram, lookup_min_ngram)
                    use_ext = jnp.any(fx & active)
                    ext = jnp.concatenate([toks[:, :3], cont], 1)
                    return jnp.where(use_ext, ext, toks), use_ext

                # only the drafting sits in the cond: it reads the cache, never writes it, so XLA keeps the
                # cache in place (a cond that updates the cache copies all of it on every step)
                toks, use_ext = lax.cond(
                    use_lookup, lambda: (pad_nodes(jnp.concatenate([cur[:, None], cand], 1), Tv), jnp.bool_(False)),
                    m2r2_draft)
            else:
                use_lookup, use_ext = jnp.bool_(False), jnp.bool_(False)
                toks = _draft(cfg, mc, tree, base, dp, draft_ids, cache, pos, cur)
            a, path_toks, bonus, cache, correct = step(toks, cache, pos, use_lookup, use_ext, sub)
            k = jnp.arange(W)[None]
            path_toks = jnp.concatenate([path_toks, jnp.zeros((B, 1), jnp.int32)], 1)
            emitted = jnp.where(k < a[:, None], path_toks, jnp.where(k == a[:, None], bonus[:, None], 0))
            is_stop = jnp.isin(emitted, stop_ids) & (k <= a[:, None])
            first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1), W)
            n_new = jnp.minimum(jnp.minimum(a + 1, first_stop + 1), max_new - n_out)
            new_out = jax.vmap(lambda o, e, s: lax.dynamic_update_slice(o, e, (s,)))(out, emitted, n_out)
            out = jnp.where(active[:, None], new_out, out)
            if lookup:
                new_hist = jax.vmap(lambda h, e, s: lax.dynamic_update_slice(h, e, (s,)))(hist, emitted,
                                                                                         lengths + n_out)
                hist = jnp.where(active[:, None], new_hist, hist)
            n_out2 = n_out + jnp.where(active, n_new, 0)
            done2 = done | (first_stop < W) | (n_out2 >= max_new)
            pos = jnp.where(active, pos + a + 1, pos)
            cur = jnp.where(active, bonus, cur)
            act = active.astype(jnp.int32)
            act_m = act * (~use_lookup).astype(jnp.int32)   # an M2R2-drafted step
            act_l = act - act_m
            act_e = act_m * use_ext.astype(jnp.int32)       # ... extended by lookup
            act_m = act_m - act_e                             # ... under the plain tree
            parent_ok = jnp.take_along_axis(_node_accepted(tree, correct), jnp.asarray(par)[None].repeat(B, 0), 1)
            stats = dict(
                steps=stats["steps"] + act, accepted=stats["accepted"] + act * a,
                depth_hits=stats["depth_hits"] + act_m[:, None] * (jnp.arange(Dm + 1)[None] <= a[:, None]),
                node_tries=stats["node_tries"] + act_m[:, None] * parent_ok.astype(jnp.int32),
                node_hits=stats["node_hits"] + act_m[:, None] * (parent_ok & correct).astype(jnp.int32),
                lookup_steps=stats["lookup_steps"] + act_l, lookup_accepted=stats["lookup_accepted"] + act_l * a,
                ext_steps=stats["ext_steps"] + act_e, ext_accepted=stats["ext_accepted"] + act_e * a)
            return pos, cur, cache, out, n_out2, done2, key, stats, hist

        st = lax.while_loop(cond, body, state)
        out, n_out, stats = st[3], st[4], st[7]
        return out[:, :max_new], n_out, stats

    return run


def _node_accepted(tree: DraftTree, correct):
    anc = jnp.asarray(tree.ancestor_mask)
    return jnp.all(jnp.where(anc[None], correct[:, None, :], True), -1)


@dataclasses.dataclass
class SpecResult:
    new_ids: list[list[int]]
    decode_seconds: float
    compile_seconds: float
    steps: list[int]            # verification steps per row
    accepted: list[int]         # drafted tokens accepted per row (bonus tokens not counted)
    depth_hits: np.ndarray      # [B, D+1] steps whose accepted depth >= d
    node_tries: np.ndarray      # [B, T] steps where the node's parent was accepted (greedy)
    node_hits: np.ndarray       # [B, T] ... and the node itself matched
    lookup_steps: list[int] = dataclasses.field(default_factory=list)     # steps drafted by prompt lookup
    lookup_accepted: list[int] = dataclasses.field(default_factory=list)  # ... and their accepted tokens
    ext_steps: list[int] = dataclasses.field(default_factory=list)        # M2R2 steps extended by lookup
    ext_accepted: list[int] = dataclasses.field(default_factory=list)     # ... and their accepted tokens

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verification step (accepted drafts + the bonus token)."""
        s = sum(self.steps)
        return (sum(self.accepted) + s) / s if s else 0.0


class SpeculativeDecoder:
    """Compiled speculative executables for one (model, M2R2) pair, cached per shape bucket."""

    def __init__(self, cfg: ModelConfig, mc: M2R2Config, tree: DraftTree, draft_layers: int = 0,
                 lookup: int = 0, lookup_ngram: int = 3, lookup_min_ngram: int = 2, extend: bool = True):
        """lookup: K > 0 turns on prompt lookup (K tokens per lookup step; see the module doc), matching
        the last lookup_ngram .. lookup_min_ngram tokens. extend: the lookup extension of M2R2 drafts
        (module doc; applies with lookup and a one-depth star tree)."""
        self.cfg, self.mc, self.tree = cfg, mc, tree
        if lookup < 0 or (lookup and not 1 <= lookup_min_ngram <= lookup_ngram):
            raise M2R2Error(f"prompt lookup: need lookup >= 0 and 1 <= lookup_min_ngram <= lookup_ngram "
                            f"(got {lookup}, {lookup_min_ngram}, {lookup_ngram})")
        self.lookup, self.lookup_ngram, self.lookup_min_ngram = lookup, lookup_ngram, lookup_min_ngram
        self.extend = bool(extend and lookup and extension_tree(tree, block_size(tree, lookup)) is not None)
        n = mc.n_fast(cfg.num_layers)
        self.draft_layers = draft_layers or n
        if not 1 <= self.draft_layers <= n:
            raise M2R2Error(f"draft_layers={draft_layers} must be in [1, {n}]")
        self._compiled: dict[tuple, Any] = {}
        self.compiles = 0
        self._dp = None

    def draft_params(self, base, m2r2, draft_ids):
        """What drafting reads (`S.draft_params`: merged adapters, draft head), built once per
        (base, checkpoint, draft vocabulary) and kept: merging the rank-r adapters into 10 layers'
        weights costs about as much as a few decode steps."""
        key = (id(base), id(m2r2), id(draft_ids))
        if self._dp is None or self._dp[0] != key:
            dp = jax.jit(lambda b, m, d: S.draft_params(self.cfg, self.mc, b, m, d, self.draft_layers))(
                base, m2r2, jnp.asarray(draft_ids, jnp.int32))
            self._dp = (key, dp, (base, m2r2, draft_ids))  # the inputs are held so their ids stay theirs
        return self._dp[1]

    def plan(self, lens: Sequence[int], max_new: int) -> tuple[int, int]:
        longest = max(lens)
        if min(lens) < 1:
            raise M2R2Error("empty prompt: at least one token is required")
        P = bucket(longest)
        T = block_size(self.tree, self.lookup)
        need = longest + max_new + T + 1
        if need > self.cfg.max_position_embeddings:
            raise M2R2Error(f"prompt of {longest} tokens + {max_new} new tokens (+ a {T}-node tree) "
                            f"exceeds the model's context of {self.cfg.max_position_embeddings} positions")
        S_ = round_cache(max(need, P))
        self.cfg.check_cache_len(S_)
        return P, S_

    def generate(self, base, m2r2, draft_ids, prompts: Sequence[Sequence[int]], sc: SpecConfig = SpecConfig()
                 ) -> SpecResult:
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise M2R2Error("no prompts given")
        B, lens = len(prompts), [len(p) for p in prompts]
        P, S_ = self.plan(lens, sc.max_new_tokens)
        stop = stop_tuple(self.cfg, sc.stop_ids)
        tokens = pad_prompts(prompts, P)
        s = sc.sampling
        filtered = (s.top_k > 0) or (s.top_p < 1.0)
        dp = self.draft_params(base, m2r2, draft_ids)
        args = (base, dp, jnp.asarray(draft_ids, jnp.int32), jnp.asarray(tokens), jnp.asarray(lens, jnp.int32),
                jnp.asarray(stop, jnp.int32), jax.random.key(s.seed), jnp.float32(max(s.temperature, 0.0)),
                jnp.int32(s.top_k), jnp.float32(s.top_p))
        key = (B, P, S_, sc.max_new_tokens, s.greedy, filtered, jax.tree.structure((base, dp)))
        compile_s = 0.0
        if key not in self._compiled:
            fn = speculative_fn(self.cfg, self.mc, self.tree, s.greedy, sc.max_new_tokens, S_, self.draft_layers,
                                filtered, self.lookup, self.lookup_ngram, self.lookup_min_ngram, self.extend)
            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(fn).lower(*args).compile()
            compile_s = time.perf_counter() - t0
            self.compiles += 1
        t0 = time.perf_counter()
        out, n_out, stats = self._compiled[key](*args)
        out = np.asarray(jax.block_until_ready(out))
        dt = time.perf_counter() - t0
        n_out = np.asarray(n_out)
        st = jax.tree.map(np.asarray, stats)
        return SpecResult([out[b, :n_out[b]].tolist() for b in range(B)], dt, compile_s, st["steps"].tolist(),
                          st["accepted"].tolist(), st["depth_hits"], st["node_tries"], st["node_hits"],
                          st["lookup_steps"].tolist(), st["lookup_accepted"].tolist(), st["ext_steps"].tolist(),
                          st["ext_accepted"].tolist())

    def cost_breakdown(self, base, m2r2, draft_ids, cache_len: int = 512, fill: int = 256,
                       repeats: int = 5, batch: int = 1) -> dict:
        """Median ms of one draft (the whole tree, depth by depth) and of one tree verification, each
        jitted alone over a cache filled to `fill` positions. The decode loop's remaining
        per-step work (acceptance, compaction, bookkeeping) is its step time minus these two."""
        cfg, tree = self.cfg, self.tree
        cache_len = min(cache_len, cfg.max_position_embeddings)
        fill = min(fill, cache_len - tree.size)
        cache = D.init_cache(cfg, batch, cache_len)
        pos = jnp.full((batch,), fill, jnp.int32)
        cur = jnp.ones((batch,), jnp.int32)
        dids = jnp.asarray(draft_ids, jnp.int32)
        dp = self.draft_params(base, m2r2, dids)
        draft = jax.jit(lambda b, q, d, c, p, t: _draft(cfg, self.mc, tree, b, q, d, c, p, t))
        # the cache is donated, as in the decode loop, where it is updated in place: an undonated cache
        # would be copied (all layers' K/V) on every call and counted as verification
        verify = jax.jit(lambda b, t, c, p: _verify(cfg, tree, b, t, c, p), donate_argnums=2)
        fresh = jax.jit(lambda: D.init_cache(cfg, batch, cache_len))
        toks = jnp.zeros((batch, tree.size), jnp.int32)

        def med(fn, setup=lambda: None):
            jax.block_until_ready(fn(setup()))
            ts = []
            for _ in range(repeats):
                arg = jax.block_until_ready(setup())
                t0 = time.perf_counter()
                jax.block_until_ready(fn(arg))
                ts.append(time.perf_counter() - t0)
            return 1e3 * float(np.median(ts))

        return {"draft_ms": med(lambda _: draft(base, dp, dids, cache, pos, cur)),
                "verify_ms": med(lambda c: verify(base, toks, c, pos), fresh),
                "cache_len": cache_len, "fill": fill, "tree_size": tree.size, "draft_layers": self.draft_layers,
                "batch": batch}
