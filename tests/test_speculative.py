"""Self-speculative decoding: tree buffers, verification vs a Python oracle,
greedy losslessness (random adapters), batching, sampling distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.backend import XLA
from m2r2_jax.decoding.drafters import Drafter, DraftOptions, extension_tree, lookup_continuation
from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
from m2r2_jax.decoding.state import Proposal
from m2r2_jax.decoding.trees import build_tree, chain, get_tree
from m2r2_jax.decoding.verify import TreeTables, accept_greedy, accept_sampling
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2


def test_tree_buffers_hand_built():
    t = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    assert t.parent.tolist() == [-1, 0, 0, 1, 1, 2]
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 2]
    assert t.rank.tolist() == [0, 0, 1, 0, 1, 0]
    assert t.children.tolist() == [[1, 2], [3, 4], [5, -1], [-1, -1], [-1, -1], [-1, -1]]
    assert t.leaf_paths.tolist() == [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    want = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 0],
            [1, 0, 1, 0, 0, 1],
        ],
        bool,
    )
    assert (t.ancestor_mask == want).all()
    c = chain(3)
    assert c.parent.tolist() == [-1, 0, 1, 2] and c.topk == 1
    with pytest.raises(M2R2Error, match="no parent path"):
        build_tree([(0, 1)])
    with pytest.raises(M2R2Error, match="unknown draft tree"):
        get_tree("nope")
    for name in ("tree16", "tree32", "tree64"):
        assert get_tree(name).size == int(name[4:])


def _oracle_accept(tree, toks, target):
    """Plain-Python greedy acceptance: walk from the root taking the child whose token matches."""
    node, path = 0, [0]
    while True:
        nxt = [c for c in tree.children[node] if c >= 0 and toks[c] == target[node]]
        if not nxt:
            return len(path) - 1, path, target[node]
        node = nxt[0]
        path.append(node)


def test_greedy_accept_matches_oracle():
    tree = get_tree("tree16")
    rs = np.random.RandomState(0)
    for _ in range(50):
        V = 5  # tiny vocab so matches happen often; siblings carry distinct tokens, as real top-k drafts do
        toks = np.zeros((1, tree.size), int)
        for kids in tree.children:
            kids = kids[kids >= 0]
            toks[0, kids] = rs.permutation(V)[: len(kids)]
        logits = rs.randn(1, tree.size, V)
        a, path, bonus, _ = accept_greedy(
            TreeTables.of([tree]), 0, jnp.asarray(toks), jnp.argmax(jnp.asarray(logits), -1)
        )
        oa, opath, obonus = _oracle_accept(tree, toks[0], logits[0].argmax(-1))
        assert int(a[0]) == oa and int(bonus[0]) == int(obonus)
        assert np.asarray(path[0])[: oa + 1].tolist() == opath


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params)


def _m2r2(cfg, scale=0.3, **kw):
    mc = M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8, **kw).validate(cfg.num_layers)
    m = init_m2r2(cfg, mc, jax.random.key(3))
    # random (untrained) adapters: b != 0 so the draft really differs from the base
    m = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + scale * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if getattr(p[-1], "key", "") == "b"
            else x
        ),
        m,
    )
    return mc, m


def _spec(cfg, mc, tree, backend=XLA, **kw):
    opts = DraftOptions(tree=tree, lookup=kw.pop("lookup", 0), **kw)
    return SpeculativeDecoder(cfg, opts.drafter(cfg, mc, backend), backend)


def _run(spec, base, m2r2, prompts, sc):
    d = np.arange(spec.cfg.vocab_size, dtype=np.int32)
    return spec.generate(base, spec.prepare(base, m2r2, d), prompts, sc)


def _kind(r, kind, what="steps"):
    return sum(r.kinds[kind][what]) if kind in r.kinds else 0


def _prompts(n, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 256, rs.randint(3, 20)).tolist() for _ in range(n)]


@pytest.mark.parametrize("tree", ["chain3", "tree16"])
def test_greedy_lossless_random_adapters(tiny, tree):
    cfg, base = tiny
    mc, m2r2 = _m2r2(cfg)
    spec = _spec(cfg, mc, tree)
    gen = Generator(cfg)
    prompts = _prompts(4)
    sc = SpecConfig(max_new_tokens=24, stop_ids=(-1,))
    ar = [gen.generate(base, [p], GenerateConfig(max_new_tokens=24, stop_ids=(-1,))).new_ids[0] for p in prompts]
    single = [_run(spec, base, m2r2, [p], sc) for p in prompts]
    assert [r.new_ids[0] for r in single] == ar
    batched = _run(spec, base, m2r2, prompts, sc)
    assert batched.new_ids == ar
    # the drafts were used: some were accepted, so fewer steps than the 23 tokens after the first
    assert sum(batched.accepted) > 0 and sum(batched.steps) < 4 * 23
    assert [sum(r.accepted) for r in single] == batched.accepted


def test_zero_adapters_draft_well_and_stop_on_eos(tiny):
    """With rate 1 and zero adapters the fast stream IS the base: every draft is accepted."""
    cfg, base = tiny
    mc = M2R2Config(rate=1, layer_map="prefix", rank=4, router_dim=8).validate(cfg.num_layers)
    m2r2 = init_m2r2(cfg, mc, jax.random.key(0))
    spec = _spec(cfg, mc, "chain3")
    p = _prompts(1, seed=5)[0]
    r = _run(spec, base, m2r2, [p], SpecConfig(max_new_tokens=21, stop_ids=(-1,)))
    assert r.tau == 4.0 and r.steps[0] == 5  # 1 prefill token + 5 steps x 4 tokens
    ar = Generator(cfg).generate(base, [p], GenerateConfig(max_new_tokens=21, stop_ids=(-1,))).new_ids[0]
    assert r.new_ids[0] == ar
    stop = ar[7]
    r2 = _run(spec, base, m2r2, [p], SpecConfig(max_new_tokens=21, stop_ids=(stop,)))
    assert r2.new_ids[0] == ar[: ar.index(stop) + 1]


def test_no_recompile_within_bucket(tiny):
    cfg, base = tiny
    mc, m2r2 = _m2r2(cfg)
    spec = _spec(cfg, mc, "chain2")
    _run(spec, base, m2r2, [[5, 6, 7]], SpecConfig(max_new_tokens=8))
    r = _run(spec, base, m2r2, [list(range(10, 22))], SpecConfig(max_new_tokens=8))
    assert spec.compiles == 1 and r.compile_seconds == 0.0


# (star4 + lookup covers the lookup branch, the lookup extension and plain star steps in one case)
@pytest.mark.parametrize("tree,lookup", [("tree16", 0), ("star4", 4)])
def test_sampling_lossless_distribution(tiny, tree, lookup):
    """Empirical next-2-token distribution of speculative sampling == the base's (chi-square, fixed seed);
    with prompt lookup, the prompt repeats so that the lookup branch drafts (star4: and the lookup
    extension of M2R2 drafts)."""
    cfg, base = tiny
    base = dict(base, final_norm=base["final_norm"] * 40.0)  # a peaked distribution: few likely tokens
    mc, m2r2 = _m2r2(cfg, scale=1.0)
    spec = _spec(cfg, mc, tree, lookup=lookup, lookup_min_ngram=1)
    extend = "m2r2+lookup" in spec.drafter.kinds
    gen = Generator(cfg)
    d = np.arange(cfg.vocab_size, dtype=np.int32)
    dp = spec.prepare(base, m2r2, d)
    prompt = [11, 12, 13] if not lookup else [11, 12, 13, 11, 12, 13, 11]
    if extend:  # a prompt where the first token is often new to the text and the top-1 draft is not
        prompt = list(range(3, 40))
    n = 300
    sc = lambda s: SamplingConfig(temperature=1.0, seed=s)
    # tokens 2-3 come from a speculative step (token 1 is sampled after prefill)
    spec_first = [
        tuple(
            spec.generate(base, dp, [prompt], SpecConfig(max_new_tokens=3, stop_ids=(-1,), sampling=sc(s))).new_ids[0][
                1:3
            ]
        )
        for s in range(n)
    ]
    ar_first = [
        tuple(
            gen.generate(
                base, [prompt], GenerateConfig(max_new_tokens=3, stop_ids=(-1,), sampling=sc(10_000 + s))
            ).new_ids[0][1:3]
        )
        for s in range(n)
    ]
    from collections import Counter

    a, b = Counter(spec_first), Counter(ar_first)
    keys = sorted(set(a) | set(b))
    # pool rare outcomes, then a two-sample chi-square test
    big = [k for k in keys if a[k] + b[k] >= 10]
    obs = np.array(
        [[a[k] for k in big] + [n - sum(a[k] for k in big)], [b[k] for k in big] + [n - sum(b[k] for k in big)]], float
    )
    obs = obs[:, obs.sum(0) > 0]
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    chi2 = ((obs - exp) ** 2 / exp).sum()
    dof = obs.shape[1] - 1
    from scipy.stats import chi2 as chi2_dist

    assert dof >= 3, "test distribution too flat to be informative"
    assert chi2_dist.sf(chi2, dof) > 0.01, (chi2, dof)
    # the drafts were really used: some drafted tokens were accepted
    r = spec.generate(base, dp, [prompt] * 4, SpecConfig(max_new_tokens=16, stop_ids=(-1,), sampling=sc(1)))
    assert sum(r.accepted) > 0
    if lookup:
        assert _kind(r, "lookup") > 0
    if extend:
        assert _kind(r, "m2r2+lookup") > 0


def _chi2_ok(counts, probs, alpha=1e-3):
    from scipy.stats import chisquare

    probs = np.asarray(probs, np.float64)
    counts = np.asarray(counts, np.float64)
    keep = probs > 0
    assert counts[~keep].sum() == 0, "sampled a zero-probability token"
    exp = probs[keep] / probs[keep].sum() * counts.sum()
    return chisquare(counts[keep], exp).pvalue > alpha


def test_rejection_sampling_exact_on_tiny_vocab():
    """The tree acceptance rule itself: the first emitted token ~ p(root), and the second, given the
    first was an accepted draft node c, ~ p(c) — whatever the drafts are (20k samples, chi-square)."""
    tree = build_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0)])
    V, n = 6, 20000
    rs = np.random.RandomState(0)
    probs = rs.dirichlet(np.ones(V) * 0.7, tree.size).astype(np.float32)
    toks = np.array([0, 2, 4, 1, 3, 5, 0], np.int32)[: tree.size]  # siblings distinct
    keys = jax.random.split(jax.random.key(0), n)
    tt = TreeTables.of([tree])
    a, path, bonus, _ = jax.jit(
        jax.vmap(lambda k: accept_sampling(tt, 0, jnp.asarray(toks)[None], jnp.asarray(probs)[None], k))
    )(keys)
    a, path, bonus = np.asarray(a)[:, 0], np.asarray(path)[:, 0], np.asarray(bonus)[:, 0]
    first = np.where(a >= 1, toks[path[:, 1]], bonus)
    assert _chi2_ok(np.bincount(first, minlength=V), probs[0])
    for c in (1, 2):  # condition on the first token being draft node c
        sel = (a >= 1) & (path[:, 1] == c)
        second = np.where(a[sel] >= 2, toks[path[sel, 2]], bonus[sel])
        assert sel.sum() > 500 and _chi2_ok(np.bincount(second, minlength=V), probs[c])


def test_tree_selection_trades_acceptance_for_cost():
    from m2r2_jax.decoding.tree_select import acceptance_from_nodes, select_tree

    curve = {1: 1.0, 8: 1.35, 16: 1.73, 32: 2.8, 64: 4.74}
    p = [[0.6, 0.15, 0.08, 0.05]] * 5
    cheap = select_tree(p, curve, draft_cost=0.02)
    dear = select_tree(p, curve, draft_cost=0.4)
    assert cheap.tree.max_depth > dear.tree.max_depth  # expensive drafting -> shallower trees
    assert cheap.speedup > dear.speedup > 0
    # the expected length of a chain is 1 + a + a^2 + ...
    ch = select_tree([[0.5]] * 3, {1: 1.0, 64: 1.0}, draft_cost=0.0, max_nodes=4)
    assert ch.tree.size == 4 and abs(ch.expected_tokens - (1 + 0.5 + 0.25 + 0.125)) < 1e-9
    # with free verification and no draft cost, more nodes never hurt
    assert select_tree(p, {1: 1.0, 64: 1.0}, 0.0).tree.size == 64
    rows = [
        {"depth": 1, "rank": 0, "tries": 10, "hits": 6},
        {"depth": 1, "rank": 1, "tries": 10, "hits": 2},
        {"depth": 2, "rank": 0, "tries": 6, "hits": 3},
        {"depth": 0, "rank": 0, "tries": 10, "hits": 10},
    ]
    assert acceptance_from_nodes(rows) == [[0.6, 0.2], [0.5]]


@pytest.mark.parametrize("adapter", ["lowrank", "full"])
def test_merged_draft_params_equal_adapters(tiny, adapter):
    """Drafting folds the adapters (W + A B, or W + D at full rank) and gains into the layer weights: the
    same fast stream (`FastStream(merged=True)` over the merged params) and draft head up to float rounding."""
    from m2r2_jax.m2r2 import stream as S
    from m2r2_jax.m2r2.modules import FastStream
    from m2r2_jax.model import layers as L
    from m2r2_jax.model.attention import SetsAttention
    from m2r2_jax.model.params import module_tree

    cfg, base = tiny
    mc, m2r2 = _m2r2(cfg, gain=True, adapter=adapter)
    m2r2["fast"] = [dict(ad, gain_attn=ad["gain_attn"] * 1.5, gain_mlp=ad["gain_mlp"] * 0.5) for ad in m2r2["fast"]]
    if adapter == "full":  # a trainable [in, out] delta per projection (zero at init: perturbed here)
        assert set(m2r2["fast"][0]["q"]) == {"d"} and m2r2["fast"][0]["q"]["d"].shape == (cfg.hidden_size, cfg.q_dim)
        m2r2 = jax.tree_util.tree_map_with_path(
            lambda p, x: (
                x + 0.05 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
                if getattr(p[-1], "key", "") == "d"
                else x
            ),
            m2r2,
        )
    draft_ids = jnp.asarray([7, 3, 100, 42, 5], jnp.int32)
    dp = S.draft_params(cfg, mc, base, m2r2, draft_ids)
    B, T = 2, 5
    h = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size))
    cos, sin = L.rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(T)[None], (B, T)))
    m_self = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (B, T, T))
    att = lambda l: SetsAttention(cfg, XLA, self_mask=m_self)
    layers = [base["layers"][j] for j in mc.base_layers(cfg.num_layers)]
    want, wkv = FastStream(cfg, mc).apply({"params": module_tree(m2r2["fast"])}, layers, h, cos, sin, att)
    got, gkv = FastStream(cfg, mc, merged=True).apply({"params": {}}, dp["layers"], h, cos, sin, att)
    plain, _ = FastStream(cfg, mc, merged=True).apply({"params": {}}, layers, h, cos, sin, att)
    assert float(jnp.abs(want[-1] - plain[-1]).max()) > 1e-2  # the adapters really act
    for l in range(len(want)):
        np.testing.assert_allclose(got[l], want[l], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(gkv[l][0], wkv[l][0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(
        S.draft_head_logits(cfg, dp, h), S.draft_logits(cfg, base, h, draft_ids), atol=1e-4, rtol=1e-4
    )
    assert len(S.draft_params(cfg, mc, base, m2r2, draft_ids, depth=1)["layers"]) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("T", [2, 4])
def test_decode_block_rows_bit_identical_to_chain_verification(tiny, dtype, T):
    """One AR step over a block of T slots (the token + padding) gives the same logits, bit for bit,
    as that token's row in a T-token chain verification: same shapes, same cache slots."""
    import dataclasses

    from m2r2_jax.model import decoder as D

    cfg, base = tiny
    if dtype == "bfloat16":
        cfg = dataclasses.replace(cfg, param_dtype="bfloat16", matmul_dtype="bfloat16").validate()
        base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    fwd = jax.jit(lambda p, t, c, s: D.forward(cfg, p, t, c, s))
    prompt = jnp.asarray([_prompts(1, seed=7)[0]], jnp.int32)
    P = prompt.shape[1]
    toks = np.random.RandomState(1).randint(3, cfg.vocab_size, 3 * T).tolist()
    cache0 = D.init_cache(cfg, 1, 64)
    _, cache0 = fwd(base, prompt, cache0, jnp.zeros((1,), jnp.int32))
    ar, c = [], cache0
    for j, t in enumerate(toks):
        lg, c = fwd(base, jnp.asarray([[t] + [0] * (T - 1)]), c, jnp.asarray([P + j]))
        ar.append(np.asarray(lg[0, 0]))
    c = cache0
    for j in range(0, len(toks), T):
        lg, c = fwd(base, jnp.asarray([toks[j : j + T]]), c, jnp.asarray([P + j]))
        for r in range(T):
            np.testing.assert_array_equal(np.asarray(lg[0, r]), ar[j + r])


