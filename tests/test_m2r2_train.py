"""M2R2 streams and training: zero-init equivalence, frozen base, overfitting,
sharded == unsharded step, exact resume, restore across meshes, refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.loading.registry import LoadedModel, place_params
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2
from m2r2_jax.sharding import MeshConfig
from m2r2_jax.training.config import DataConfig, TrainConfig, load_train_config
from m2r2_jax.training.trainer import train


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, params


def _model(tiny_model, mesh=None):
    cfg, params = tiny_model
    return LoadedModel(cfg=cfg, params=place_params(cfg, params, mesh), tokenizer=None, source="tiny", kind="hf")


def _records(n=16, seed=0):
    rs = np.random.RandomState(seed)
    return [
        {
            "prompt_ids": rs.randint(3, 256, rs.randint(4, 10)).tolist(),
            "answer_ids": rs.randint(3, 256, rs.randint(8, 20)).tolist(),
        }
        for _ in range(n)
    ]


def _tc(tmp_path, **kw):
    base = dict(
        model="tiny",
        seq_len=32,
        batch_size=4,
        steps=6,
        lr=3e-3,
        warmup_steps=1,
        save_every=2,
        async_save=False,
        out_dir=str(tmp_path),
        m2r2=M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8, draft_vocab=64),
        data=DataConfig(),
        mesh=MeshConfig(data=1, fsdp=1, tensor=1),
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("layer_map", ["prefix", "strided", "skip"])
def test_zero_init_fast_stream_equals_base_layers(tiny_model, layer_map):
    """Untrained adapters: fast layer l == base layer j(l) computed with the same shared-KV inputs;
    with the prefix or skip map at rate 1 that is exactly the slow stream."""
    cfg, params = tiny_model
    base = jax.tree.map(jnp.asarray, params)
    mc = M2R2Config(rate=1, layer_map=layer_map, rank=4).validate(cfg.num_layers)
    m2r2 = init_m2r2(cfg, mc, jax.random.key(1))
    toks = jnp.asarray(np.random.RandomState(0).randint(3, 256, (2, 16)), jnp.int32)
    slow = S.slow_pass(cfg, base, toks)
    fast = S.fast_train_pass(cfg, mc, base, m2r2, toks, slow)
    if layer_map in ("prefix", "skip"):
        assert mc.base_layers(cfg.num_layers) == list(range(cfg.num_layers))
        for l, h in enumerate(fast):
            np.testing.assert_allclose(np.asarray(h), np.asarray(slow.hiddens[l + 1]), atol=1e-5)
    # nonzero adapters change it
    m2 = jax.tree.map(lambda x: x + 0.05, m2r2)
    fast2 = S.fast_train_pass(cfg, mc, base, m2, toks, slow)
    assert np.abs(np.asarray(fast2[-1]) - np.asarray(fast[-1])).max() > 1e-3


def test_targets_and_layer_maps():
    mc = M2R2Config(rate=3, layer_map="strided")
    assert mc.n_fast(30) == 10 and mc.targets_of(30) == [3 * l for l in range(1, 11)]
    assert mc.base_layers(30) == [3 * l - 1 for l in range(1, 11)]
    assert M2R2Config(rate=3).base_layers(30) == list(range(10))  # default: prefix
    # skip: fast layer l runs the first layer of its group, whose slow input it is aligned to
    assert M2R2Config(rate=3, layer_map="skip").base_layers(30) == [3 * l for l in range(10)]
    assert M2R2Config(rate=3, branch=2, layer_map="skip").base_layers(30)[:2] == [2, 5]
    with pytest.raises(M2R2Error, match="layer_map"):
        M2R2Config(layer_map="zig").validate(30)
    assert M2R2Config(num_fast_layers=8).targets_of(30)[-1] == 30
    with pytest.raises(M2R2Error, match="unknown adapter target"):
        M2R2Config(targets=("q", "zz")).validate(30)


def test_base_frozen_and_loss_falls(tiny_model, tmp_path):
    m = _model(tiny_model)
    before = jax.tree.map(lambda x: np.array(x, copy=True), m.params)
    recs = _records(4)  # one batch: overfit it
    r = train(_tc(tmp_path, steps=30, save_every=100), model=m, records=recs, progress=False)
    after = jax.tree.map(np.asarray, m.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    losses = [float(h["loss"]) for h in r.history]
    assert losses[-1] < 0.5 * losses[0]
    assert float(r.history[-1]["agreement"]) > float(r.history[0]["agreement"])


def test_resume_gives_identical_next_step(tiny_model, tmp_path):
    recs = _records(16)
    full = train(_tc(tmp_path / "a"), model=_model(tiny_model), records=recs, progress=False)
    # run b keeps its checkpoints apart from its run dir (checkpoint_dir, e.g. a gs:// bucket)
    ck = str(tmp_path / "store" / "b")
    train(_tc(tmp_path / "b", checkpoint_dir=ck), model=_model(tiny_model), records=recs, progress=False, stop_at=4)
    assert sorted(p.name for p in (tmp_path / "store" / "b").iterdir()) == ["2", "4"]
    assert not (tmp_path / "b" / "checkpoints").exists()
    # the "killed" run left checkpoints at steps 2 and 4; a fresh process resumes from 4
    resumed = train(_tc(tmp_path / "b", checkpoint_dir=ck), model=_model(tiny_model), records=recs, progress=False)
    assert resumed.step == 6 and len(resumed.history) == 2
    for a, b in zip(full.history[4:], resumed.history):
        assert float(a["loss"]) == float(b["loss"])


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=1, tensor=4), dict(data=1, fsdp=1, tensor=8)], ids=["2x4", "1x8"])
def test_sharded_step_equals_unsharded(tiny_model, tmp_path, mesh):
    recs = _records(16)
    ref = train(_tc(tmp_path / "u", steps=3), model=_model(tiny_model), records=recs, progress=False)
    mc = MeshConfig(**mesh)
    from m2r2_jax.sharding import make_mesh

    sh = train(
        _tc(tmp_path / "s", steps=3, mesh=mc), model=_model(tiny_model, make_mesh(mc)), records=recs, progress=False
    )
    for a, b in zip(ref.history, sh.history):
        np.testing.assert_allclose(float(a["loss"]), float(b["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref.m2r2), jax.tree.leaves(sh.m2r2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_restore_across_meshes(tiny_model, tmp_path):
    from m2r2_jax.sharding import make_mesh

    recs = _records(16)
    mc8 = MeshConfig(data=2, fsdp=1, tensor=4)
    train(_tc(tmp_path, steps=2, mesh=mc8), model=_model(tiny_model, make_mesh(mc8)), records=recs, progress=False)
    one = train(_tc(tmp_path, steps=4), model=_model(tiny_model), records=recs, progress=False)  # 8 -> 1 device
    assert one.step == 4 and len(one.history) == 2
    back = train(
        _tc(tmp_path, steps=6, mesh=mc8), model=_model(tiny_model, make_mesh(mc8)), records=recs, progress=False
    )  # 1 -> 8 devices
    assert back.step == 6 and len(back.history) == 2


def test_mismatched_checkpoint_refused(tiny_model, tmp_path):
    recs = _records(16)
    train(_tc(tmp_path, steps=2), model=_model(tiny_model), records=recs, progress=False)
    with pytest.raises(M2R2Error, match="different M2R2 config"):
        train(
            _tc(tmp_path, steps=4, m2r2=M2R2Config(rate=1, num_fast_layers=2, rank=8, router_dim=8, draft_vocab=64)),
            model=_model(tiny_model),
            records=recs,
            progress=False,
        )
    cfg, params = tiny_model
    other = jax.tree.map(lambda x: x * 1.01, params)
    with pytest.raises(M2R2Error, match="made for base model"):
        train(_tc(tmp_path, steps=4), model=_model((cfg, other)), records=recs, progress=False)


def test_config_overrides_and_unknown_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("steps: 7\nm2r2:\n  rank: 8\n")
    tc = load_train_config(str(p), ["m2r2.rate=2", "lr=0.01"])
    assert (tc.steps, tc.m2r2.rank, tc.m2r2.rate, tc.lr) == (7, 8, 2, 0.01)
    with pytest.raises(M2R2Error, match="unknown config key 'm2r2.rnak'"):
        load_train_config(str(p), ["m2r2.rnak=3"])
    p.write_text("stepz: 3\n")
    with pytest.raises(M2R2Error, match="unknown config key 'stepz'"):
        load_train_config(str(p))


def test_alignment_eval_and_checkpoint_loading(tiny_model, tiny_llama_dir, tmp_path):
    """Zero-init, prefix map, rate 1: every fast layer IS the slow stream, so agreement is 1 at
    the last layer; load_m2r2 restores what the trainer saved; a foreign base is refused."""
    from m2r2_jax.evaluation.alignment import evaluate_alignment
    from m2r2_jax.training.checkpoint import load_m2r2

    cfg, params = tiny_model
    base = jax.tree.map(jnp.asarray, params)
    mc = M2R2Config(rate=1, layer_map="prefix", rank=4, router_dim=8, draft_vocab=0).validate(cfg.num_layers)
    m2r2 = init_m2r2(cfg, mc, jax.random.key(0))
    recs = _records(6)
    out = evaluate_alignment(cfg, base, mc, m2r2, np.arange(cfg.vocab_size, dtype=np.int32), recs, seq_len=32)
    assert out["final_agreement"] == 1.0 and len(out["layers"]) == cfg.num_layers
    assert out["layers"][-1]["baseline_agreement"] == 1.0  # same depth = full model here
    # fast layer 1 agrees on some tokens and not others: its router / confidence AUCs are defined
    assert 0.0 < out["layers"][0]["agreement"] < 1.0
    assert 0.0 <= out["layers"][0]["router_auc"] <= 1.0 and 0.0 <= out["layers"][0]["confidence_auc"] <= 1.0

    r = train(_tc(tmp_path, steps=2), model=_model(tiny_model), records=_records(16), progress=False)
    mc2, p2, draft, meta = load_m2r2(tmp_path / "checkpoints", cfg, base, "tiny")
    assert meta["step"] == 2 and len(draft) == 64
    for a, b in zip(jax.tree.leaves(r.m2r2), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a relative path works too (Orbax itself wants absolute paths)
    import os

    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert load_m2r2("checkpoints/2", cfg, base, "tiny")[3]["step"] == 2
        assert load_m2r2(".", cfg, base, "tiny")[3]["step"] == 2  # the trainer's out_dir: its checkpoints/
    finally:
        os.chdir(cwd)
    with pytest.raises(M2R2Error, match="made for base model"):
        load_m2r2(tmp_path / "checkpoints", cfg, jax.tree.map(lambda x: x + 1.0, base), "tiny")
    with pytest.raises(M2R2Error, match="checkpoint not found"):
        load_m2r2(tmp_path / "nope", cfg, base, "tiny")
    # the same base loaded in bf16 (--param-dtype bfloat16) is the same base: its loader-side
    # fingerprint (source weights at float32) matches; the bf16 arrays' own fingerprint does not
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.model.params import params_fingerprint

    m16 = load_model(str(tiny_llama_dir), param_dtype="bfloat16", tokenizer=False)
    assert m16.fingerprint == params_fingerprint(base) != params_fingerprint(m16.params)
    assert (
        load_m2r2(tmp_path / "checkpoints", m16.cfg, m16.params, "tiny", base_fingerprint=m16.fingerprint)[3]["step"]
        == 2
    )
    with pytest.raises(M2R2Error, match="made for base model"):
        load_m2r2(tmp_path / "checkpoints", m16.cfg, m16.params, "tiny")


_CHILD = r"""
import sys, json, numpy as np
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_m2r2_train import _model, _records, _tc
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.training.trainer import train
from pathlib import Path
cfg, params, _ = load_hf_checkpoint({tiny!r})
train(_tc(Path({out!r}), steps=400, save_every=2), model=_model((cfg, params)), records=_records(16),
      progress=False)
