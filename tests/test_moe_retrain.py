"""Retraining a MoEfied model's experts (training/moe_experts.py, training/moe_retrain.py) on tiny random
models: the training forward is the model's MoE block exactly (and still passes the router a gradient),
the closed-form down projections (full and reduced-rank) solve a planted least squares, a layer's fit
lowers its held-out error (closed form, + Adam on full weights or on low-rank deltas), and the
layer-by-layer run writes a /2 asset whose model (as load_moefied builds it) reproduces the stream it
was fitted on, resumes after an interruption to the same asset, and refuses the layers of another run."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.config import ModelConfig, replace
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import expert_weights, moe_config, read_moe_asset
from m2r2_jax.model import decoder as D
from m2r2_jax.model.moe import MoEMLP
from m2r2_jax.training import moe_experts as X
from m2r2_jax.training import moe_retrain as R
from tests import test_moefy as MF

Dm, F, E = 16, 32, 4


def _layer(seed=0, scale=0.3):
    rs = np.random.RandomState(seed)
    return {
        "router": rs.randn(Dm, E).astype(np.float32),
        "gate": (scale * rs.randn(E, Dm, F // E)).astype(np.float32),
        "up": (scale * rs.randn(E, Dm, F // E)).astype(np.float32),
        "down": (scale * rs.randn(E, F // E, Dm)).astype(np.float32),
    }


def _dense_target(x, seed=1):
    rs = np.random.RandomState(seed)
    g, u, d = (0.3 * rs.randn(*s).astype(np.float32) for s in ((Dm, F), (Dm, F), (F, Dm)))
    return np.asarray(jax.nn.silu(x @ g) * (x @ u) @ d)


def test_training_forward_is_the_model_block_and_passes_the_router_a_gradient():
    cfg = moe_config(
        ModelConfig(
            vocab_size=8, hidden_size=Dm, intermediate_size=F, num_layers=1, num_heads=2, num_kv_heads=1
        ).validate(),
        E,
        2,
    )
    layer = _layer()
    x = np.random.RandomState(2).randn(40, Dm).astype(np.float32)
    want = MoEMLP(cfg, impl="dense").apply({"params": layer}, jnp.asarray(x))
    for st in (True, False):
        y, probs, ids = X.moe_forward(jax.tree.map(jnp.asarray, layer), jnp.asarray(x), 2, straight_through=st)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    t = _dense_target(x)
    g = jax.grad(lambda r: X.rel_err(X.moe_forward({**layer, "router": r}, x, 2)[0], t))(jnp.asarray(layer["router"]))
    assert np.abs(np.asarray(g)).max() > 1e-4  # the straight-through weights carry it
    g0 = jax.grad(lambda r: X.rel_err(X.moe_forward({**layer, "router": r}, x, 2, False)[0], t))(layer["router"])
    assert np.abs(np.asarray(g0)).max() == 0.0  # without them, top-k selection alone passes none


def test_refit_down_solves_a_planted_least_squares():
    layer = _layer()
    x = np.random.RandomState(3).randn(2000, Dm).astype(np.float32)
    planted = _layer(seed=7)["down"]
    t = np.asarray(X.moe_forward({**layer, "down": planted}, x, 2, False)[0])  # same routing, other downs
    assert X.evaluate(layer, x, t, 2)["rel_err"] > 0.5
    fitted = X.refit_down(layer, x, t, 2, ridge=1e-9, chunk=512)
    assert X.evaluate({**layer, "down": fitted}, x, t, 2)["rel_err"] < 1e-3
    # a planted rank-2 change (the asset's delta layout) is found by the rank-2 refit, not by rank 1
    rs = np.random.RandomState(8)
    a, b = (0.3 * rs.randn(E, F // E, 2)).astype(np.float32), rs.randn(2, Dm).astype(np.float32)
    t = np.asarray(X.moe_forward({**layer, "down_a": a, "down_b": b}, x, 2, False)[0])
    errs = {}
    for r in (1, 2):
        fa, fb = X.refit_down(layer, x, t, 2, ridge=1e-9, rank=r, chunk=512)
        assert fa.shape == (E, F // E, r) and fb.shape == (r, Dm)
        errs[r] = X.evaluate(X.effective({**layer, "down_a": fa, "down_b": fb}), x, t, 2)["rel_err"]
    assert errs[2] < 1e-3 < 0.05 < errs[1], errs


@pytest.mark.parametrize(("rank", "steps"), [(0, 0), (0, 150), (2, 150)])
def test_train_layer_lowers_the_held_out_error(rank, steps):
    rs = np.random.RandomState(4)  # inputs in 4 clusters: there is something for a router to find
    x = (2 * rs.randn(4, Dm)[rs.randint(0, 4, 3000)] + rs.randn(3000, Dm)).astype(np.float32)
    t = _dense_target(x)
    rs = np.random.RandomState(1)  # the experts start as the split of the target FFN (_dense_target's)
    g, u, d = (0.3 * rs.randn(*s).astype(np.float32) for s in ((Dm, F), (Dm, F), (F, Dm)))
    layer = dict(zip(("gate", "up", "down"), expert_weights(g, u, d, np.arange(F), E)))
    layer["router"] = 0.1 * rs.randn(Dm, E).astype(np.float32)
    c = X.LayerFit(top_k=2, rank=rank, steps=steps, batch=256, lr=3e-3, router_lr=3e-3)
    fitted, hist = X.train_layer(layer, x[:2500], t[:2500], c)
    before = X.evaluate(layer, x[2500:], t[2500:], 2)["rel_err"]
    after = X.evaluate(X.effective({**layer, **fitted}), x[2500:], t[2500:], 2)["rel_err"]
    closed = X.refit_down(layer, x[:2500], t[:2500], 2, rank=rank)  # the closed form alone, same rank
    closed = {"down": closed} if not rank else dict(zip(("down_a", "down_b"), closed))
    refit = X.evaluate(X.effective({**layer, **closed}), x[2500:], t[2500:], 2)["rel_err"]
    assert after < (0.6 * before if steps else 0.95 * before), (before, after)
    if steps:  # the Adam steps add to the closed-form start
        assert hist[-1][1] < hist[0][1] and after < refit, (refit, after)
    want = {"router", "down"} if not steps else {"router", "gate", "up", "down"}
    if rank:  # deltas only: the split itself is not returned, the delta has the asset's layout
        want = {"router"} | {f"{n}_{x}" for n in ("gate", "up", "down") for x in "ab"}
        assert fitted["gate_a"].shape == (Dm, rank) and fitted["down_a"].shape == (E, F // E, rank)
    assert set(fitted) == want
    with pytest.raises(M2R2Error, match="top_k"):
        X.train_layer(layer, x, t, X.LayerFit(top_k=5))


def _records(n, seed=0):
    rs = np.random.RandomState(seed)
    return [
        {
            "prompt_ids": rs.randint(3, 256, rs.randint(4, 20)).tolist(),
            "answer_ids": rs.randint(3, 256, rs.randint(5, 60)).tolist(),
        }
        for _ in range(n)
    ]


RC = R.RetrainConfig(
    experts=4,
    top_k=2,
    records=48,
    held_out=8,
    tokens_per_layer=1500,
    cluster_tokens=500,
    cluster_iters=4,
    router_steps=20,
    batch_seqs=4,
    rank=2,
    store_dtype="float16",
)


# test_moefy's tiny config, wider (4 experts of 32 neurons), one layer deeper, longer records
TINY = replace(MF.CFG, vocab_size=256, intermediate_size=128, num_layers=3, max_position_embeddings=128).validate()
_dense = MF._dense


def test_retrain_writes_an_asset_that_reproduces_its_stream_and_resumes(tmp_path):
    from m2r2_jax.loading.moefied import moefy_params

    cfg, dense, fp = TINY, _dense(TINY), "0123456789abcdef0123456789abcdef"
    base = {"model": "tiny", "fingerprint": fp}
    recs = _records(50)
    s = R.retrain(cfg, dense, recs, RC, tmp_path / "run", base, progress=False)
    split_err, err = (np.mean([m[k] for m in s["layers"]]) for k in ("held_out_rel_err_split", "held_out_rel_err"))
    assert err < split_err, (split_err, err)  # held-out records: the fit generalises a little even here
    assert all(0 < m["held_out_stream_rel_err"] < 10 for m in s["layers"])  # the residual target's stream error
    perm, router, meta, experts = read_moe_asset(tmp_path / "run" / "asset", cfg, fp)
    assert meta["experts_stored"] == {"kind": "delta", "rank": 2, "dtype": "float16", "weights": ["down"]}
    assert set(experts) == {"down_a", "down_b"} and experts["down_a"].shape == (3, 4, 32, 2)
    assert (meta["experts"], meta["top_k"]) == (4, 2)
    # the model load_moefied builds from the asset is the model the stream was fitted on
    mcfg = moe_config(cfg, 4, 2)
    mparams = jax.tree.map(jnp.asarray, moefy_params(cfg, dense, perm, router, (), experts))
    batches = R.bucket_batches(recs[:48], 4, cfg.max_position_embeddings)
    st = R.Stream(cfg, dense, batches, dense_too=False)
    for i in range(cfg.num_layers):
        parts, nxt = st.parts(i)
        m = dense["layers"][i]["mlp"]
        split = dict(zip(("gate", "up", "down"), expert_weights(m["gate"], m["up"], m["down"], perm[i], 4)))
        st.advance(parts, R.moe_layer(split, {n: v[i] for n, v in {"router": router, **experts}.items()}), 2, nxt)
    b, h = batches[0], st.h[0]
    T = b["tokens"].shape[1]
    got, _, _ = D.forward_hidden(
        mcfg, mparams, jnp.asarray(b["tokens"]), D.init_cache(mcfg, 4, T), jnp.zeros((4,), jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(got)[b["real"]], h[b["real"]], rtol=1e-4, atol=1e-4)
    # an interruption after layer 2: the rerun fits layer 3 again, to the same asset
    shutil.rmtree(tmp_path / "run" / "layers" / "3")
    shutil.rmtree(tmp_path / "run" / "asset")
    s2 = R.retrain(cfg, dense, recs, RC, tmp_path / "run", base, progress=False)
    _, router2, _, experts2 = read_moe_asset(tmp_path / "run" / "asset", cfg, fp)
    np.testing.assert_array_equal(router2, router)
    for n in experts:
        np.testing.assert_allclose(experts2[n], experts[n], rtol=1e-3, atol=1e-3)
    assert s2["layers"][:2] == s["layers"][:2]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]  # every layer logged once
    # calls cut short by the clock: each saves the stream, the next one starts from it
    for done in (1, 2):
        part = R.retrain(cfg, dense, recs, RC, tmp_path / "cut", base, progress=False, max_minutes=1e-9)
        assert part == {"finished": False, "layers_done": done, "minutes_this_call": part["minutes_this_call"]}
        assert (tmp_path / "cut" / "stream" / str(done)).is_dir() and not (tmp_path / "cut" / "asset").exists()
    s3 = R.retrain(cfg, dense, recs, RC, tmp_path / "cut", base, progress=False)
    strip = lambda ms: [{k: round(v, 4) for k, v in m.items() if k != "seconds"} for m in ms]
    assert strip(s3["layers"]) == strip(s["layers"])  # the same fit, layer by layer
    _, router3, _, experts3 = read_moe_asset(tmp_path / "cut" / "asset", cfg, fp)
    np.testing.assert_array_equal(router3, router)
    for n in experts:
        np.testing.assert_allclose(experts3[n], experts[n], rtol=1e-3, atol=1e-3)
    with pytest.raises(M2R2Error, match="another run"):
        R.retrain(
            cfg, dense, recs, R.RetrainConfig(**{**RC.__dict__, "rank": 3}), tmp_path / "run", base, progress=False
        )
    with pytest.raises(M2R2Error, match="fewer than records"):
        R.retrain(cfg, dense, recs[:20], RC, tmp_path / "other", base, progress=False)