@pytest.mark.parametrize("tree", ["chain1", "chain3"])
def test_bf16_lossless_with_ar_block(tiny, tree):
    """bf16 weights and matmuls. Rounding the matmul inputs to bf16 can turn the f32-level
    differences between a one-slot step and a T-node verification into different tokens; decoding
    AR through blocks of T slots (GenerateConfig.block) gives every token the verification's shapes
    and cache slots, and a chain's speculative output equals that AR output token for token,
    whatever the (random) draft. (Trees with siblings put a node's K/V in another slot than AR
    does; the attention sums then differ in rounding.)"""
    import dataclasses

    cfg, base = tiny
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", matmul_dtype="bfloat16").validate()
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    mc, m2r2 = _m2r2(cfg, scale=0.02)  # drafts partly accepted
    tree = get_tree(tree)
    prompts = _prompts(4, seed=2)
    gen = Generator(cfg)
    ar = gen.generate(base, prompts, GenerateConfig(max_new_tokens=24, stop_ids=(-1,), block=tree.size)).new_ids
    spec = _spec(cfg, mc, tree)
    r = _run(spec, base, m2r2, prompts, SpecConfig(max_new_tokens=24, stop_ids=(-1,)))
    assert r.new_ids == ar and 0 < sum(r.accepted) < 4 * 23