"""


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(tiny_model, tiny_llama_dir, tmp_path):
    """A real SIGKILL mid-run (async checkpointing on): the resumed run's next losses equal an unbroken run's."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = tmp_path / "killed"
    code = _CHILD.format(root=root, tests=str(Path(__file__).parent), tiny=str(tiny_llama_dir), out=str(out))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckdir = out / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait for >= 2 step dirs, then kill -9 mid-run
            done = [d for d in ckdir.iterdir() if d.name.isdigit()] if ckdir.exists() else []
            if len(done) >= 2 and proc.poll() is None:
                time.sleep(0.5)
                break
            if proc.poll() is not None:
                raise AssertionError(proc.stderr.read().decode()[-3000:])
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    from m2r2_jax.training.checkpoint import Checkpointer

    start = Checkpointer(out / "checkpoints", 2, 2, False).latest_step()
    assert start is not None and start >= 2
    resumed = train(
        _tc(out, steps=400, save_every=2),
        model=_model(tiny_model),
        records=_records(16),
        progress=False,
        stop_at=start + 2,
    )
    full = train(
        _tc(tmp_path / "full", steps=400, save_every=1000),
        model=_model(tiny_model),
        records=_records(16),
        progress=False,
        stop_at=start + 2,
    )
    assert len(resumed.history) == 2
    for a, b in zip(full.history[start:], resumed.history):
        assert float(a["loss"]) == float(b["loss"])


