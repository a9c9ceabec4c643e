"""Early exit (dynamic compute): the jitted loop against plain-Python references on a tiny model, for
both K/V strategies; a threshold that never fires equals plain AR greedy; batch = rows one by one."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax import kernels as K
from m2r2_jax.backend import CPU_KERNELS
from m2r2_jax.decoding.early_exit import CalmExit, DynamicDecoder, M2R2Exit, SpecEEExit, StaticExit
from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.modules import Attention

MAX_NEW = 12


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params)


@pytest.fixture(scope="module")
def fast(tiny):
    cfg, _ = tiny
    mc = M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8).validate(cfg.num_layers)
    m = init_m2r2(cfg, mc, jax.random.key(3))
    m = jax.tree_util.tree_map_with_path(  # random adapters and router: the fast stream differs from the base
        lambda p, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if getattr(p[-1], "key", "") in ("b", "w_out", "layer_bias")
            else x
        ),
        m,
    )
    return mc, m


def _prompts(n, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 256, rs.randint(3, 12)).tolist() for _ in range(n)]


def _ar(cfg, base, prompts):
    return Generator(cfg).generate(base, prompts, GenerateConfig(max_new_tokens=MAX_NEW)).new_ids


def _kv_at(cfg, base, j, src, pos):
    lp = base["layers"][j]
    cos, sin = L.rope_cos_sin(cfg, jnp.asarray([[pos]], jnp.int32))
    x = L.rms_norm(src, lp["attn_norm"], cfg.rms_norm_eps)
    return Attention(cfg).apply({"params": lp["attn"]}, x, cos, sin, method="project_kv")


def _set_slot(cache, j, pos, k, v):
    ks, vs = list(cache.k), list(cache.v)
    ks[j], vs[j] = ks[j].at[:, :, pos].set(k[:, :, 0]), vs[j].at[:, :, pos].set(v[:, :, 0])
    return D.KVCache(ks, vs)


def ref_m2r2(cfg, mc, base, mp, prompt, thr, kv, max_pending=3):
    """Plain Python, eager, one token at a time: the fast stream through the training path's
    `stream.fast_stream` (merged layers as its base, zero adapters), the router, the exit, then the
    K/V: propagated from the aligned fast states, or (deferred) recomputed with the next full token."""
    N, n = cfg.num_layers, mc.n_fast(cfg.num_layers)
    t = [0] + mc.targets_of(N)
    idx = mc.base_layers(N)
    merged = dict(base, layers=list(base["layers"]))
    for l, j in enumerate(idx):
        merged["layers"][j] = mp["layers"][l]
    zero = init_m2r2(cfg, mc, jax.random.key(0))  # b = 0, gains 1: the merged weights alone
    S_ = 128
    cache = D.init_cache(cfg, 1, S_)
    lg, cache = D.forward(cfg, base, jnp.asarray([prompt]), cache, jnp.zeros((1,), jnp.int32))
    out, pending = [int(jnp.argmax(lg[0, -1]))], []
    while len(out) < MAX_NEW and out[-1] not in cfg.eos_token_ids:
        tok, pos = out[-1], len(prompt) + len(out) - 1
        h0 = D.embed(cfg, base, jnp.asarray([[tok]]))
        hs = S.fast_stream(
            cfg,
            mc,
            merged,
            zero,
            h0,
            cache,
            (jnp.arange(S_) < pos)[None, None],
            jnp.ones((1, 1, 1), bool),
            jnp.asarray([[pos]], jnp.int32),
        )
        p = np.asarray(jax.nn.sigmoid(S.arla_router(cfg, mc, mp["router"], hs, h0))[0, 0])
        e = next((l for l in range(n) if p[l] >= thr), None)
        if kv == "deferred" and len(pending) >= max_pending:
            e = None
        if e is not None:
            states = [h0] + hs[: e + 1] + [hs[e]] * (n - e - 1)
            for j in range(N):
                src = states[max(m for m in range(n + 1) if t[m] <= j)]
                cache = _set_slot(cache, j, pos, *_kv_at(cfg, base, j, src, pos))
            out.append(int(jnp.argmax(D.logits_from_hidden(cfg, base, hs[e])[0, 0])))
            pending.append(tok)
        else:
            block = (pending if kv == "deferred" else []) + [tok]
            start = pos - len(block) + 1
            lg, cache = D.forward(cfg, base, jnp.asarray([block]), cache, jnp.asarray([start], jnp.int32))
            out.append(int(jnp.argmax(lg[0, -1])))
            pending = []
    return out


def ref_slow(cfg, base, prompt, decide):
    """Plain Python for the base-model exits: run layer by layer; at the first layer i where
    decide(i, h) holds, the token leaves through the LM head and every later layer's K/V is projected
    from the exit state."""
    N, S_ = cfg.num_layers, 128
    cache = D.init_cache(cfg, 1, S_)
    lg, cache = D.forward(cfg, base, jnp.asarray([prompt]), cache, jnp.zeros((1,), jnp.int32))
    out = [int(jnp.argmax(lg[0, -1]))]
    while len(out) < MAX_NEW and out[-1] not in cfg.eos_token_ids:
        tok, pos = out[-1], len(prompt) + len(out) - 1
        h = D.embed(cfg, base, jnp.asarray([[tok]]))
        for i in range(N):
            h, cache, _ = D.forward_hidden(
                cfg, base, jnp.asarray([[tok]]), cache, jnp.asarray([pos], jnp.int32), layer_range=(i, i + 1), h=h
            )
            if i + 1 < N and decide(i + 1, h):
                for j in range(i + 1, N):
                    cache = _set_slot(cache, j, pos, *_kv_at(cfg, base, j, h, pos))
                break
        out.append(int(jnp.argmax(D.logits_from_hidden(cfg, base, h)[0, 0])))
    return out


def _gen(dec, base, mp, prompts, thr):
    return dec.generate(base, mp, prompts, thr, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("kv", ["propagate", "deferred"])
def test_m2r2_exit_matches_reference(tiny, fast, kv):
    """A batch of 3 equals the eager reference row by row, and the loop on each row alone; a threshold
    that never fires is plain AR greedy, every token running the fast layers and the full depth."""
    cfg, base = tiny
    mc, m2r2 = fast
    dec = DynamicDecoder(cfg, M2R2Exit(cfg, mc), kv, max_pending=2)
    mp = dec.method.prepare(base, m2r2)
    prompts = _prompts(3, seed=7)
    r = _gen(dec, base, mp, prompts, 0.45)
    assert sum(r.exits) > 0 and all(0 < t for t in r.tokens)
    for b, p in enumerate(prompts):
        assert r.new_ids[b] == ref_m2r2(cfg, mc, base, mp, p, 0.45, kv, max_pending=2), (kv, b)
    one = _gen(dec, base, mp, prompts[:1], 0.45)
    assert one.new_ids[0] == r.new_ids[0] and one.exits[0] == r.exits[0]
    r = _gen(dec, base, mp, prompts, 1.5)
    assert r.new_ids == _ar(cfg, base, prompts) and sum(r.exits) == 0
    assert all(x == t * (mc.n_fast(cfg.num_layers) + cfg.num_layers) for x, t in zip(r.layers, r.tokens))


def test_static_and_calm_match_reference(tiny):
    cfg, base = tiny
    prompts = _prompts(2, seed=2)
    ar = _ar(cfg, base, prompts)
    st = DynamicDecoder(cfg, StaticExit(cfg))
    for E in (1, 2):
        r = _gen(st, base, None, prompts, E)
        for b, p in enumerate(prompts):
            assert r.new_ids[b] == ref_slow(cfg, base, p, lambda i, h, E=E: i >= E)
        assert all(x == t * E for x, t in zip(r.layers, r.tokens))
    assert _gen(st, base, None, prompts, cfg.num_layers).new_ids == ar

    ids = np.arange(0, cfg.vocab_size, 2, dtype=np.int32)
    calm = DynamicDecoder(cfg, CalmExit(cfg, checks=(1, 2)))
    mp = calm.method.prepare(base, ids)
    head = jnp.asarray(base["embed"])[ids] if cfg.tie_word_embeddings else jnp.asarray(base["lm_head"]).T[ids]

    def margin(h):
        x = L.rms_norm(h, base["final_norm"], cfg.rms_norm_eps)
        p = np.sort(np.asarray(jax.nn.softmax((x @ head.T)[0, 0])))
        return p[-1] - p[-2]

    fired = 0
    for thr in (0.002, 0.006):
        r = _gen(calm, base, mp, prompts, thr)
        for b, p in enumerate(prompts):
            assert r.new_ids[b] == ref_slow(cfg, base, p, lambda i, h, thr=thr: margin(h) >= thr)
        fired += sum(r.exits)
    assert fired > 0
    assert _gen(calm, base, mp, prompts, 2.0).new_ids == ar


def test_bad_settings(tiny, fast):
    cfg, _ = tiny
    mc, _ = fast
    with pytest.raises(M2R2Error, match="supports kv=propagate"):
        DynamicDecoder(cfg, StaticExit(cfg), "deferred")
    with pytest.raises(M2R2Error, match="kv must be one of"):
        DynamicDecoder(cfg, M2R2Exit(cfg, mc), "later")
    with pytest.raises(M2R2Error, match="max_pending"):
        DynamicDecoder(cfg, M2R2Exit(cfg, mc), "deferred", max_pending=0)
    with pytest.raises(M2R2Error, match="min_layer"):
        M2R2Exit(cfg, mc, min_layer=9)
    with pytest.raises(M2R2Error, match="check layers"):
        CalmExit(cfg, checks=(0,))


def test_sampling(tiny, fast):
    """Sampling draws from the exit's (or the full model's) distribution with the loop's keys: with a
    threshold that never fires it is AR sampling with the same seed, token for token; with exits it
    still runs."""
    cfg, base = tiny
    mc, m2r2 = fast
    s = SamplingConfig(temperature=0.9, top_p=0.95, seed=5)
    dec = DynamicDecoder(cfg, M2R2Exit(cfg, mc))
    mp = dec.method.prepare(base, m2r2)
    prompts = _prompts(2, seed=9)
    ar = Generator(cfg).generate(base, prompts, GenerateConfig(max_new_tokens=MAX_NEW, sampling=s)).new_ids
    assert dec.generate(base, mp, prompts, 1.5, MAX_NEW, s).new_ids == ar
    r = dec.generate(base, mp, prompts, 0.4, MAX_NEW, s)
    assert sum(r.exits) > 0 and all(len(x) >= 1 for x in r.new_ids)


@pytest.mark.skipif(not K.available(), reason="no C++ compiler: the CPU kernels are not built")
def test_cpu_kernels_follow_xla(tiny, fast):
    """The same exits and tokens through the CPU kernels (packed weights, block attention) as through
    XLA: M2R2 with deferred K/V (its flush block included), CALM with propagated K/V."""
    cfg, base = tiny
    mc, m2r2 = fast
    packed = CPU_KERNELS.prepare(cfg, base)
    prompts = _prompts(3, seed=11)
    for meth_x, meth_k, src, thr, kv in (
        (M2R2Exit(cfg, mc), M2R2Exit(cfg, mc, backend=CPU_KERNELS), m2r2, 0.45, "deferred"),
        (
            CalmExit(cfg, (1, 2)),
            CalmExit(cfg, (1, 2), CPU_KERNELS),
            np.arange(0, cfg.vocab_size, 2),
            0.001,
            "propagate",
        ),
    ):
        x = DynamicDecoder(cfg, meth_x, kv, 2)
        k = DynamicDecoder(cfg, meth_k, kv, 2, CPU_KERNELS)
        rx = _gen(x, base, x.method.prepare(base, src), prompts, thr)
        rk = _gen(k, packed, k.method.prepare(packed, src), prompts, thr)
        assert sum(rx.exits) > 0
        assert rk.new_ids == rx.new_ids and rk.exits == rx.exits


def _meta(run, step):
    return json.loads((run / "checkpoints" / str(step) / "meta" / "metadata").read_text())


def test_trained_exit_heads(tiny, tmp_path):
    """The static peer's exit heads: zero-initialised heads exit exactly as the untrained static exit;
    training (the trained peers' one loop, as train.train_exit_heads runs it) lowers the KL to the full
    model, writes Orbax checkpoints whose meta carries the budget fields, and resumes from them exactly
    after an interruption; the loaded heads drive the static exit through the head (equal to an eager
    reference)."""
    from m2r2_jax.peers.exit_head import ExitHeadConfig, head_logits, init_heads
    from m2r2_jax.training.peers import load_exit_heads, train_early_exit
    from m2r2_jax.training.spec_peers import RunLimits

    cfg, base = tiny
    prompts = _prompts(2, seed=3)
    st = DynamicDecoder(cfg, StaticExit(cfg))
    tr = DynamicDecoder(cfg, StaticExit(cfg, trained=True))
    zero = tr.method.prepare(base, init_heads(cfg, 2, 4), (1, 2))
    for E in (1, 2):
        assert _gen(tr, base, zero, prompts, E).new_ids == _gen(st, base, None, prompts, E).new_ids

    rs = np.random.RandomState(0)
    recs = [
        dict(prompt_ids=rs.randint(3, 256, 6).tolist(), answer_ids=rs.randint(3, 256, 10).tolist()) for _ in range(4)
    ]
    hc = ExitHeadConfig(layers=(1, 2), rank=4, steps=30, batch_size=4, seq_len=16, positions=10, lr=1e-2)
    out = tmp_path / "heads"

    def train(run, **limits):
        return train_early_exit("exit_heads", cfg, base, recs, hc, run, "tiny", "fp", RunLimits(**limits), False)

    s1 = train(out, until=26, budget_minutes=60.0)  # interrupted at 26
    s2 = train(out, budget_minutes=60.0)  # resumes there
    once = train(tmp_path / "once")
    assert s1["steps"] == 26 and s2["steps"] == 30 and s2["stopped"] == "steps" and s2["layers"] == [1, 2]
    for x, y in zip(jax.tree.leaves(s2["heads"]), jax.tree.leaves(once["heads"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # resumed exactly
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 31))
    first, last = logged[0], logged[-1]
    assert last["kl/0"] < 0.7 * first["kl/0"] and last["kl/1"] < 0.7 * first["kl/1"]
    assert s2["final"] == {k: v for k, v in last.items() if k not in ("step", "time")}  # per-head KL
    # the budget fields, written by the loop with every checkpoint (26: the interruption; 30: the end)
    m26, m30 = _meta(out, 26), _meta(out, 30)
    for n, m in ((26, m26), (30, m30)):
        assert m["steps_run"] == m["step"] == n and m["budget_minutes"] == 60.0
        assert m["trainable_params"] == s2["trainable_params"] and m["base_fingerprint"] == "fp"
    assert 0 < m26["train_minutes"] <= m30["train_minutes"]  # summed over the two calls
    assert _meta(tmp_path / "once", 30)["budget_minutes"] is None
    heads, layers = load_exit_heads(out, cfg, "fp")
    assert layers == (1, 2) and s2["trainable_params"] == sum(x.size for x in jax.tree.leaves(heads))
    with pytest.raises(M2R2Error, match="another base"):
        load_exit_heads(out, cfg, "other")

    mp = tr.method.prepare(base, heads, layers)
    r = _gen(tr, base, mp, prompts, 1)
    for b, p in enumerate(prompts):  # eager: one layer, then the trained head
        ids, cache = list(p), None
        S_ = 128
        cache = D.init_cache(cfg, 1, S_)
        lg, cache = D.forward(cfg, base, jnp.asarray([p]), cache, jnp.zeros((1,), jnp.int32))
        out_ids = [int(jnp.argmax(lg[0, -1]))]
        while len(out_ids) < MAX_NEW and out_ids[-1] not in cfg.eos_token_ids:
            tok, pos = out_ids[-1], len(ids) + len(out_ids) - 1
            h = D.embed(cfg, base, jnp.asarray([[tok]]))
            h, cache, _ = D.forward_hidden(
                cfg, base, jnp.asarray([[tok]]), cache, jnp.asarray([pos], jnp.int32), layer_range=(0, 1), h=h
            )
            for j in range(1, cfg.num_layers):
                cache = _set_slot(cache, j, pos, *_kv_at(cfg, base, j, h, pos))
            out_ids.append(int(jnp.argmax(head_logits(cfg, base, heads, h, 0)[0, 0])))
        assert r.new_ids[b] == out_ids


def test_specee(tiny, fast, tmp_path):
    """SpecEE's predictors train on teacher-forced features (candidates from the fast stream), save
    and load; the loop's exits equal an eager reference; a never-firing threshold is AR."""
    from m2r2_jax.peers.specee import SpecEEConfig, candidate_features, head_rows, predict
    from m2r2_jax.training.peers import load_specee, train_specee

    cfg, base = tiny
    mc, m2r2 = fast
    ids = np.arange(cfg.vocab_size, dtype=np.int32)
    rs = np.random.RandomState(1)
    recs = [
        dict(prompt_ids=rs.randint(3, 256, 5).tolist(), answer_ids=rs.randint(3, 256, 9).tolist()) for _ in range(8)
    ]
    sc = SpecEEConfig(layers=(1, 2), k=3, hidden=8, examples=8, seq_len=16, positions=9, batch_size=4, epochs=5)
    summ = train_specee(cfg, mc, base, m2r2, ids, recs, sc, tmp_path / "sp", "fp", budget_minutes=5.0)
    assert summ["positions"] == 8 * 9 and len(summ["heldout_auc"]) == 2
    meta = json.loads((tmp_path / "sp" / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert meta["budget_minutes"] == 5.0 and meta["steps_run"] == summ["steps"] == 5 * 10  # recorded, not enforced
    assert meta["trainable_params"] == summ["trainable_params"] and meta["train_minutes"] > 0
    pred, sc2 = load_specee(tmp_path / "sp", "fp")
    assert sc2 == sc
    for a, b in zip(jax.tree.leaves(pred), jax.tree.leaves(summ["predictors"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    meth = SpecEEExit(cfg, mc, (1, 2), k=3)
    dec = DynamicDecoder(cfg, meth)
    mp = meth.prepare(base, m2r2, ids, pred)
    prompts = _prompts(3, seed=5)
    assert _gen(dec, base, mp, prompts, 1.5).new_ids == _ar(cfg, base, prompts)
    scores = []
    for p in prompts:  # pick a threshold in the middle of the predictors' scores
        h = D.embed(cfg, base, jnp.asarray([[p[-1]]]))
        _, f = candidate_features(cfg, base["final_norm"], head_rows(cfg, base, jnp.asarray([[3, 4, 5]])), h[:, 0])
        scores.append(float(jax.nn.sigmoid(predict(pred, f, 0))[0]))
    thr = float(np.median(scores))

    merged = dict(base, layers=list(base["layers"]))
    for l, j in enumerate(mc.base_layers(cfg.num_layers)):
        merged["layers"][j] = mp["layers"][l]
    zero = init_m2r2(cfg, mc, jax.random.key(0))
    r = _gen(dec, base, mp, prompts, thr)
    for b, p in enumerate(prompts):
        S_ = 128
        cache = D.init_cache(cfg, 1, S_)
        lg, cache = D.forward(cfg, base, jnp.asarray([p]), cache, jnp.zeros((1,), jnp.int32))
        out = [int(jnp.argmax(lg[0, -1]))]
        while len(out) < MAX_NEW and out[-1] not in cfg.eos_token_ids:
            tok, pos = out[-1], len(p) + len(out) - 1
            h0 = D.embed(cfg, base, jnp.asarray([[tok]]))
            hf = S.fast_stream(
                cfg,
                mc,
                merged,
                zero,
                h0,
                cache,
                (jnp.arange(S_) < pos)[None, None],
                jnp.ones((1, 1, 1), bool),
                jnp.asarray([[pos]], jnp.int32),
            )[-1]
            cands = jnp.asarray(ids)[jax.lax.top_k(S.draft_logits(cfg, base, hf, jnp.asarray(ids))[0, 0], 3)[1]][None]
            rows = head_rows(cfg, base, cands)
            h, nxt = h0, None
            for i in range(cfg.num_layers):
                h, cache, _ = D.forward_hidden(
                    cfg, base, jnp.asarray([[tok]]), cache, jnp.asarray([pos], jnp.int32), layer_range=(i, i + 1), h=h
                )
                if i + 1 in (1, 2) and i + 1 < cfg.num_layers:
                    z, f = candidate_features(cfg, base["final_norm"], rows, h[:, 0])
                    if float(jax.nn.sigmoid(predict(pred, f, (1, 2).index(i + 1)))[0]) >= thr:
                        nxt = int(cands[0, int(jnp.argmax(z[0]))])
                        for j in range(i + 1, cfg.num_layers):
                            cache = _set_slot(cache, j, pos, *_kv_at(cfg, base, j, h, pos))
                        break
            out.append(nxt if nxt is not None else int(jnp.argmax(D.logits_from_hidden(cfg, base, h)[0, 0])))
        assert r.new_ids[b] == out, b
    assert sum(r.exits) > 0


def test_layerskip(tiny, tmp_path):
    """LayerSkip-style adapters (the trained peers' one loop, as train.train_layerskip runs it): the
    early-exit KL falls, training resumes exactly after an interruption and equals an uninterrupted run,
    the static exit on the merged adapted weights equals the eager reference on them; zero adapters are
    the base itself."""
    from m2r2_jax.peers.layerskip import LayerSkipConfig, init_adapters, merged_base
    from m2r2_jax.training.peers import load_layerskip, train_early_exit
    from m2r2_jax.training.spec_peers import RunLimits

    cfg, base = tiny
    lc = LayerSkipConfig(layers=(1, 2), rank=4, steps=16, batch_size=4, seq_len=16, positions=10, lr=1e-2)
    same = merged_base(base, init_adapters(cfg, lc))
    for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rs = np.random.RandomState(2)
    recs = [
        dict(prompt_ids=rs.randint(3, 256, 6).tolist(), answer_ids=rs.randint(3, 256, 10).tolist()) for _ in range(4)
    ]

    def train(run, until=None):
        return train_early_exit("layerskip", cfg, base, recs, lc, run, "tiny", "fp", RunLimits(until=until), False)

    assert train(tmp_path / "ls", until=9)["steps"] == 9
    s = train(tmp_path / "ls")
    once = train(tmp_path / "once")
    assert s["steps"] == once["steps"] == 16
    for x, y in zip(jax.tree.leaves(s["adapters"]), jax.tree.leaves(once["adapters"])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    logged = [json.loads(x) for x in (tmp_path / "once" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["kl_exit/0"] < 0.8 * logged[0]["kl_exit/0"]
    resumed = [json.loads(x) for x in (tmp_path / "ls" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(1, 17))
    assert [r["kl_exit/1"] for r in resumed] == [r["kl_exit/1"] for r in logged]
    with pytest.raises(M2R2Error, match="another config"):  # a resumed run keeps its config
        train_early_exit("layerskip", cfg, base, recs, dataclasses.replace(lc, rank=2), tmp_path / "ls", "tiny", "fp")
    with pytest.raises(M2R2Error, match=r"exit layers must be in \[1, "):
        bad = dataclasses.replace(lc, layers=(1, cfg.num_layers))
        train_early_exit("layerskip", cfg, base, recs, bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    ads, lc2 = load_layerskip(tmp_path / "ls", cfg, "fp")
    assert lc2 == lc
    mb = merged_base(base, ads)
    dec = DynamicDecoder(cfg, StaticExit(cfg))
    prompts = _prompts(2, seed=4)
    r = _gen(dec, mb, None, prompts, 1)
    for b, p in enumerate(prompts):
        assert r.new_ids[b] == ref_slow(cfg, mb, p, lambda i, h: i >= 1)


def ref_skipdecode(cfg, base, prompt, d_min, span):
    """Plain Python: the token decided at step i enters at layer N - depth(i) from its embedding and runs
    to the top (writing only those layers' K/V); the prompt runs the full depth."""
    from m2r2_jax.peers.skipdecode import depth_at

    N, S_ = cfg.num_layers, 128
    cache = D.init_cache(cfg, 1, S_)
    lg, cache = D.forward(cfg, base, jnp.asarray([prompt]), cache, jnp.zeros((1,), jnp.int32))
    out = [int(jnp.argmax(lg[0, -1]))]
    while len(out) < MAX_NEW and out[-1] not in cfg.eos_token_ids:
        tok, pos, i = out[-1], len(prompt) + len(out) - 1, len(out)
        entry = N - int(depth_at(N, d_min, span, jnp.int32(i)))
        h = D.embed(cfg, base, jnp.asarray([[tok]]))
        h, cache, _ = D.forward_hidden(
            cfg, base, jnp.asarray([[tok]]), cache, jnp.asarray([pos], jnp.int32), layer_range=(entry, N), h=h
        )
        out.append(int(jnp.argmax(D.logits_from_hidden(cfg, base, h)[0, 0])))
    return out


def test_skipdecode(tiny, tmp_path):
    """SkipDecode: the schedule falls monotonically from N to d_min; the jitted loop equals the eager
    reference (batch = rows); the training forward reproduces the decoded tokens teacher-forced (the
    train-time and decode-time skips are the same computation); the adapters train and load."""
    from m2r2_jax.decoding.early_exit import SkipDecodeExit
    from m2r2_jax.peers.layerskip import merged_base
    from m2r2_jax.peers.skipdecode import SkipDecodeConfig, depth_at, entry_layers, skip_forward
    from m2r2_jax.training.peers import load_skipdecode, train_early_exit

    cfg, base = tiny
    N, span = cfg.num_layers, 4
    depths = [int(depth_at(N, 1, span, jnp.int32(i))) for i in range(1, 12)]
    assert depths[0] == N and depths[-1] == 1 and all(a >= b for a, b in zip(depths, depths[1:]))
    dec = DynamicDecoder(cfg, SkipDecodeExit(cfg, span))
    prompts = _prompts(3, seed=7)
    r = _gen(dec, base, None, prompts, 1)
    for b, p in enumerate(prompts):
        assert r.new_ids[b] == ref_skipdecode(cfg, base, p, 1, span)
    assert r.layers[0] < r.tokens[0] * N  # layers were skipped
    # teacher-forced: the training forward's argmax at the answer positions = the decoded tokens
    p, ans = prompts[0], r.new_ids[0]
    toks = jnp.asarray([p + ans[:-1]], jnp.int32)
    mask = jnp.asarray([[0] * len(p) + [1] * (len(ans) - 1)], jnp.float32)
    entry = entry_layers(cfg, mask, jnp.asarray([1]), span)
    h = skip_forward(cfg, base, toks, entry)
    pred = np.asarray(jnp.argmax(D.logits_from_hidden(cfg, base, h)[0], -1))
    assert pred[len(p) - 1 :].tolist() == ans
    # training: the KL falls; the checkpoint loads; decoding runs on the merged weights
    sc = SkipDecodeConfig(
        min_layers=(1, 2), span=span, rank=4, steps=12, batch_size=4, seq_len=16, positions=10, lr=1e-2
    )
    rs = np.random.RandomState(2)
    recs = [
        dict(prompt_ids=rs.randint(3, 256, 6).tolist(), answer_ids=rs.randint(3, 256, 10).tolist()) for _ in range(4)
    ]
    s = train_early_exit("skipdecode", cfg, base, recs, sc, tmp_path / "sd", "tiny", "fp", progress=False)
    logged = [json.loads(x) for x in (tmp_path / "sd" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["kl"] < 0.8 * logged[0]["kl"] and s["final"]["kl"] == logged[-1]["kl"]
    assert s["layers"] == [1, 2] and s["steps"] == 12
    ads, sc2 = load_skipdecode(tmp_path / "sd", cfg, "fp")
    assert sc2 == sc
    with pytest.raises(M2R2Error, match="another base model"):
        load_skipdecode(tmp_path / "sd", cfg, "other")
    mb = merged_base(base, ads)
    assert _gen(dec, mb, None, prompts[:1], 2).new_ids[0] == ref_skipdecode(cfg, mb, prompts[0], 2, span)


def test_claim_check():
    """The paper's claim on a result: M2R2's upper envelope against each peer point; a peer faster than
    any M2R2 point counts against M2R2."""
    from m2r2_jax.evaluation.dynamic_eval import claim_check, envelope

    def pts(*xs):
        return [dict(threshold=i, speedup=s, rouge_l=r) for i, (s, r) in enumerate(xs)]

    res = dict(
        methods=dict(
            m2r2=pts((0.9, 0.95), (1.2, 0.80)),
            m2r2_deferred=pts((1.0, 0.97)),
            static=pts((1.1, 0.5), (1.15, 0.7)),
            calm=pts((1.0, 0.99)),
            skipdecode=pts((1.3, 0.4)),
        )
    )
    assert envelope(res["methods"]["m2r2"], 1.0) == 0.80 and envelope(res["methods"]["m2r2"], 1.5) is None
    c = claim_check(res)
    assert c["peers"]["static"]["beaten"] and c["peers"]["static"]["m2r2_higher"] == 2
    assert not c["peers"]["calm"]["beaten"]  # 0.97 at 1.0x vs CALM's 0.99
    assert not c["peers"]["skipdecode"]["beaten"]  # faster than any M2R2 point
    assert c["peers"]["skipdecode"]["points"][0]["m2r2_rouge_l"] is None
    assert not c["all_beaten"]
    with pytest.raises(M2R2Error, match="none of the M2R2 methods"):
        claim_check(dict(methods=dict(static=pts((1.0, 0.5)))))


def test_claim_merges_results_of_one_dataset(tmp_path, capsys):
    """eval.dynamic_claim merges the results of one dataset (M2R2 and the training-free peers in one run,
    the trained peers in a later one): the claim is checked on the union, each method says where it
    came from, a method in two files or a different prompt set is refused, and the merged curves are
    plotted per dataset."""
    from eval.dynamic_claim import main
    from m2r2_jax.evaluation.dynamic_eval import merge_results

    def res(methods, **cfg):
        c = dict(model="m", dataset="koala", limit=48, max_new_tokens=64, checkpoint="ck", train_step=300)
        c.update(cfg)
        pts = {k: [dict(threshold=0.5, speedup=s, rouge_l=r)] for k, (s, r) in methods.items()}
        return dict(methods=pts, prompts=48, config=c, ar=dict(tokens_per_second=20.0), machine=dict(date="d"))

    a = res(dict(m2r2=(1.3, 0.9), static=(1.2, 0.5)))
    b = res(dict(layerskip=(1.25, 0.95)), checkpoint="other")
    m = merge_results([("a.json", a), ("b.json", b)])
    assert list(m["methods"]) == ["m2r2", "static", "layerskip"]
    assert m["sources"]["layerskip"]["file"] == "b.json" and m["sources"]["m2r2"]["train_step"] == 300
    with pytest.raises(M2R2Error, match="method 'static' is in both a.json and c.json"):
        merge_results([("a.json", a), ("c.json", res(dict(static=(1.0, 0.4))))])
    with pytest.raises(M2R2Error, match="limit=16"):
        merge_results([("a.json", a), ("d.json", res(dict(calm=(1.0, 0.4)), limit=16))])

    for name, r in (("a", a), ("b", b), ("w", res(dict(m2r2=(1.3, 0.9)), dataset="wizardlm"))):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    (tmp_path / "plots").mkdir()
    files = [str(tmp_path / f"{n}.json") for n in "abw"]
    assert main([*files, "--json", str(tmp_path / "v.json"), "--plot-dir", str(tmp_path / "plots")]) == 0
    v = json.loads((tmp_path / "v.json").read_text())
    assert set(v["datasets"]) == {"koala", "wizardlm"}
    koala = v["datasets"]["koala"]
    assert koala["peers"]["static"]["beaten"] and not koala["peers"]["layerskip"]["beaten"]
    assert (tmp_path / "plots" / "koala.png").stat().st_size > 1000
    assert "| koala | layerskip | 0/1 | no |" in capsys.readouterr().out
