"""The training-free speculative peers as drafters in the shared loop (decoding/peer_drafters):
greedy output == AR token for token (batched), sampling exact against the target's softmax, their
host / jitted parts against plain-Python references, and their knobs refused when bad."""

import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.decoding.peer_drafters import Datastore, DraftVerify, Lookahead, Rest, draft_options, search_skip
from m2r2_jax.decoding.peer_drafters.lookahead import LookaheadState, lookahead_layout, pool_insert
from m2r2_jax.decoding.peer_drafters.rest import fill_trie, retrieve
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
from m2r2_jax.decoding.state import DraftView, StepResult
from m2r2_jax.decoding.trees import build_tree
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.model import decoder as D

MAX_NEW = 20
SC = SpecConfig(max_new_tokens=MAX_NEW, stop_ids=(-1,))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params)


def _prompts():
    rs = np.random.RandomState(4)
    return [rs.randint(3, 256, rs.randint(3, 16)).tolist() for _ in range(3)] + [[9] * 12]


@pytest.fixture(scope="module")
def ar(tiny):
    cfg, base = tiny
    return Generator(cfg).generate(base, _prompts(), GenerateConfig(max_new_tokens=MAX_NEW, stop_ids=(-1,))).new_ids


def _lossless(cfg, base, drafter, ar, *sources):
    spec = SpeculativeDecoder(cfg, drafter)
    r = spec.generate(base, spec.prepare(base, *sources), _prompts(), SC)
    assert r.new_ids == ar
    assert sum(r.accepted) > 0 and r.kinds[drafter.kinds[0]]["steps"] == r.steps  # the drafts were used
    return r


# ----------------------------------------------------------------------------- Draft & Verify


DV = dict(k=4, threshold=0.3)


@pytest.fixture(scope="module")
def dv_run(tiny, ar):
    cfg, base = tiny
    return _lossless(cfg, base, DraftVerify(cfg, (1,), **DV), ar)


def test_draft_verify_lossless(tiny, dv_run):
    """Layer skipping drafts losslessly (batched, each row with its own confidence stop)."""
    cfg, _ = tiny
    assert dv_run.tau > 1.0
    # LayerSkip's exit at layer E is the skipped set E..L-1
    assert DraftVerify.exit_at(cfg, 2, k=4) == DraftVerify(cfg, (2,), k=4)


def test_draft_verify_search(tiny, dv_run):
    """The search's data-masked loop (one compile for every set) measures exactly what the static drafter
    does, and picks the best-measured layer."""
    cfg, base = tiny
    res = search_skip(cfg, base, _prompts(), 1, candidates=[1, 2], max_new_tokens=MAX_NEW, **DV)
    tried = res["history"][0]["tried"]
    assert tried["1"] == pytest.approx(dv_run.tau) and res["compiles"] == 1
    assert res["skip"] == [max((1, 2), key=lambda c: tried[str(c)])] and res["tau"] == max(tried.values())


# ----------------------------------------------------------------------------- Lookahead


def test_lookahead_lossless(tiny, ar):
    cfg, base = tiny
    _lossless(cfg, base, Lookahead(cfg.vocab_size, window=3, ngram=3, guesses=3), ar)


def test_lookahead_layout():
    """W=2, N=3, G=1: root, guess chain g, spine s0 -> s1 with branches b0 (under s0), b1 (under s1)."""
    tree, gn, ln = lookahead_layout(2, 3, 1)
    assert tree.size == 1 + (2 + 1) * 2 and gn.shape == (1, 2) and ln.shape == (2, 2)
    anc = tree.ancestor_mask
    s0, s1, b0, b1 = ln[0, 0], ln[0, 1], ln[1, 0], ln[1, 1]
    see = lambda n: set(np.nonzero(anc[n])[0].tolist())  # noqa: E731
    assert see(s1) == {0, s0, s1} and see(b0) == {0, s0, b0} and see(b1) == {0, s0, s1, b1}
    assert see(gn[0, 1]) == {0, gn[0, 0], gn[0, 1]}
    assert tree.depth[b1] == 3 and tree.depth[b0] == 2  # position pos + 1 + column + level
    assert tree.rank[gn[0, 0]] == 0 and tree.rank[s0] == 1  # the guesses come first