def test_draft_weight_fraction(tiny_model):
    """The draft cost model: weights read through fast depth l, relative to a full step."""
    from m2r2_jax.evaluation.alignment import draft_weight_fraction

    cfg, params = tiny_model
    mc = M2R2Config(rate=2, rank=4).validate(cfg.num_layers)
    m2r2 = init_m2r2(cfg, mc, jax.random.key(0))
    f = draft_weight_fraction(cfg, mc, params, m2r2, 0)
    assert len(f) == mc.n_fast(cfg.num_layers) and all(b > a for a, b in zip(f, f[1:]))
    n = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
    expect = cfg.vocab_size * cfg.hidden_size + cfg.hidden_size + n(params["layers"][0]) + n(m2r2["fast"][0])
    assert f[0] == pytest.approx(expect / n(params))
    small = draft_weight_fraction(cfg, mc, params, m2r2, 16)
    assert all(s < x for s, x in zip(small, f))


def test_train_positions_equal_full_pass(tiny_model):
    """Training on the gathered loss positions only (m2r2.train_positions) gives the same loss,
    metrics and gradients as the full pass when every row's loss positions fit; fewer positions
    than a row has changes the loss (so the gather is not a no-op)."""
    from m2r2_jax.m2r2.losses import m2r2_loss

    cfg, params = tiny_model
    base = jax.tree.map(jnp.asarray, params)
    rs = np.random.RandomState(3)
    B, T = 3, 24
    toks = jnp.asarray(rs.randint(3, 256, (B, T)), jnp.int32)
    mask = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate([(5, 20), (9, 24), (2, 11)]):  # at most 15 loss positions per row
        mask[b, s:e] = 1.0
    mask = jnp.asarray(mask)
    draft_ids = jnp.arange(0, 256, 2, dtype=jnp.int32)
    grad = jax.jit(jax.value_and_grad(m2r2_loss, has_aux=True), static_argnums=(5, 6))
    loss = jax.jit(m2r2_loss, static_argnums=(5, 6))
    for kd_vocab in ("full", "draft"):
        mc = M2R2Config(rate=2, layer_map="skip", rank=4, router_dim=8, draft_vocab=128, kd_vocab=kd_vocab)
        m2r2 = jax.tree.map(
            lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), init_m2r2(cfg, mc, jax.random.key(2))
        )
        full = grad(m2r2, base, toks, mask, draft_ids, cfg, mc)
        sub = grad(m2r2, base, toks, mask, draft_ids, cfg, dataclasses.replace(mc, train_positions=16))
        np.testing.assert_allclose(float(sub[0][0]), float(full[0][0]), rtol=1e-5)
        for k in ("agreement", "kd", "align", "router_bce", "tokens"):
            np.testing.assert_allclose(np.asarray(sub[0][1][k]), np.asarray(full[0][1][k]), rtol=1e-5, atol=1e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), sub[1], full[1]
        )
        short = loss(m2r2, base, toks, mask, draft_ids, cfg, dataclasses.replace(mc, train_positions=8))
        assert float(short[1]["tokens"]) == 8 * 2 + 8  # rows of 15, 15 and 9 loss positions, capped at 8
        assert abs(float(short[0]) - float(full[0][0])) > 1e-6
    with pytest.raises(M2R2Error, match="kd_vocab"):
        M2R2Config(kd_vocab="some").validate(4)