def test_prompt_lookup_matches_oracle():
    """lookup_continuation against a plain-Python search: the K tokens after the latest earlier occurrence
    of the last n tokens, longest n first."""

    def oracle(h, hl, K, nmax, nmin):
        t = list(h[:hl])
        for n in range(nmax, nmin - 1, -1):
            for i in range(hl - n - 1, -1, -1) if hl > n else ():
                if t[i : i + n] == t[-n:]:
                    return True, list(h[i + n : i + n + K])
        return False, None

    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(60):
        K, nmax = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        nmin = int(rng.integers(1, nmax + 1))
        h = rng.integers(0, 4, (3, 40)).astype(np.int32)
        hl = rng.integers(1, 32, 3).astype(np.int32)
        found, cand = lookup_continuation(jnp.asarray(h), jnp.asarray(hl), K, nmax, nmin)
        for b in range(3):
            of, oc = oracle(h[b], int(hl[b]), K, nmax, nmin)
            assert bool(found[b]) == of
            if of:
                hits += 1
                assert np.asarray(cand[b]).tolist() == oc
    assert hits > 30


@pytest.mark.parametrize("tree", ["chain1", "tree16"])
def test_greedy_lossless_with_prompt_lookup(tiny, tree):
    """Prompt lookup drafts some steps (repetitive prompts), the fast stream the others; the output is
    the AR output token for token, one by one and batched."""
    cfg, base = tiny
    mc, m2r2 = _m2r2(cfg)
    spec = _spec(cfg, mc, tree, lookup=3, lookup_ngram=2, lookup_min_ngram=1)
    gen = Generator(cfg)
    prompts = [(p * 3)[:17] for p in _prompts(4, seed=2)] + [[7]]
    sc = SpecConfig(max_new_tokens=24, stop_ids=(-1,))
    ar = [gen.generate(base, [p], GenerateConfig(max_new_tokens=24, stop_ids=(-1,))).new_ids[0] for p in prompts]
    single = [_run(spec, base, m2r2, [p], sc) for p in prompts]
    assert [r.new_ids[0] for r in single] == ar
    assert sum(_kind(r, "lookup") for r in single) > 0 and sum(_kind(r, "lookup", "accepted") for r in single) > 0
    assert sum(_kind(r, "m2r2") for r in single) > 0  # some M2R2-drafted steps too
    # a one-depth star gets the lookup extension of its M2R2 drafts (star3 + lookup 3: a 4-node block)
    extend = "m2r2+lookup" in spec.drafter.kinds
    assert extend == (tree == "star3")
    if extend:
        assert sum(_kind(r, "m2r2+lookup") for r in single) > 0
    batched = _run(spec, base, m2r2, prompts, sc)
    assert batched.new_ids == ar
    if extend:  # and switched off, the same output
        off = _spec(cfg, mc, tree, lookup=3, lookup_ngram=2, lookup_min_ngram=1, extend=False)
        r_off = _run(off, base, m2r2, prompts, sc)
        assert r_off.new_ids == ar and "m2r2+lookup" not in r_off.kinds
    with pytest.raises(M2R2Error, match="lookup_min_ngram"):
        DraftOptions(tree=tree, lookup=2, lookup_ngram=1, lookup_min_ngram=2)


