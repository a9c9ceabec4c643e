"""Medusa-1, EAGLE and EAGLE-2 as trained drafters in the shared loop (decoding/peer_drafters/medusa.py,
eagle.py), on a tiny random model: training lowers the loss; greedy output == AR token for token
(batch 4, alone and with prompt lookup); sampling at temperature 1 exact against the target's softmax
(chi-square); the checkpoint restored as trained; a checkpoint trained on another base refused in one
line; EAGLE-2's per-row tree tables against a plain-Python oracle; bad knobs refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_spec_peers import _chi2_along_mode_path, _prompts

from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.decoding.peer_drafters import draft_options
from m2r2_jax.decoding.peer_drafters.eagle import envelope_tree, layout_from_parents
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.model import decoder as D
from m2r2_jax.peers.eagle import EagleConfig
from m2r2_jax.peers.medusa import MedusaConfig
from m2r2_jax.training.medusa_eagle import train_eagle, train_medusa

MAX_NEW = 16
STEPS = 30
SC = SpecConfig(max_new_tokens=MAX_NEW, stop_ids=(-1,))
CHI_PROMPT = [11, 12, 13, 14]
# small trees, 3 deep (each program compiles in the test; the defaults' shapes: the knob test)
SMALL_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
KNOBS = {
    "medusa": lambda d: dict(medusa_checkpoint=d["medusa"], medusa_tree=d["tree"]),
    "eagle": lambda d: dict(eagle_checkpoint=d["eagle"], eagle_tree=d["tree"]),
    "eagle2": lambda d: dict(eagle_checkpoint=d["eagle"], eagle2_topk=2, eagle2_depth=3, eagle2_nodes=6),
}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    """The tiny model made peaked (few likely tokens), so that sampled drafts get accepted too."""
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    base = jax.tree.map(jnp.asarray, params)
    return cfg, dict(base, final_norm=base["final_norm"] * 40.0), base


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Both peers trained on the model's own greedy answers (a self-distillation cache's content)."""
    cfg, base, _ = tiny
    rs = np.random.RandomState(0)
    prompts = [CHI_PROMPT] + _prompts() + [rs.randint(3, 256, rs.randint(4, 12)).tolist() for _ in range(27)]
    answers = Generator(cfg).generate(base, prompts, GenerateConfig(max_new_tokens=24, stop_ids=(-1,))).new_ids
    records = [dict(prompt_ids=p, answer_ids=a) for p, a in zip(prompts, answers)]
    ar = [a[:MAX_NEW] for a in answers[1:5]]  # plain greedy on _prompts() (greedy: a prefix of the longer answer)
    d = tmp_path_factory.mktemp("peers")
    (d / "small.json").write_text(json.dumps({"paths": SMALL_TREE}))
    common = dict(steps=STEPS, batch_size=8, seq_len=40, positions=24, lr=3e-3)
    med = train_medusa(cfg, base, records, MedusaConfig(heads=3, **common), d / "medusa", "tiny", progress=False)
    eag = train_eagle(cfg, base, records, EagleConfig(**common), d / "eagle", "tiny", progress=False)
    return {
        "medusa": str(d / "medusa"),
        "eagle": str(d / "eagle"),
        "summaries": {"medusa": med, "eagle": eag},
        "ar": ar,
        "tree": str(d / "small.json"),
    }


@pytest.fixture(scope="module")
def target(tiny):
    """The target's softmax after the chi-square prompt + a path (one compiled forward for all tests)."""
    cfg, base, _ = tiny
    S = len(CHI_PROMPT) + 8
    forward = jax.jit(lambda b, t: D.forward(cfg, b, t, D.init_cache(cfg, 1, 64), jnp.zeros((1,), jnp.int32))[0])

    def probs_at(path, T=1.0):
        seq = CHI_PROMPT + path
        lg = np.asarray(forward(base, jnp.asarray([seq + [0] * (S - len(seq))])), np.float64)[0, : len(seq)]
        lg = lg[len(CHI_PROMPT) - 1 :] / T
        p = np.exp(lg - lg.max(-1, keepdims=True))
        return p / p.sum(-1, keepdims=True)

    return probs_at


def _knobs(name, trained):
    return KNOBS[name](trained)