@pytest.mark.parametrize("layer_map,branch,tp", [("skip", 0, 16), ("prefix", 1, 0), ("strided", 0, 16)])
def test_teacher_cache_loss_equals_slow_pass(tiny_model, tmp_path, layer_map, branch, tp):
    """The loss and gradients read from a float32 teacher cache equal the ones from the in-step
    slow pass (K/V re-projected from the cached states); a bfloat16 cache stays close."""
    from m2r2_jax.m2r2.losses import m2r2_loss, m2r2_loss_cached
    from m2r2_jax.training.teacher_cache import open_or_build

    cfg, params = tiny_model
    base = jax.tree.map(jnp.asarray, params)
    rs = np.random.RandomState(5)
    N, T = 5, 24
    toks = rs.randint(3, 256, (N, T)).astype(np.int32)
    mask = np.zeros((N, T), np.float32)
    for b, (s, e) in enumerate([(5, 20), (9, 24), (2, 11), (3, 18), (12, 13)]):
        mask[b, s:e] = 1.0
    draft_ids = jnp.arange(0, 256, 2, dtype=jnp.int32)
    mc = M2R2Config(
        rate=2, branch=branch, layer_map=layer_map, rank=4, router_dim=8, draft_vocab=128, train_positions=tp
    )
    m2r2 = jax.tree.map(
        lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), init_m2r2(cfg, mc, jax.random.key(2))
    )
    idx = np.array([0, 2, 3])
    ref = jax.value_and_grad(m2r2_loss, has_aux=True)(m2r2, base, toks[idx], mask[idx], draft_ids, cfg, mc)
    cached = jax.value_and_grad(m2r2_loss_cached, has_aux=True)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
        tc = open_or_build(
            tmp_path / dtype, cfg, mc, base, {"id": "tiny"}, toks, mask, dtype, batch_size=2, progress=False
        )
        hid, fin = tc.batch(idx)
        assert hid.shape == (3, len(mc.cached_layers(cfg.num_layers)), T, cfg.hidden_size)
        got = cached(m2r2, base, toks[idx], mask[idx], draft_ids, jnp.asarray(hid), jnp.asarray(fin), cfg, mc)
        np.testing.assert_allclose(float(got[0][0]), float(ref[0][0]), rtol=tol)
        for k in ("kd", "align", "router_bce", "tokens"):
            np.testing.assert_allclose(np.asarray(got[0][1][k]), np.asarray(ref[0][1][k]), rtol=tol, atol=tol / 10)
        if dtype == "float32":
            assert float(got[0][1]["agreement"]) == float(ref[0][1]["agreement"])
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                got[1],
                ref[1],
            )