def test_extension_tree_layout():
    """The lookup extension's block: the star's ranks 0 and 1, then a chain under rank 0, in the node
    order the decode loop fills ([cur, x1, x2, c1, c2, ...]); only for one-depth stars."""
    t = extension_tree(get_tree("star4"), 5)
    assert t.size == 5 and t.max_depth == 3
    assert t.parent.tolist() == [-1, 0, 0, 1, 3]
    assert t.depth.tolist() == [0, 1, 1, 2, 3]
    assert t.rank[1] == 0 and t.rank[2] == 1
    assert extension_tree(get_tree("star3"), 4).parent.tolist() == [-1, 0, 0, 1]
    assert extension_tree(get_tree("tree16"), 16) is None
    assert extension_tree(get_tree("chain1"), 5) is None


class RepeatLast(Drafter):
    """A peer drafter as a test fixture: proposes the last token repeated, as a chain of `k`."""

    def __init__(self, k: int = 2):
        self.k = k
        self.trees = (chain(k),)
        self.kinds = ("repeat",)

    def propose(self, dparams, base, view) -> Proposal:
        return Proposal(jnp.repeat(view.cur[:, None], self.k + 1, 1), jnp.int32(0))


def test_peer_drafter_plugs_in_losslessly(tiny):
    """A drafter written outside the library runs through the same loop (verification, acceptance and
    statistics untouched): greedy output equals AR one by one and batched, and on a prompt that makes
    the model repeat itself its drafts are accepted."""
    cfg, base = tiny
    spec = SpeculativeDecoder(cfg, RepeatLast(2))
    gen = Generator(cfg)
    sc = SpecConfig(max_new_tokens=20, stop_ids=(-1,))
    prompts = _prompts(3, seed=4) + [[9] * 12]
    ar = [gen.generate(base, [p], GenerateConfig(max_new_tokens=20, stop_ids=(-1,))).new_ids[0] for p in prompts]
    single = [spec.generate(base, None, [p], sc) for p in prompts]
    assert [r.new_ids[0] for r in single] == ar
    assert spec.generate(base, None, prompts, sc).new_ids == ar
    for r, out in zip(single, ar):  # acceptance is exactly "the next token repeats the current one"
        repeats = sum(out[i] == out[i - 1] for i in range(1, len(out)))
        assert (sum(r.accepted) > 0) == (repeats > 0)
        assert r.kinds["repeat"]["steps"] == r.steps
