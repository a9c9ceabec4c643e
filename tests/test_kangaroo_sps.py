"""The trained speculative peers as drafters in the shared loop: Kangaroo (shallow layers + adapter, its
own adapter K/V as drafter state) and 2-model speculative decoding (a small model with its own cache).
Training lowers the loss and round-trips through Orbax; a checkpoint of another base is refused in one
line; the drafts equal the draft model's greedy continuation computed from scratch after accepted steps
(the shadow caches' catch-up and rollback); greedy output == AR (batch 4); sampling exact at T=1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.decoding.peer_drafters import draft_options
from m2r2_jax.decoding.peer_drafters.kangaroo import Kangaroo
from m2r2_jax.decoding.peer_drafters.sps import Sps
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
from m2r2_jax.decoding.state import DraftView, StepResult
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D
from m2r2_jax.peers import kangaroo as KG
from m2r2_jax.peers import sps as SP
from m2r2_jax.training.spec_peers import RunLimits, train_kangaroo, train_sps
from tests import test_spec_peers as _peers

tiny, ar = _peers.tiny, _peers.ar  # its fixtures: the tiny model and its AR output on `_prompts()`
SC, _prompts, assert_sampling_exact = _peers.SC, _peers._prompts, _peers.assert_sampling_exact

TRAIN = dict(steps=8, batch_size=4, seq_len=32, positions=16, lr=3e-3)


def _records():
    rs = np.random.RandomState(1)
    return [
        {"prompt_ids": rs.randint(3, 256, 6).tolist(), "answer_ids": rs.randint(3, 64, 24).tolist()} for _ in range(16)
    ]


def _fixed_batch():
    from m2r2_jax.data.batches import pack_examples

    tokens, mask = pack_examples(_records()[:8], TRAIN["seq_len"])
    return jnp.asarray(tokens), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _loss(cfg, base, kind, params):
    """KL(full || draft) on a fixed batch (Kangaroo trains on the soft cross-entropy: the same up to the
    full model's entropy, which dominates on a near-uniform tiny random model)."""
    from m2r2_jax.m2r2 import stream as S

    tokens, mask = _fixed_batch()
    sel, m = S.loss_positions(mask, TRAIN["positions"])
    if kind == "kangaroo":
        draft, full = KG.teacher_forced(cfg, KG.KangarooConfig(exit_layer=1), base, params, tokens, sel)
        return KG.soft_ce(full, draft, m)[1]
    full = SP.draft_logits(cfg, base, tokens, sel)
    draft = SP.draft_logits(SP.draft_config(cfg, 2), SP.draft_model(cfg, base, params), tokens, sel)
    return KG.soft_ce(full, draft, m)[1]


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Both draft models trained a few steps on the tiny model; -> {kind: (out dir, params, summary)}."""
    cfg, base = tiny
    out = {}
    d = tmp_path_factory.mktemp("kangaroo")
    s = train_kangaroo(cfg, base, _records(), KG.KangarooConfig(exit_layer=1, **TRAIN), d, "tiny", progress=False)
    out["kangaroo"] = (d, s.pop("adapter"), s)
    d = tmp_path_factory.mktemp("sps")
    s = train_sps(cfg, base, _records(), SP.SPSConfig(num_layers=2, **TRAIN), d, "tiny", progress=False)
    out["sps"] = (d, s.pop("draft"), s)
    return out


@pytest.mark.parametrize("kind", ["kangaroo", "sps"])
def test_training_lowers_loss_and_round_trips(tiny, trained, kind):
    cfg, base = tiny
    d, params, summary = trained[kind]
    init = KG.init_adapter(cfg, base, KG.KangarooConfig(exit_layer=1)) if kind == "kangaroo" else None
    if kind == "sps":
        init = SP.init_draft(cfg, base, SP.SPSConfig(num_layers=2))
        assert SP.SPSConfig(num_layers=2).source_layers(cfg) == (0, 2)  # evenly spaced, first and last
    before, after = float(_loss(cfg, base, kind, init)), float(_loss(cfg, base, kind, params))
    assert after < 0.9 * before, (before, after)
    assert summary["steps"] == TRAIN["steps"] and summary["trainable_params"] == sum(
        x.size for x in jax.tree.leaves(init)
    )
    load = KG.load_kangaroo if kind == "kangaroo" else SP.load_sps
    got, c, meta = load(d, cfg, base)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)))
    assert meta["step"] == TRAIN["steps"] and meta["trainable_params"] == summary["trainable_params"]
    assert meta["train_minutes"] > 0 and (d / "metrics.jsonl").read_text().count("\n") == TRAIN["steps"]
    opts = draft_options(kind, **{f"{kind}_checkpoint": str(d)})
    assert opts.budget() == dict(trainable_params=summary["trainable_params"], train_minutes=meta["train_minutes"])


def test_training_resumes_exactly(tiny, trained, tmp_path):
    """Interrupted after 3 steps, the same call carries on to the same params; a budget stops and saves."""
    cfg, base = tiny
    kc = KG.KangarooConfig(exit_layer=1, **TRAIN)
    train_kangaroo(cfg, base, _records(), kc, tmp_path, "tiny", limits=RunLimits(until=3), progress=False)
    s = train_kangaroo(cfg, base, _records(), kc, tmp_path, "tiny", progress=False)
    ref = trained["kangaroo"][1]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(jax.tree.leaves(s["adapter"]), jax.tree.leaves(ref)))
    with pytest.raises(M2R2Error, match="another config"):
        train_kangaroo(cfg, base, _records(), KG.KangarooConfig(exit_layer=2, **TRAIN), tmp_path, progress=False)
    b = train_kangaroo(
        cfg, base, _records(), kc, tmp_path / "b", limits=RunLimits(budget_minutes=1e-9), progress=False
    )  # the budget is spent before the first step: one step still runs, so a checkpoint exists to load
    assert b["stopped"] == "budget" and b["steps"] == 1
    KG.load_kangaroo(tmp_path / "b", cfg, base)


def test_foreign_checkpoints_refused(tiny, trained, tmp_path, capsys):
    """Another base's weights, the other peer's checkpoint, a missing one: one line each, nothing written."""
    cfg, base = tiny
    other = dict(base, embed=base["embed"] * 1.5)
    for kind in ("kangaroo", "sps"):
        d = trained[kind][0]
        load = KG.load_kangaroo if kind == "kangaroo" else SP.load_sps
        with pytest.raises(M2R2Error, match="trained on another base model") as e:
            load(d, cfg, other)
        assert "\n" not in str(e.value)
        opts = draft_options(kind, **{f"{kind}_checkpoint": str(d)})
        spec = SpeculativeDecoder(cfg, opts.drafter(cfg))
        with pytest.raises(M2R2Error, match="trained on another base model"):
            opts.prepare(spec, other)
    with pytest.raises(M2R2Error, match="not a kangaroo checkpoint"):
        draft_options("kangaroo", kangaroo_checkpoint=str(trained["sps"][0]))
    for knobs, msg in (
        (dict(), "a trained checkpoint is required"),
        (dict(kangaroo_checkpoint=str(tmp_path / "none")), "checkpoint not found"),
        (dict(kangaroo_checkpoint=str(trained["kangaroo"][0]), kangaroo_threshold=1.0), "threshold"),
        (dict(kangaroo_checkpoint=str(trained["kangaroo"][0]), kangaroo_max_draft=0), "max draft length"),
        (dict(kangaroo_checkpoint=str(trained["kangaroo"][0]), sps_gamma=3), "applies to --drafter sps"),
    ):
        with pytest.raises(M2R2Error, match=msg):
            draft_options("kangaroo", **knobs)
    from eval.speculative import main
    from m2r2_jax.cli import run_main

    for argv, msg in (
        (["--drafter", "sps"], "a trained checkpoint is required"),
        (["--drafter", "kangaroo", "--kangaroo-checkpoint", str(trained["sps"][0])], "not a kangaroo checkpoint"),
    ):
        with pytest.raises(SystemExit) as e:
            run_main(main, argv + ["--out", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and msg in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- drafts vs a from-scratch reference


def _reference_chain(cfg, kind, n):
    """-> chain(base, params, seq): the draft model's greedy continuation of `seq` (n tokens), each token
    from a whole-sequence forward (padded to 32 slots: causal, so the padding is never seen)."""
    L = 32

    @jax.jit
    def next_token(base, params, toks, last):
        sel = last[None, None]
        if kind == "kangaroo":
            lg = KG.teacher_forced(cfg, KG.KangarooConfig(exit_layer=1), base, params, toks[None], sel)[0]
        else:
            lg = SP.draft_logits(SP.draft_config(cfg, 2), SP.draft_model(cfg, base, params), toks[None], sel)
        return jnp.argmax(lg[0, 0])

    def chain(base, params, seq):
        seq = list(seq)
        for _ in range(n):
            toks = jnp.asarray(seq + [0] * (L - len(seq)), jnp.int32)
            seq.append(int(next_token(base, params, toks, jnp.int32(len(seq) - 1))))
        return seq[-n:]

    return chain


@pytest.mark.parametrize("kind", ["kangaroo", "sps"])
def test_drafts_match_reference(tiny, trained, kind):
    """Drive the drafter by hand through prefill and two accepted steps (one accepting 2 drafts, one 0) of
    two rows of different lengths: every chain equals the draft model's greedy continuation of the text
    so far computed from scratch, so the carried state (the adapter's K/V / the small model's cache) is
    exactly what the text implies after each catch-up."""
    cfg, base = tiny
    params = trained[kind][1]
    K = 3
    dr = Kangaroo(cfg, 1, K, 0.0) if kind == "kangaroo" else Sps(cfg, 2, K, 0.0)
    dp = dr.prepare(base, params)
    prompts = [[5, 17, 33, 8, 91, 4, 60], [7, 7, 120, 3]]
    B, H, S = 2, 40, 64
    lens = jnp.asarray([len(p) for p in prompts])
    toks = np.zeros((B, 8), np.int32)
    for b, p in enumerate(prompts):
        toks[b, : len(p)] = p
    cache = D.init_cache(cfg, B, S)
    logits, cache = D.forward(cfg, base, jnp.asarray(toks), cache, jnp.zeros((B,), jnp.int32))
    texts = [list(p) for p in prompts]
    cur = [int(np.argmax(np.asarray(logits)[b, len(p) - 1])) for b, p in enumerate(prompts)]
    pos = lens
    dstate = prop = view = None
    propose, update = jax.jit(dr.propose), jax.jit(dr.update_state)
    extend = jax.jit(lambda b, t, c, p: D.forward(cfg, b, t, c, p)[1])
    reference = _reference_chain(cfg, kind, K)
    for accept in (None, 2, 0):
        if accept is not None:  # accept `accept` drafts of the last chain, then a bonus token
            acc = [[int(x) for x in np.asarray(prop.tokens)[b, 1 : accept + 1]] for b in range(B)]
            bonus = [(11 * (b + 1) + accept) % 256 for b in range(B)]
            block = np.zeros((B, K + 1), np.int32)  # the verified tokens, padded (past the new pos: masked)
            for b in range(B):
                block[b, : accept + 1] = [cur[b]] + acc[b]
            cache = extend(base, jnp.asarray(block), cache, pos)  # the verified tokens' base K/V
            a = jnp.full((B,), accept, jnp.int32)
            dstate = update(dp, dstate, view, prop, StepResult(None, a, None, None, None))
            for b in range(B):
                texts[b] += [cur[b]] + acc[b]
            pos, cur = pos + accept + 1, bonus
        text = np.zeros((B, H), np.int32)
        for b in range(B):
            text[b, : len(texts[b]) + 1] = texts[b] + [cur[b]]
        view = DraftView(cache, pos, jnp.asarray(cur), jnp.asarray(text), pos + 1, jnp.ones((B,), bool), dstate)
        if dstate is None:
            dstate = jax.jit(dr.init_state)(dp, base, view)
            view = view.replace(dstate=dstate)
        prop = propose(dp, base, view)
        for b in range(B):
            want = reference(base, params, texts[b] + [cur[b]])
            assert np.asarray(prop.tokens)[b].tolist() == [cur[b]] + want, (accept, b)


# ----------------------------------------------------------------------------- in the loop


@pytest.mark.parametrize("spec", ["kangaroo", "sps+lookup"])
def test_greedy_lossless(tiny, trained, ar, spec):
    """Through the options (checkpoint, base check, drafter): batch 4, greedy == AR, drafts used."""
    from m2r2_jax.evaluation.compare import spec_options

    cfg, base = tiny
    kind = spec.partition("+")[0]
    knobs = {f"{kind}_checkpoint": str(trained[kind][0]), f"{kind}_threshold": 0.3}
    opts = spec_options(spec, dict(knobs, kangaroo_max_draft=3, sps_gamma=3))
    spec_ = SpeculativeDecoder(cfg, opts.drafter(cfg))
    r = spec_.generate(base, opts.prepare(spec_, base), _prompts(), SC)
    assert r.new_ids == ar
    assert sum(r.accepted) > 0 and sum(r.kinds[kind]["steps"]) > 0
    if spec.endswith("+lookup"):
        assert sum(r.kinds["lookup"]["steps"]) > 0  # both kinds of step ran
        # eval.speculative's cost breakdown times the drafting part's own step (from its state after prefill)
        cost = spec_.cost_breakdown(base, opts.prepare(spec_, base), cache_len=64, fill=16, repeats=1)
        assert cost["draft_ms"] > 0 and cost["verify_ms"] > 0


@pytest.mark.parametrize("kind", ["kangaroo", "sps"])
def test_sampling_exact(tiny, kind):
    """Temperature 1 on a peaked tiny model (as test_spec_peers): 384 rows of one prompt; the next-token
    counts along the mode path against the target's softmax (chi-square, p > 1e-3), and refused against a
    reference tempered by 0.75. The draft models are built from the peaked base untrained (the SpS model is
    the base's own 3 layers, so most drafts are accepted)."""
    cfg, base = tiny
    base = dict(base, final_norm=base["final_norm"] * 40.0)
    prompt, B, n = [11, 12, 13, 14], 384, 8
    S = len(prompt) + n
    forward = jax.jit(lambda b, t: D.forward(cfg, b, t, D.init_cache(cfg, 1, 64), jnp.zeros((1,), jnp.int32))[0])

    def logits_after(seq):
        return np.asarray(forward(base, jnp.asarray([seq + [0] * (S - len(seq))])), np.float64)[0, : len(seq)]

    if kind == "kangaroo":
        dr, params = Kangaroo(cfg, 2, 2, 0.0), KG.init_adapter(cfg, base, KG.KangarooConfig(exit_layer=2))
    else:
        dr, params = Sps(cfg, 3, 2, 0.0), SP.init_draft(cfg, base, SP.SPSConfig(num_layers=3))
    spec = SpeculativeDecoder(cfg, dr)
    sc = SpecConfig(max_new_tokens=n, stop_ids=(-1,), sampling=SamplingConfig(temperature=1.0, seed=7))
    r = spec.generate(base, spec.prepare(base, params), [prompt] * B, sc)
    out = np.asarray(r.new_ids)
    assert out.shape == (B, n) and sum(r.accepted) > B // 4

    assert_sampling_exact(out, prompt, logits_after)