def test_teacher_cache_training_resume_and_refusals(tiny_model, tmp_path):
    """Training through a float32 teacher cache follows the uncached run; an interrupted cache build
    resumes where it stopped; a cache made for other data or another base is refused untouched."""
    from m2r2_jax.training import teacher_cache as TC

    recs = _records(16)
    plain = train(_tc(tmp_path / "plain", steps=3), model=_model(tiny_model), records=recs, progress=False)
    data = DataConfig(teacher_cache_dir=str(tmp_path / "teacher"), teacher_cache_dtype="float32")
    cached = train(_tc(tmp_path / "cached", steps=3, data=data), model=_model(tiny_model), records=recs, progress=False)
    for a, b in zip(plain.history, cached.history):
        np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-4)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5),
        cached.m2r2,
        plain.m2r2,
    )
    man = tmp_path / "teacher" / "manifest.json"
    full_hid = np.load(tmp_path / "teacher" / "hid.npy").copy()
    # interrupted build: roll progress back to 8 examples and scribble over the rest; the rebuild redoes them
    import json

    m = json.loads(man.read_text())
    m["done"] = 8
    man.write_text(json.dumps(m))
    mm = np.lib.format.open_memmap(tmp_path / "teacher" / "hid.npy", mode="r+")
    mm[8:] = 0
    mm.flush()
    del mm
    cfg, params = tiny_model
    base = jax.tree.map(jnp.asarray, params)
    from m2r2_jax.data.batches import pack_examples

    toks, mask = pack_examples(recs, 32)
    tc = TC.open_or_build(
        tmp_path / "teacher",
        cfg,
        _tc(tmp_path).m2r2.validate(cfg.num_layers),
        base,
        m["base"],
        toks,
        mask,
        "float32",
        batch_size=4,
        progress=False,
    )
    assert tc.manifest["done"] == 16
    np.testing.assert_array_equal(np.load(tmp_path / "teacher" / "hid.npy"), full_hid)
    before = man.read_text()
    with pytest.raises(M2R2Error, match="built for another data"):
        TC.open_or_build(
            tmp_path / "teacher",
            cfg,
            _tc(tmp_path).m2r2.validate(cfg.num_layers),
            base,
            m["base"],
            toks[::-1].copy(),
            mask,
            "float32",
            progress=False,
        )
    with pytest.raises(M2R2Error, match="built for another base"):
        TC.open_or_build(
            tmp_path / "teacher",
            cfg,
            _tc(tmp_path).m2r2.validate(cfg.num_layers),
            base,
            {"other": 1},
            toks,
            mask,
            "float32",
            progress=False,
        )
    assert man.read_text() == before
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(M2R2Error, match="no manifest"):
        TC.open_or_build(
            tmp_path / "junk",
            cfg,
            _tc(tmp_path).m2r2.validate(cfg.num_layers),
            base,
            m["base"],
            toks,
            mask,
            "float32",
            progress=False,
        )