def _pool_ref(pool, fill, ngrams, ok):
    pool, fill = pool.copy(), fill.copy()
    G = pool.shape[1]
    for ng in ngrams if ok else ():
        key, val = ng[0], list(ng[1:])
        if any(list(pool[key, s]) == val for s in range(min(fill[key], G))):
            continue
        pool[key, fill[key] % G] = val
        fill[key] += 1
    return pool, fill


def test_lookahead_pool_matches_python():
    rs = np.random.RandomState(0)
    V, G, N = 4, 3, 3
    pool, fill = np.zeros((V, G, N - 1), np.int32), np.zeros(V, np.int32)
    jp, jf = jnp.asarray(pool), jnp.asarray(fill)
    insert = jax.jit(pool_insert)
    for step in range(30):
        ng = rs.randint(0, 3, (5, N)).astype(np.int32)
        ok = step % 7 != 3
        pool, fill = _pool_ref(pool, fill, ng, ok)
        jp, jf = insert(jp, jf, jnp.asarray(ng), jnp.bool_(ok))
        assert (np.asarray(jp) == pool).all() and (np.asarray(jf) == fill).all()
    assert fill.max() > G  # the ring wrapped


def test_lookahead_state_update_matches_python():
    """Pool fed with (column, output) n-grams once warm; levels move up and shift left by the accepted count."""
    W, N, G, V, B = 3, 3, 2, 8, 2
    la = Lookahead(V, W, N, G)
    tree, gn, ln = la.layout
    rs = np.random.RandomState(1)
    levels = rs.randint(0, V, (B, N - 1, W)).astype(np.int32)
    target = rs.randint(0, V, (B, tree.size)).astype(np.int32)
    acc = np.array([0, 2], np.int32)
    st = LookaheadState(
        jnp.asarray(levels), jnp.zeros((B, V, G, N - 1), jnp.int32), jnp.zeros((B, V), jnp.int32), jnp.array([1, 0])
    )
    view = SimpleNamespace(active=jnp.array([True, True]))
    step = StepResult(jnp.asarray(target), jnp.asarray(acc), None, None, None)
    new = la.update_state(None, st, view, None, step)
    for b in range(B):
        o = target[b, ln[-1]]
        want = np.concatenate([levels[b, 1:], o[None]], 0)
        want = want[:, np.minimum(np.arange(W) + acc[b], W - 1)]
        assert (np.asarray(new.levels[b]) == want).all()
        ngrams = np.concatenate([levels[b].T, o[:, None]], 1)
        p, f = _pool_ref(np.zeros((V, G, N - 1), np.int32), np.zeros(V, np.int32), ngrams, b == 0)  # row 1 not warm
        assert (np.asarray(new.pool[b]) == p).all() and (np.asarray(new.fill[b]) == f).all()
    assert new.age.tolist() == [2, 1]
    # and the next proposal verifies the stored continuations of cur as guesses
    cur = jnp.asarray(levels[:, 0, 0])
    text = jnp.zeros((B, 4), jnp.int32)
    prop = la.propose(None, None, DraftView(None, None, cur, text, jnp.full((B,), 4), view.active, new))
    for g in range(G):
        stored = g < int(new.fill[0, cur[0]])
        want = np.asarray(new.pool[0, cur[0], g]) if stored else np.zeros(N - 1)
        assert (np.asarray(prop.tokens[0, gn[g]]) == want).all()
    assert (np.asarray(prop.tokens[:, ln.ravel()]) == np.asarray(new.levels).reshape(B, -1)).all()


