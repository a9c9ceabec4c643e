"""Drafting that spends its draft cost only where it pays (decoding/drafters.py `M2R2Drafter`): the
confidence stop (`stop`: later depths' fast-stream passes skipped once no row is confident) and bf16
draft weights (`draft_dtype`). Greedy output == AR token for token (batched) with each, sampling exact
against the target's softmax, the stop really runs fewer passes (the loop's count), and a draft with
the stop equals today's draft up to the depth where it stopped (token 0 after)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_spec_peers import assert_sampling_exact

from m2r2_jax.decoding.drafters import DraftOptions
from m2r2_jax.decoding.generate import GenerateConfig, Generator, prefill
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
from m2r2_jax.decoding.trees import build_tree
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2
from m2r2_jax.model import decoder as D

MAX_NEW = 20
SC = SpecConfig(max_new_tokens=MAX_NEW, stop_ids=(-1,))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """The tiny model with a peaked final norm (confidences spread over ~0.3-1) and a fast stream of
    2 base layers with small random adapters: it agrees with the base often, not always."""
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    base = jax.tree.map(jnp.asarray, params)
    base = dict(base, final_norm=base["final_norm"] * 40.0)
    mc = M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8).validate(cfg.num_layers)
    m = init_m2r2(cfg, mc, jax.random.key(3))
    m = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.03 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if getattr(p[-1], "key", "") == "b"
            else x
        ),
        m,
    )
    return cfg, base, mc, m


def _prompts():
    rs = np.random.RandomState(4)
    return [rs.randint(3, 256, rs.randint(3, 16)).tolist() for _ in range(4)]


def _spec(tiny, tree, **kw):
    cfg, base, mc, m = tiny
    spec = SpeculativeDecoder(cfg, DraftOptions(tree=tree, lookup=0, **kw).drafter(cfg, mc))
    return spec, spec.prepare(base, m, np.arange(cfg.vocab_size, dtype=np.int32))


TREE = build_tree([(0,), (1,), (0, 0), (0, 1), (1, 0)])  # two depths, siblings at both


def test_greedy_lossless_with_both_options(tiny):
    """Batch 4, a chain of 3 drafted with the stop and bf16 draft weights (one compile for both: the
    test file stays small; the stop-off path is checked against today's draft below): lossless, and the
    stop skipped some of the later passes, never the first."""
    cfg, base, _, _ = tiny
    ar = Generator(cfg).generate(base, _prompts(), GenerateConfig(max_new_tokens=MAX_NEW, stop_ids=(-1,))).new_ids
    spec, dp = _spec(tiny, "chain3", draft_stop=0.8, draft_dtype="bfloat16")
    mats = [x for x in jax.tree.leaves(dp["dp"]) if x.ndim == 2]
    assert mats and all(x.dtype == jnp.bfloat16 for x in mats)  # merged layers + draft head, cast once
    assert dp["dp"]["final_norm"].dtype == jnp.float32
    r = spec.generate(base, dp, _prompts(), SC)
    assert r.new_ids == ar and sum(r.accepted) > 0
    assert spec.drafter.max_passes == 3
    assert all(s <= p for s, p in zip(r.steps, r.draft_passes))
    assert sum(r.steps) < sum(r.draft_passes) < 3 * sum(r.steps), (r.steps, r.draft_passes)


def test_stop_drafts_todays_tokens_up_to_where_it_stopped(tiny):
    """One draft of a two-depth tree from a prefilled cache, in one jit: a stop every row passes (1e-9)
    drafts today's tokens in today's passes; a stop no row passes (0.9999999) runs one pass and leaves
    depth 2 at token 0."""
    cfg, base, _, _ = tiny
    prompts = jnp.asarray([[5, 6, 7, 8, 9], [40, 41, 42, 43, 44]])
    lens = jnp.asarray([5, 5], jnp.int32)
    stops = (0.0, 1e-9, 0.9999999)
    specs = [_spec(tiny, TREE, draft_stop=x) for x in stops]

    @jax.jit
    def drafts(b, dps, t):
        logits, cache = prefill(cfg, b, t, lens, D.init_cache(cfg, 2, 64))
        cur = jnp.argmax(logits, -1).astype(jnp.int32)
        return [sp.drafter.draft(q, b, cache, lens, cur) for (sp, _), q in zip(specs, dps)]

    (today, n0), (same, n1), (shallow, n2) = drafts(base, [q for _, q in specs], prompts)
    assert int(n0) == 2 and np.any(np.asarray(today)[:, 3:] != 0)  # depth 2 drafted today
    assert np.array_equal(same, today) and int(n1) == 2
    assert int(n2) == 1
    assert np.array_equal(shallow[:, :3], today[:, :3]) and not np.any(np.asarray(shallow)[:, 3:])


def test_sampling_exact_with_stop_and_bf16(tiny):
    """Temperature 1 (as test_spec_peers): 384 rows of one prompt, the next-token counts along the mode
    path against the target's softmax (chi-square, p > 1e-3), refused against a reference tempered by
    0.75; a tree with siblings, the stop and bf16 draft weights together. (The stop waits for all 384
    rows, so at a high stop it bites: the un-drafted depth-2 slots, token 0, go through rejection
    sampling as siblings of one another.)"""
    cfg, base, _, _ = tiny
    prompt, B, n = [11, 12, 13, 14], 384, 8
    S = len(prompt) + n
    forward = jax.jit(lambda b, t: D.forward(cfg, b, t, D.init_cache(cfg, 1, 64), jnp.zeros((1,), jnp.int32))[0])

    def logits_after(seq):
        return np.asarray(forward(base, jnp.asarray([seq + [0] * (S - len(seq))])), np.float64)[0, : len(seq)]

    spec, dp = _spec(tiny, TREE, draft_stop=0.9999999, draft_dtype="bfloat16")
    sc = SpecConfig(max_new_tokens=n, stop_ids=(-1,), sampling=SamplingConfig(temperature=1.0, seed=7))
    r = spec.generate(base, dp, [prompt] * B, sc)
    out = np.asarray(r.new_ids)
    assert out.shape == (B, n) and sum(r.accepted) > B // 4
    assert sum(r.draft_passes) < 2 * sum(r.steps), (sum(r.draft_passes), sum(r.steps))  # the stop skipped passes

    assert_sampling_exact(out, prompt, logits_after)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(draft_stop=1.0), "draft stop must be a probability in [0, 1)"),
        (dict(draft_stop=-0.1), "draft stop must be a probability in [0, 1)"),
        (dict(draft_stop=True), "draft stop must be a probability in [0, 1)"),
        (dict(draft_dtype="float16"), "draft dtype must be one of float32, bfloat16"),
    ],
)
def test_bad_options_refused(kw, msg):
    with pytest.raises(M2R2Error, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        DraftOptions(**kw)


def test_cli_flags_refused_before_loading(capsys):
    from eval.speculative import main
    from m2r2_jax.cli import run_main

    for argv, msg in [
        (["--draft-stop", "1.5"], "draft stop must be a probability"),
        (["--draft-dtype", "int8"], "draft dtype must be one of"),
        (["--drafter", "pld", "--draft-stop", "0.5"], "--draft-stop applies to --drafter m2r2"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_main(main, ["--model", "/nonexistent.gguf", *argv])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