def test_train_matmul_dtype_bf16(tiny_model, tmp_path):
    """m2r2.train_matmul_dtype=bfloat16: the student side multiplies in bf16 (f32 accumulation), so
    loss and gradients move by bf16 rounding only; the teacher stays f32 (the agreement metric's
    reference and the KD target are unchanged); the base identity ignores compute dtypes; a bf16 run
    still overfits a batch; an unknown dtype is refused."""
    from m2r2_jax.m2r2.losses import m2r2_loss
    from m2r2_jax.model import decoder as D
    from m2r2_jax.training.checkpoint import base_identity

    cfg, params = tiny_model
    base = jax.tree.map(jnp.asarray, params)
    rs = np.random.RandomState(5)
    toks = jnp.asarray(rs.randint(3, 256, (2, 24)), jnp.int32)
    mask = jnp.asarray(np.r_[np.zeros(8), np.ones(16)][None].repeat(2, 0), jnp.float32)
    draft_ids = jnp.arange(0, 256, 2, dtype=jnp.int32)
    mc = M2R2Config(rate=2, layer_map="skip", rank=4, router_dim=8, draft_vocab=128)
    m2r2 = jax.tree.map(
        lambda x: x + 0.02 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), init_m2r2(cfg, mc, jax.random.key(2))
    )
    vg = jax.jit(jax.value_and_grad(m2r2_loss, has_aux=True), static_argnums=(5, 6))
    (l32, m32), g32 = vg(m2r2, base, toks, mask, draft_ids, cfg, mc)
    (l16, m16), g16 = vg(m2r2, base, toks, mask, draft_ids, cfg, dataclasses.replace(mc, train_matmul_dtype="bfloat16"))
    assert 0 < abs(float(l16) - float(l32)) < 2e-2 * abs(float(l32))
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32)])
    b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g16)])
    assert not np.array_equal(a, b) and a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.98
    assert float(m16["tokens"]) == float(m32["tokens"])
    # the model-level knob: a bf16-matmul forward is close to, and different from, the f32 one
    h = jnp.asarray(rs.randn(2, 5, cfg.hidden_size), jnp.float32)
    lg32 = D.logits_from_hidden(cfg, base, h)
    lg16 = D.logits_from_hidden(dataclasses.replace(cfg, matmul_dtype="bfloat16"), base, h)
    assert lg16.dtype == jnp.float32 and 0 < float(jnp.abs(lg16 - lg32).max()) < 0.05 * float(jnp.abs(lg32).max())
    assert base_identity("tiny", dataclasses.replace(cfg, matmul_dtype="bfloat16"), params) == base_identity(
        "tiny", cfg, params
    )
    mcb = dataclasses.replace(_tc(tmp_path).m2r2, train_matmul_dtype="bfloat16")
    r = train(
        _tc(tmp_path, steps=30, save_every=100, m2r2=mcb), model=_model(tiny_model), records=_records(4), progress=False
    )
    losses = [float(x["loss"]) for x in r.history]
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(M2R2Error, match="train_matmul_dtype"):
        M2R2Config(train_matmul_dtype="float8").validate(4)