# ----------------------------------------------------------------------------- REST


def test_rest_lossless(tiny, ar):
    """The datastore holds the model's own answers to other prompts and to these (as a distill cache does)."""
    cfg, base = tiny
    rs = np.random.RandomState(9)
    docs = [rs.randint(3, 256, 30).tolist() for _ in range(5)] + [p + a for p, a in zip(_prompts(), ar)][:3]
    _lossless(cfg, base, Rest(build_tree([(0,), (1,), (0, 0), (0, 0, 0), (1, 0)]), 4, 1, 8), ar, docs)


def _retrieve_ref(docs, ctx, nmax, nmin, depth):
    for n in range(nmax, nmin - 1, -1):
        if len(ctx) < n:
            continue
        conts = [d[i + n : i + n + depth] for d in docs for i in range(len(d) - n + 1) if d[i : i + n] == ctx[-n:]]
        if conts:
            return n, conts
    return 0, []


def _trie_ref(tree, conts):
    toks = [0] * tree.size
    through = {0: list(conts)}
    for node in range(tree.size):  # nodes are sorted by depth: a parent comes first
        d = int(tree.depth[node])
        kids = [c for c in tree.children[node] if c >= 0]
        if not kids:
            continue
        nxt = [c[d] for c in through.get(node, []) if len(c) > d]
        ranked = sorted(set(nxt), key=lambda x: (-nxt.count(x), x))
        for r, ch in enumerate(kids):
            if r < len(ranked):
                toks[ch] = ranked[r]
                through[ch] = [c for c in through[node] if len(c) > d and c[d] == ranked[r]]
    return toks