def test_training_lowers_the_loss(trained):
    """Mean loss of the last 5 steps below the first 5 (the metrics JSONL), and the summary's budget."""
    for kind, key in (("medusa", "ce"), ("eagle", "loss")):
        rows = [json.loads(x) for x in open(f"{trained[kind]}/metrics.jsonl").read().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        first, last = np.mean([r[key] for r in rows[:5]]), np.mean([r[key] for r in rows[-5:]])
        assert last < first - 0.05, (kind, first, last)
        s = trained["summaries"][kind]
        assert s["steps"] == STEPS and s["trainable_params"] > 0 and s["minutes"] > 0
    # Medusa: 3 heads of D x D + D; EAGLE: fc (2D x D + D) and one decoder layer (D = 64, F = 128, KV dim 32)
    assert trained["summaries"]["medusa"]["trainable_params"] == 3 * (64 * 64 + 64)
    layer = 2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128
    assert trained["summaries"]["eagle"]["trainable_params"] == 2 * 64 * 64 + 64 + layer


@pytest.mark.parametrize("name", ["medusa", "eagle", "eagle2+lookup"])
def test_greedy_lossless(tiny, trained, name):
    """Batch 4, each row its own position: spec output == AR, and the peer's drafts were accepted (EAGLE-2
    with prompt lookup: both kinds of step drafted, in one loop)."""
    cfg, base, _ = tiny
    peer, _, extra = name.partition("+")
    opts = draft_options(peer, **_knobs(peer, trained), **({"lookup": 3} if extra else {}))
    spec = SpeculativeDecoder(cfg, opts.drafter(cfg))
    r = spec.generate(base, opts.prepare(spec, base), _prompts(), SC)
    assert r.new_ids == trained["ar"]
    assert sum(r.kinds[peer]["accepted"]) > 0, r.kinds
    if extra:
        assert sum(r.kinds["lookup"]["steps"]) > 0 and sum(r.kinds[peer]["steps"]) > 0, r.kinds
    else:
        assert r.kinds[peer]["steps"] == r.steps


@pytest.mark.parametrize("name", ["medusa", "eagle", "eagle2"])
def test_sampling_exact(tiny, trained, target, name):
    """Temperature 1: 384 rows of one prompt, the next-token counts along the mode path against the
    target's softmax (chi-square, p > 1e-3), and against a reference tempered by 0.75 refused."""
    cfg, base, _ = tiny
    B, n, probs_at = 384, 8, target

    opts = draft_options(name, **_knobs(name, trained))
    spec = SpeculativeDecoder(cfg, opts.drafter(cfg))
    sc = SpecConfig(max_new_tokens=n, stop_ids=(-1,), sampling=SamplingConfig(temperature=1.0, seed=7))
    r = spec.generate(base, opts.prepare(spec, base), [CHI_PROMPT] * B, sc)
    out = np.asarray(r.new_ids)
    assert out.shape == (B, n) and sum(r.accepted) > B // 4, sum(r.accepted)
    pv, dof, sizes = _chi2_along_mode_path(out, probs_at)
    assert dof >= 8 and sizes[2] >= 100, (dof, sizes)
    assert pv > 1e-3, (pv, dof, sizes)
    assert _chi2_along_mode_path(out, lambda p: probs_at(p, 0.75))[0] < 1e-3


def test_checkpoints_round_trip_and_refuse_another_base(tiny, trained):
    """What the drafter restores is what training returned; the budget is the checkpoint's; a checkpoint
    trained on another base (here the same model without the peaked final norm) is refused in one line."""
    cfg, base, other = tiny
    for name, key in (("medusa", "heads"), ("eagle", "draft")):
        opts = draft_options(name, **_knobs(name, trained))
        spec = SpeculativeDecoder(cfg, opts.drafter(cfg))
        got = opts.prepare(spec, base)
        got = got["draft"] if name == "eagle" else got
        want = trained["summaries"][name][key]
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        b = opts.budget()
        assert b["trainable_params"] == trained["summaries"][name]["trainable_params"] and b["train_minutes"] > 0
        assert opts.describe()["trained_steps"] == STEPS
        with pytest.raises(M2R2Error, match="another base model") as e:
            opts.prepare(SpeculativeDecoder(cfg, opts.drafter(cfg)), other)
        assert "\n" not in str(e.value)


def test_lm_head_alone_matches_the_model(tiny):
    """The peers' LM head on final-normed states equals the model's logits, untied and tied, any rank."""
    import dataclasses

    from m2r2_jax.peers.medusa import final_features, lm_head

    cfg, base, _ = tiny
    tied = dataclasses.replace(cfg, tie_word_embeddings=True)
    untied_base, tied_base = base, {k: v for k, v in base.items() if k != "lm_head"}
    h = jax.random.normal(jax.random.key(0), (2, 3, 5, cfg.hidden_size))
    for c, b in ((cfg, untied_base), (tied, tied_base)):
        for x in (h[0, 0], h[0], h):
            want = np.asarray(D.logits_from_hidden(c, b, x.reshape(1, -1, x.shape[-1]))).reshape(x.shape[:-1] + (-1,))
            np.testing.assert_allclose(np.asarray(lm_head(c, b, final_features(c, b, x))), want, rtol=1e-5, atol=1e-5)


def _layout_ref(parent, depth, K, W):
    T = len(parent)
    mask = np.eye(T, dtype=bool)
    path = np.zeros((T, W), np.int32)
    for i in range(T):
        j = i
        while True:
            mask[i, j] = True
            path[i, depth[j]] = j
            if j == 0:
                break
            j = parent[j]
    kids = np.full((T, K), -1, np.int32)
    for i in range(T):
        c = [j for j in range(1, T) if parent[j] == i][:K]
        kids[i, : len(c)] = c
    return mask, path, kids


def test_eagle2_layout_matches_python():
    """Per-row tables from parents (random trees, parents first) against a walk up each node's ancestors;
    the envelope fixes the block's shapes."""
    rs = np.random.RandomState(2)
    B, T, K, W = 5, 12, 3, 6
    parents, depths = [], []
    for _ in range(B):
        par, dep, kids = [0], [0], [0] * T
        for j in range(1, T):
            cand = [i for i in range(j) if kids[i] < K and dep[i] < W - 1]
            p = int(rs.choice(cand))
            kids[p] += 1
            par.append(p)
            dep.append(dep[p] + 1)
        parents.append(par)
        depths.append(dep)
    lay = layout_from_parents(jnp.asarray(parents), jnp.asarray(depths), K, W)
    for b in range(B):
        mask, path, kids = _layout_ref(parents[b], depths[b], K, W)
        assert (np.asarray(lay.mask[b]) == mask).all() and (np.asarray(lay.path[b]) == path).all()
        assert (np.asarray(lay.children[b]) == kids).all()
    env = envelope_tree(4, 5, 15)
    assert env.size == 16 and env.max_depth == 5 and env.children.shape[1] == 4


def test_bad_knobs_refused(tiny, trained, tmp_path, capsys):
    cfg, _, _ = tiny
    cases = [
        ("medusa", dict(), "trained checkpoint is required"),
        ("medusa", dict(medusa_checkpoint=str(tmp_path / "none")), "not found"),
        ("medusa", dict(medusa_checkpoint=trained["eagle"]), "not a medusa checkpoint"),
        ("eagle", dict(eagle_checkpoint=trained["medusa"]), "not a eagle checkpoint"),
        ("medusa", dict(medusa_checkpoint=trained["medusa"], medusa_tree="chain4"), "the checkpoint has 3 heads"),
        ("eagle2", dict(eagle_checkpoint=trained["eagle"], eagle2_nodes=300), "nodes must be in"),
        ("eagle2", dict(eagle_checkpoint=trained["eagle"], eagle2_topk=0), "topk must be"),
        ("eagle", dict(eagle_checkpoint=trained["eagle"], eagle_tree="nope"), "unknown draft tree"),
        ("eagle", dict(eagle_checkpoint=trained["eagle"], eagle2_topk=3), "applies to --drafter eagle2"),
        ("medusa", dict(medusa_checkpoint=trained["medusa"], lookup=-1), "lookup"),
    ]
    for name, knobs, msg in cases:
        with pytest.raises(M2R2Error, match=msg) as e:
            draft_options(name, **knobs)
        assert "\n" not in str(e.value)
    # the defaults: Medusa's tree for its 3 heads (medusa20's first 3 levels), EAGLE's tree16, EAGLE-2's 16 nodes
    assert draft_options("medusa", medusa_checkpoint=trained["medusa"]).drafter(cfg).block_size == 17
    assert draft_options("eagle", eagle_checkpoint=trained["eagle"]).drafter(cfg).block_size == 16
    assert draft_options("eagle2", eagle_checkpoint=trained["eagle"]).drafter(cfg).block_size == 16

    from eval.speculative import main
    from m2r2_jax.cli import run_main

    for argv, msg in (
        (["--drafter", "medusa"], "trained checkpoint is required"),
        (["--drafter", "eagle2", "--eagle-checkpoint", trained["eagle"], "--eagle2-depth", "0"], "depth"),
        (["--drafter", "eagle", "--medusa-tree", "chain2"], "applies to --drafter medusa"),
    ):
        with pytest.raises(SystemExit) as e:
            run_main(main, argv + ["--out", str(tmp_path / "r.json")])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and msg in err and "\n" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_compare_specs(tiny, trained):
    """eval.compare's specs: the trained peers alone and with prompt lookup, each given only its own knobs;
    a combination still reads the full model's hidden states."""
    from m2r2_jax.evaluation.compare import parse_specs, spec_options

    cfg = tiny[0]
    assert parse_specs("medusa,eagle+lookup,eagle2+lookup") == ("medusa", "eagle+lookup", "eagle2+lookup")
    knobs = dict(medusa_checkpoint=trained["medusa"], eagle_checkpoint=trained["eagle"], lookup=None, tree=None)
    assert spec_options("medusa", knobs).lookup == 0 and spec_options("eagle+lookup", knobs).lookup == 4
    assert spec_options("eagle2", knobs).checkpoint == trained["eagle"]
    d = spec_options("medusa+lookup", knobs).drafter(cfg)
    assert d.kinds == ("medusa", "lookup") and d.needs_hidden and not d.dynamic
    d = spec_options("eagle2+lookup", knobs).drafter(cfg)
    assert d.kinds == ("eagle2", "lookup") and d.needs_hidden and d.dynamic and d.stateful