def test_auc_equals_pairwise_count():
    """ROC AUC = P(score of a positive > score of a negative) + P(tie) / 2, counted over all pairs."""
    from m2r2_jax.evaluation.alignment import auc

    rs = np.random.RandomState(0)
    for _ in range(20):
        score = rs.randint(0, 6, 40).astype(float)  # many ties
        label = rs.rand(40) < 0.4
        pos, neg = score[label], score[~label]
        want = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
        assert auc(score, label) == pytest.approx(want)
    assert np.isnan(auc(np.ones(5), np.ones(5)))  # one class only: undefined


def test_time_based_checkpoints(tiny_model, tmp_path):
    """`save_minutes` saves on wall clock even when `save_every` would not (here: every step)."""
    from m2r2_jax.training.checkpoint import latest_step

    m, recs = _model(tiny_model), _records(4)
    train(
        _tc(tmp_path / "t", steps=6, save_every=1000, save_minutes=1e-9),
        model=m,
        records=recs,
        progress=False,
        stop_at=3,
    )
    saved = lambda d: sorted(int(c.name) for c in (d / "checkpoints").iterdir() if c.name.isdigit())  # noqa: E731
    assert latest_step(tmp_path / "t" / "checkpoints") == 3
    assert saved(tmp_path / "t") == [2, 3]  # step 2 on wall clock (keep 2)
    train(
        _tc(tmp_path / "n", steps=6, save_every=1000, save_minutes=0), model=m, records=recs, progress=False, stop_at=3
    )
    # Orbax always saves the first step; no time-based saves; the last step of a run (stop_at) is saved
    assert saved(tmp_path / "n") == [1, 3]
    with pytest.raises(M2R2Error, match="save_minutes"):
        _tc(tmp_path, save_minutes=-1)


_TERM_CHILD = r"""
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_m2r2_train import _model, _records, _tc
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.training.trainer import train
from pathlib import Path
cfg, params, _ = load_hf_checkpoint({tiny!r})
r = train(_tc(Path({out!r}), steps=100000, save_every=100000, save_minutes=0), model=_model((cfg, params)),
          records=_records(16), progress=False)
print("STOPPED_AT", r.step)
"""


@pytest.mark.slow
def test_sigterm_saves_and_returns(tiny_llama_dir, tmp_path):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint of it is written (though neither
    save_every nor save_minutes is due) and training returns normally."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from m2r2_jax.training.checkpoint import latest_step

    root = str(Path(__file__).resolve().parents[1])
    out = tmp_path / "term"
    code = _TERM_CHILD.format(root=root, tests=str(Path(__file__).parent), tiny=str(tiny_llama_dir), out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()[-3000:]
    stopped = int(stdout.decode().split("STOPPED_AT")[1].split()[0])
    assert stopped >= 2 and latest_step(out / "checkpoints") == stopped