def test_rest_retrieval_and_trie_match_python():
    """Longest-suffix retrieval over the suffix array and the frequency-ranked trie, against brute force."""
    rs = np.random.RandomState(3)
    tree = build_tree([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    nmax, nmin, M, depth = 3, 1, 64, tree.max_depth

    @jax.jit
    def run(tokens, sa, h, tl):
        n, cnt, cont, valid = retrieve(tokens, sa, h, tl, nmax, nmin, M, depth)
        return n, cnt, cont, valid, jax.vmap(lambda c, v: fill_trie(tree, c, v))(cont, valid)

    found = 0
    for _ in range(6):  # 4 documents of 60 tokens in all (one compile), cut at random
        cuts = np.sort(rs.choice(np.arange(1, 60), 3, replace=False))
        docs = [d.tolist() for d in np.split(rs.randint(0, 4, 60), cuts)]
        dp = Rest(tree, nmax, nmin, M).prepare(None, Datastore.build(docs, nmax + depth))
        texts = [rs.randint(0, 5, rs.randint(1, 9)).tolist() for _ in range(6)]
        h = np.zeros((len(texts), 10), np.int32)
        for b, t in enumerate(texts):
            h[b, : len(t)] = t
        n, cnt, cont, valid, toks = run(dp["tokens"], dp["sa"], jnp.asarray(h), jnp.asarray([len(t) for t in texts]))
        for b, t in enumerate(texts):
            rn, rc = _retrieve_ref(docs, t, nmax, nmin, depth)
            assert int(n[b]) == rn and int(cnt[b]) == len(rc)
            got = [list(np.asarray(cont[b, m])[np.asarray(valid[b, m])]) for m in range(min(len(rc), M))]
            assert sorted(got) == sorted(rc)
            assert np.asarray(toks[b]).tolist() == _trie_ref(tree, rc)
            found += rn > 0
    assert found > 20
    # more occurrences than candidates: an even spread over the (continuation-ordered) range
    store = Datastore.build([[1, 2, 3], [1, 2, 4]] * 20, 4)
    dp = Rest(build_tree([(0,)]), 2, 2, 4).prepare(None, store)
    n, cnt, cont, valid = retrieve(dp["tokens"], dp["sa"], jnp.asarray([[1, 2]]), jnp.asarray([2]), 2, 2, 4, 1)
    assert int(cnt[0]) == 40 and sorted(np.asarray(cont[0, :, 0]).tolist()) == [3, 3, 4, 4]


def test_rest_datastore_from_distill_cache(tmp_path):
    from m2r2_jax.training.distill import FORMAT, MANIFEST

    recs = [{"prompt_ids": [1], "answer_ids": a, "prompt": str(i)} for i, a in enumerate([[5, 6, 7], [5, 6, 8, 2]])]
    (tmp_path / "shard_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "shards": [{"file": "shard_00000.jsonl"}]}))
    store = Datastore.from_distill_cache(tmp_path, 3)
    assert store.tokens[:9].tolist() == [5, 6, 7, -1, 5, 6, 8, 2, -1] and store.size == 7
    opts = draft_options("rest", rest_datastore=str(tmp_path), rest_limit=1)
    assert opts.sources()[0].size == 3
    with pytest.raises(M2R2Error, match="no self-distillation cache"):
        draft_options("rest", rest_datastore=str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- sampling


def _chi2_along_mode_path(out, probs_at):
    """Speculative sampling is exact for the whole sequence, so given any emitted prefix the next token
    ~ the target's softmax. Along the empirical mode path (the most frequent token at each position
    among the rows that followed the path so far: a choice from the past only), the rows on the path
    give a multinomial sample of the next token; one Pearson chi-square over all positions, every bin
    expected >= 5 times: the tokens expected < 5 times are pooled, and a pool still expected < 5 times
    joins the least expected bin (a lone rare token in a pool expected 0.03 times would otherwise add
    ~30 to the statistic). probs_at(path) -> [len(path) + 1, V] the target's softmax after prompt +
    path[:m]. -> (p-value, dof, rows on the path per position)."""

    from scipy.stats import chi2

    path = []
    for m in range(out.shape[1] - 1):
        on = np.all(out[:, :m] == np.asarray(path, int)[None], 1)
        vals, cnt = np.unique(out[on, m], return_counts=True)
        path.append(int(vals[np.argmax(cnt)]))
    probs = probs_at(path)
    stat, dof, sizes = 0.0, 0, []
    for m in range(out.shape[1]):
        on = np.all(out[:, :m] == np.asarray(path[:m], int)[None], 1)
        n = int(on.sum())
        sizes.append(n)
        if n < 30:
            break
        exp = probs[m] * n
        obs = np.bincount(out[on, m], minlength=len(exp)).astype(float)
        big = exp >= 5
        o, e = list(obs[big]), list(exp[big])
        if exp[~big].sum() >= 5 or not e:
            o, e = o + [obs[~big].sum()], e + [exp[~big].sum()]
        else:
            i = int(np.argmin(e))
            o[i], e[i] = o[i] + obs[~big].sum(), e[i] + exp[~big].sum()
        o, e = np.asarray(o), np.asarray(e)
        stat += ((o - e) ** 2 / e).sum()
        dof += len(e) - 1
    return chi2.sf(stat, dof), dof, sizes


def assert_sampling_exact(out, prompt, logits_after):
    """`out` [rows, n] sampled at temperature 1 after `prompt` follows the target's softmax (the
    chi-square along the mode path, p > 1e-3, with enough rows and bins), and a reference tempered by
    0.75 is refused (p < 1e-3): the test can fail. logits_after(seq) -> [len(seq), V] target logits."""

    def probs_at(path, T=1.0):
        lg = logits_after(prompt + path)[len(prompt) - 1 :] / T
        p = np.exp(lg - lg.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    pv, dof, sizes = _chi2_along_mode_path(out, probs_at)
    assert dof >= 8 and sizes[2] >= 100, (dof, sizes)
    assert pv > 1e-3, (pv, dof, sizes)
    assert _chi2_along_mode_path(out, lambda p: probs_at(p, 0.75))[0] < 1e-3


@pytest.mark.parametrize("which", ["draft_verify", "lookahead", "rest"])
def test_sampling_exact(tiny, which):
    """Temperature 1 on a peaked tiny model: 384 rows of one prompt (independent samples), the next-token
    counts along the mode path against the target's softmax (chi-square, fixed seed: p > 1e-3); the
    same counts against a reference tempered by 0.75 are refused (p < 1e-3), so the test can tell."""
    cfg, base = tiny
    base = dict(base, final_norm=base["final_norm"] * 40.0)  # few likely tokens: drafts get accepted
    prompt, B, n = [11, 12, 13, 14], 384, 8
    S = len(prompt) + n
    # one fixed shape: causal, so the logits up to a position ignore the padding after it
    forward = jax.jit(lambda b, t: D.forward(cfg, b, t, D.init_cache(cfg, 1, 64), jnp.zeros((1,), jnp.int32))[0])

    def logits_after(seq):  # [len(seq), V]: the target's logits after each prefix of seq
        return np.asarray(forward(base, jnp.asarray([seq + [0] * (S - len(seq))])), np.float64)[0, : len(seq)]

    sources = ()
    if which == "draft_verify":
        drafter = DraftVerify(cfg, (1,), k=3, threshold=0.0)
    elif which == "lookahead":
        drafter = Lookahead(cfg.vocab_size, window=3, ngram=3, guesses=3)
    else:  # the datastore: the greedy answer to the prompt (as a distill cache holds), and a distractor
        drafter = Rest(build_tree([(0,), (1,), (0, 0), (0, 0, 0)]), 3, 1, 16)
        seq = list(prompt)
        while len(seq) < S:
            seq.append(int(np.argmax(logits_after(seq)[-1])))
        sources = ([seq, [7, 8, 9]],)
    spec = SpeculativeDecoder(cfg, drafter)
    sc = SpecConfig(max_new_tokens=n, stop_ids=(-1,), sampling=SamplingConfig(temperature=1.0, seed=7))
    r = spec.generate(base, spec.prepare(base, *sources), [prompt] * B, sc)
    out = np.asarray(r.new_ids)
    assert out.shape == (B, n) and sum(r.accepted) > B // 4  # drafts were accepted

    assert_sampling_exact(out, prompt, logits_after)


# ----------------------------------------------------------------------------- knobs and the harness


def test_bad_knobs_refused(tmp_path, capsys):
    cases = [
        (("draft_verify",), dict(dv_max_draft=0), "max draft length"),
        (("draft_verify",), dict(dv_threshold=1.0), "threshold"),
        (("draft_verify",), dict(skip_layers="3,x"), "not a layer index"),
        (("draft_verify",), dict(skip_layers="1", exit_layer=2), "not both"),
        (("draft_verify",), dict(exit_layer=0), "exit layer"),
        (("lookahead",), dict(la_window=0), "window"),
        (("lookahead",), dict(la_ngram=1), "ngram"),
        (("lookahead",), dict(la_guesses=0), "guesses"),
        (("lookahead",), dict(la_window=100, la_ngram=4), "at most 256"),
        (("rest",), dict(), "datastore is required"),
        (("pld",), dict(lookup=0), "prompt lookup"),
        (("lookahead",), dict(rest_candidates=4), "applies to --drafter rest, not --drafter lookahead"),
        (("pld",), dict(lookup_extend=False), "applies to --drafter m2r2"),
        (("eagle9",), dict(), "unknown drafter"),
    ]
    for (name,), knobs, msg in cases:
        with pytest.raises(M2R2Error, match=msg):
            draft_options(name, **knobs)
    # the model's own depth is checked when the drafter is built
    cfg = SimpleNamespace(num_layers=3, vocab_size=16)
    with pytest.raises(M2R2Error, match=r"\[0, 3\)"):
        draft_options("draft_verify", skip_layers="1,5").drafter(cfg)
    with pytest.raises(M2R2Error, match="no draft model"):
        draft_options("draft_verify", skip_layers="0-2").drafter(cfg)
    assert draft_options("draft_verify").drafter(cfg).skip == (1,)  # the default: upper half, every other
    assert draft_options("draft_verify", exit_layer=2).drafter(cfg).skip == (2,)

    from eval.speculative import main
    from m2r2_jax.cli import run_main

    for argv, msg in (
        (["--drafter", "lookahead", "--la-window", "0"], "window"),
        (["--drafter", "rest"], "datastore is required"),
        (["--drafter", "lookahead", "--checkpoint", str(tmp_path)], "--checkpoint applies to --drafter m2r2"),
        (["--drafter", "draft_verify", "--la-ngram", "3"], "applies to --drafter lookahead"),
    ):
        with pytest.raises(SystemExit) as e:
            run_main(main, argv + ["--out", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and msg in err and "\n" not in err, err
    from eval.search_skip import main as search_main

    for argv, msg in ((["--skip", "0"], "--skip"), (["--max-draft", "0"], "max draft length")):
        with pytest.raises(SystemExit) as e:
            run_main(search_main, argv + ["--out", str(tmp_path / "s.json")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and msg in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


class _Tok:
    def apply_chat_template(self, messages, add_generation_prompt=False):
        return [1] + [3 + ord(c) % 200 for m in messages for c in m["content"]] + [4]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + i % 90) for i in ids)


def test_harness_runs_a_peer(tiny, tmp_path):
    """eval.speculative's harness with a stateful peer (lookahead): lossless on every prompt, its steps
    counted, the cost breakdown taken, the drafter in the config and the journal header."""
    from m2r2_jax.data.eval_sets import EvalItem
    from m2r2_jax.evaluation.spec_eval import SpecEvalConfig, run_spec_eval

    cfg, base = tiny
    model = SimpleNamespace(cfg=cfg, params=base, tokenizer=_Tok())
    items = [EvalItem("a", "qa", ["abcabcabc"]), EvalItem("b", "qa", ["xyz"])]
    ec = SpecEvalConfig(draft=draft_options("lookahead", la_window=3, la_ngram=3, la_guesses=3), max_new_tokens=12)
    j = tmp_path / "r.partial.jsonl"
    res = run_spec_eval(model, None, items, ec, progress=False, journal=j)
    assert res["lossless"] is True and res["prompts"] == 2 and res["tau"] >= 1.0
    assert res["config"]["drafter"] == "lookahead" and res["config"]["draft_options"]["window"] == 3
    assert res["cost"]["draft_ms"] > 0 and res["cost"]["verify_ms"] > 0 and res["lookup"] is None
    header = json.loads(j.read_text().splitlines()[0])["header"]
    assert header["drafter"] == "lookahead" and header["draft_options"] == {"window": 3, "ngram": 3, "guesses": 3}
    json.dumps(res)


def test_compare_specs():
    """eval.compare's drafter specs: names of eval.speculative's drafters, `m2r2+lookup` the only
    combination; each drafter gets only its own knobs; M2R2 alone means prompt lookup off."""
    from m2r2_jax.evaluation.compare import parse_specs, spec_options

    assert parse_specs("m2r2, m2r2+lookup,pld") == ("m2r2", "m2r2+lookup", "pld")
    for bad, msg in (
        ("", "at least one"),
        ("eagle9", "unknown drafter"),
        ("pld+lookup", "combine"),
        ("pld,pld", "twice"),
    ):
        with pytest.raises(M2R2Error, match=msg):
            parse_specs(bad)
    knobs = dict(la_window=3, lookup=None, tree=None)
    assert spec_options("m2r2", knobs).lookup == 0 and spec_options("m2r2+lookup", knobs).lookup == 4
    assert spec_options("lookahead", knobs).window == 3
    assert spec_options("pld", knobs).k == 4
