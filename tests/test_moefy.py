"""MoEfication (training/moefy.py, loading/moefied.py) on tiny random configs: the all-experts unit-weight
MoE is the dense model, the clustering is a balanced partition, the router trains, the asset (format /2:
the split alone, full retrained experts or low-rank deltas, float32 / float16 / bfloat16; format /1 still
read) round-trips through Orbax into the alias-style loader, and a bad asset is refused with one line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import (
    DELTA_EINSUM,
    expert_shapes,
    load_moefied,
    moe_config,
    moefy_params,
    read_moe_asset,
    save_moe_asset,
)
from m2r2_jax.model import decoder as D
from m2r2_jax.model.params import ParamSpec, model_spec, params_fingerprint
from m2r2_jax.training import moefy as M

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
).validate()


def _dense(cfg=CFG, seed=0):
    """Random params from the abstract spec (no init compile): weights N(0, 0.2^2), norms around 1."""
    rs = np.random.RandomState(seed)

    def leaf(s):
        a = rs.randn(*s.shape).astype(np.float32)
        return 1.0 + 0.1 * a if len(s.shape) == 1 else 0.2 * a

    return jax.tree.map(leaf, model_spec(cfg), is_leaf=lambda s: isinstance(s, ParamSpec))


def _random_asset(cfg, E, seed=0):
    rs = np.random.RandomState(seed)
    perm = np.stack([rs.permutation(cfg.intermediate_size) for _ in range(cfg.num_layers)]).astype(np.int32)
    return perm, rs.randn(cfg.num_layers, cfg.hidden_size, E).astype(np.float32)


def _logits(cfg, params, tokens):
    B, T = tokens.shape
    run = jax.jit(lambda p, t: D.forward(cfg, p, t, D.init_cache(cfg, B, T), jnp.zeros((B,), jnp.int32))[0])
    return np.asarray(run(params, tokens))


def test_all_experts_unit_weight_moe_is_the_dense_model():
    from m2r2_jax.model.mlp import DenseMLP
    from m2r2_jax.model.moe import MoEMLP

    dense = _dense()
    perm, router = _random_asset(CFG, 4)
    moe = jax.tree.map(jnp.asarray, moefy_params(CFG, dense, perm, router))
    full = moe_config(CFG, 4, 4)
    assert (full.router, full.moe_intermediate_size) == ("topk_unit", 12)
    # the FFN alone, on random inputs: all 4 experts at weight 1 = the dense FFN; top-2 is not (not vacuous)
    x = jnp.asarray(np.random.RandomState(2).randn(3, 5, 32), jnp.float32)
    y = DenseMLP(CFG).apply({"params": dense["layers"][0]["mlp"]}, x)
    block = jax.jit(lambda c, i, p, x: MoEMLP(c, impl=i).apply({"params": p}, x), static_argnums=(0, 1))
    for impl in ("ragged", "dense"):
        np.testing.assert_allclose(block(full, impl, moe["layers"][0]["mlp"], x), y, rtol=1e-5, atol=1e-5)
    assert np.abs(block(moe_config(CFG, 4, 2), "dense", moe["layers"][0]["mlp"], x) - y).max() > 1e-2
    # and the whole model's logits
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 64, (2, 7)), jnp.int32)
    want = _logits(CFG, jax.tree.map(jnp.asarray, dense), tokens)
    np.testing.assert_allclose(_logits(full, moe, tokens), want, rtol=1e-5, atol=1e-5)


def test_balanced_kmeans_partitions_every_neuron_once_and_finds_planted_groups():
    rs = np.random.RandomState(0)
    E, per, M_ = 4, 12, 40
    centers = rs.rand(E, M_) ** 4  # sparse-ish nonnegative co-activation patterns
    truth = rs.permutation(np.repeat(np.arange(E), per))
    prof = centers[truth] + 0.05 * rs.rand(E * per, M_)
    prof /= np.linalg.norm(prof, axis=1, keepdims=True)
    assign = M.balanced_kmeans(prof, E, iters=10, seed=0)
    assert np.bincount(assign, minlength=E).tolist() == [per] * E
    perm = M.assignment_perm(assign, E)
    assert sorted(perm.tolist()) == list(range(E * per))  # every neuron exactly once
    for e in range(E):  # each expert is one planted group
        assert len(set(truth[perm[e * per : (e + 1) * per]].tolist())) == 1
    with pytest.raises(M2R2Error, match="unbalanced"):
        M.assignment_perm(np.array([0, 0, 0, 1]), 2)


def test_refine_partition_moves_neurons_to_the_experts_tokens_pick():
    rs = np.random.RandomState(1)
    E, per, N, k = 4, 6, 400, 1
    truth = rs.permutation(np.repeat(np.arange(E), per))
    group = rs.randint(0, E, N)  # each token's mass sits on one planted group's neurons
    mass = 0.02 * rs.rand(N, E * per) + (truth[None, :] == group[:, None])
    mass /= mass.sum(1, keepdims=True)
    start = rs.permutation(np.repeat(np.arange(E), per))  # a balanced partition unrelated to the groups

    def captured(assign):  # mean share of a token's mass in its best k experts
        em = np.stack([mass[:, assign == e].sum(1) for e in range(E)], 1)
        return float(np.sort(em, 1)[:, -k:].sum(1).mean())

    got = M.refine_partition(mass, start, E, k, iters=10)
    assert np.bincount(got, minlength=E).tolist() == [per] * E  # still equal experts
    assert captured(start) < 0.6 < 0.95 < captured(got), (captured(start), captured(got))
    for e in range(E):  # each expert is one planted group
        assert len(set(truth[got == e].tolist())) == 1


def test_router_loss_falls_on_synthetic_shares():
    rs = np.random.RandomState(0)
    L, N, Dm, E = 2, 512, 16, 4
    x = rs.randn(L, N, Dm).astype(np.float32)
    t = np.asarray(jax.nn.softmax(np.einsum("lnd,lde->lne", x, rs.randn(L, Dm, E)), -1), np.float32)
    w, hist = M.train_routers(x, t, steps=120, batch=128, lr=3e-2, progress=False)
    assert w.shape == (L, Dm, E) and hist[-1][1] < 0.8 * hist[0][1]
    assert (np.argmax(np.einsum("lnd,lde->lne", x, w), -1) == np.argmax(t, -1)).mean() > 0.8


def _hf_base(tiny_llama_dir):
    from m2r2_jax.loading import registry as R

    cfg, dense = R._read(*R.resolve(str(tiny_llama_dir)))
    return cfg, dense, params_fingerprint(dense, as_dtype="float32")


def _experts(cfg, E, kind, rank=0, seed=5):
    rs = np.random.RandomState(seed)
    return {n: (0.1 * rs.randn(*s)).astype(np.float32) for n, s in expert_shapes(cfg, E, kind, rank).items()}


def test_asset_round_trip_and_alias_loader(tiny_llama_dir, tmp_path, monkeypatch):
    cfg, dense, fp = _hf_base(tiny_llama_dir)
    perm, router = _random_asset(cfg, 4, seed=3)
    meta = {"base": {"fingerprint": fp}, "experts": 4, "top_k": 2}
    save_moe_asset(tmp_path / "a", perm, router, meta)
    p2, r2, meta2, ex = read_moe_asset(tmp_path / "a", cfg, fp)
    np.testing.assert_array_equal(p2, perm)
    np.testing.assert_array_equal(r2, router)
    assert ex == {} and meta2["format"] == "m2r2-moefied/2" and meta2["experts_stored"]["kind"] == "split"
    from m2r2_jax.loading import registry as R

    monkeypatch.setitem(R.DERIVED, "tiny-moe", (str(tiny_llama_dir), str(tmp_path / "a")))
    m = R.load_model("tiny-moe", tokenizer=False)  # as the alias smollm2-135m-moe loads
    assert (m.cfg.mlp_type, m.cfg.num_experts, m.cfg.experts_per_token, m.cfg.router) == ("moe", 4, 2, "topk_unit")
    assert m.derived_from == str(tiny_llama_dir) and m.fingerprint not in ("", fp)
    want = moefy_params(cfg, dense, perm, router)
    assert jax.tree.structure(m.params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(m.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert load_moefied(str(tiny_llama_dir), tmp_path / "a", top_k=4, tokenizer=False).cfg.experts_per_token == 4
    # format /1 (perm + router, no experts record) is still read, as the split
    meta1 = json.loads((tmp_path / "a" / "0" / "meta" / "metadata").read_text())
    meta1["format"] = "m2r2-moefied/1"
    del meta1["experts_stored"]
    (tmp_path / "a" / "0" / "meta" / "metadata").write_text(json.dumps(meta1))
    m1 = load_moefied(str(tiny_llama_dir), tmp_path / "a", tokenizer=False)
    for a, b in zip(jax.tree.leaves(m1.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize(("kind", "dtype"), [("full", "float32"), ("full", "bfloat16"), ("delta", "float16")])
def test_asset_with_experts_round_trip(tiny_llama_dir, tmp_path, kind, dtype):
    import ml_dtypes

    cfg, dense, fp = _hf_base(tiny_llama_dir)
    E, rank = 4, 3
    perm, router = _random_asset(cfg, E, seed=3)
    experts = _experts(cfg, E, kind, rank)
    meta = {"base": {"fingerprint": fp}, "experts": E, "top_k": 2}
    save_moe_asset(tmp_path / "a", perm, router, meta, experts, dtype)
    _, _, meta2, ex = read_moe_asset(tmp_path / "a", cfg, fp)
    rec = {"kind": kind, "rank": rank if kind == "delta" else 0, "dtype": dtype, "weights": ["gate", "up", "down"]}
    assert meta2["experts_stored"] == rec
    store = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    rounded = {n: v.astype(store).astype(np.float32) for n, v in experts.items()}
    assert set(ex) == set(experts)
    for n in experts:  # exactly the stored (rounded) values, widened to float32
        np.testing.assert_array_equal(ex[n], rounded[n])
        assert dtype == "float32" or not np.array_equal(ex[n], experts[n])  # the rounding is real
    m = load_moefied(str(tiny_llama_dir), tmp_path / "a", tokenizer=False)
    split = moefy_params(cfg, dense, perm, router)
    for i in range(cfg.num_layers):
        got, base = m.params["layers"][i]["mlp"], split["layers"][i]["mlp"]
        np.testing.assert_array_equal(np.asarray(got["router"]), router[i])
        for n in ("gate", "up", "down"):
            if kind == "full":
                want = rounded[n][i]
            else:
                want = base[n] + np.einsum(DELTA_EINSUM[n], rounded[f"{n}_a"][i], rounded[f"{n}_b"][i])
            np.testing.assert_allclose(np.asarray(got[n]), want, rtol=1e-6, atol=1e-7)
            assert np.abs(np.asarray(got[n]) - base[n]).max() > 1e-3  # the experts did change
    # the disk holds the storage dtype: a bfloat16 asset is about half a float32 one
    if dtype != "float32":
        size = sum(f.stat().st_size for f in (tmp_path / "a").rglob("*") if f.is_file())
        save_moe_asset(tmp_path / "f32", perm, router, meta, experts, "float32")
        size32 = sum(f.stat().st_size for f in (tmp_path / "f32").rglob("*") if f.is_file())
        assert size < 0.8 * size32, (size, size32)


def test_shipped_assets_are_what_the_aliases_name():
    """The assets under m2r2_jax/assets that the MoEfied aliases load: the retrained 16 x 96 top-4 one
    (float16 rank-128 down-projection deltas) and the earlier 8 x 192 top-6 split; both for the same base."""
    from m2r2_jax.loading import registry as R
    from m2r2_jax.loading.moefied import asset_path, read_moe_meta, stored_experts

    metas = {alias: read_moe_meta(asset_path(asset)) for alias, (_, asset) in R.DERIVED.items()}
    moe, moe8 = metas["smollm2-135m-moe"], metas["smollm2-135m-moe8"]
    assert (moe["experts"], moe["top_k"], moe["format"]) == (16, 4, "m2r2-moefied/2")
    assert stored_experts(moe) == {"kind": "delta", "rank": 128, "dtype": "float16", "weights": ["down"]}
    assert (moe8["experts"], moe8["top_k"], stored_experts(moe8)["kind"]) == (8, 6, "split")
    assert {m["base"]["fingerprint"] for m in metas.values()} == {moe["base"]["fingerprint"]}
    assert {base for base, _ in R.DERIVED.values()} == {moe["base"]["model"]}


def test_bad_asset_is_refused_with_one_line(tiny_llama_dir, tmp_path):
    cfg, _, fp = _hf_base(tiny_llama_dir)
    perm, router = _random_asset(cfg, 4)
    meta = {"base": {"fingerprint": fp}, "experts": 4, "top_k": 2}
    cases = {}
    bad = perm.copy()
    bad[1, 0] = bad[1, 1]  # a neuron twice, another never
    save_moe_asset(tmp_path / "dup", bad, router, meta)
    cases["dup"] = "not a permutation"
    save_moe_asset(tmp_path / "other", perm, router, {**meta, "base": {"fingerprint": "0" * 32}})
    cases["other"] = "another base model"
    save_moe_asset(tmp_path / "json", perm, router, meta)
    (tmp_path / "json" / "0" / "meta" / "metadata").write_text("{not json")
    cases["json"] = "corrupt MoE asset metadata"
    save_moe_asset(tmp_path / "data", perm, router, meta)
    shutil.rmtree(tmp_path / "data" / "0" / "moe")
    cases["data"] = "cannot restore the MoE asset"
    save_moe_asset(tmp_path / "shape", perm, router[:, :, :2], meta)  # meta says 4 experts
    cases["shape"] = r"router \(3, 64, 2\).*expected"
    save_moe_asset(tmp_path / "bytes", perm, router, meta)
    for f in (tmp_path / "bytes" / "0" / "moe").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0garbage" * 8)  # the array data damaged on disk
    cases["bytes"] = "cannot restore the MoE asset"
    cases["missing"] = "MoE asset not found"
    save_moe_asset(tmp_path / "kind", perm, router, meta)
    f = tmp_path / "kind" / "0" / "meta" / "metadata"
    f.write_text(json.dumps({**json.loads(f.read_text()), "experts_stored": {"kind": "lora", "rank": 0, "dtype": "x"}}))
    cases["kind"] = "experts_stored"
    nan = _experts(cfg, 4, "full")
    nan["up"][1, 0, 0, 0] = np.nan
    save_moe_asset(tmp_path / "nan", perm, router, meta, nan, "float16")
    cases["nan"] = "non-finite"
    short = _experts(cfg, 4, "delta", 2)  # the record says rank 2; a tensor of rank 1 written
    save_moe_asset(tmp_path / "rank", perm, router, meta, short)
    f = tmp_path / "rank" / "0" / "meta" / "metadata"
    f.write_text(
        json.dumps(
            {**json.loads(f.read_text()), "experts_stored": {**json.loads(f.read_text())["experts_stored"], "rank": 3}}
        )
    )
    cases["rank"] = "cannot restore the MoE asset|expert tensor"
    for name, msg in cases.items():
        with pytest.raises(M2R2Error, match=msg) as e:
            load_moefied(str(tiny_llama_dir), tmp_path / name, tokenizer=False)
        assert "\n" not in str(e.value), (name, str(e.value))
    json.loads((tmp_path / "dup" / "0" / "meta" / "metadata").read_text())  # the metadata itself was fine
    with pytest.raises(M2R2Error, match="expected"):  # an incomplete set of expert tensors is not written
        save_moe_asset(tmp_path / "partial", perm, router, meta, {"down_a": _experts(cfg, 4, "delta", 2)["down_a"]})
    assert not (tmp_path / "partial").exists()


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--retrain", "--e2e"], "two steps"),
        (["--retrain", "--max-minutes", "0"], "--max-minutes"),
        (["--retrain", "--install", "../elsewhere"], "plain name"),
        (["--retrain", "--experts", "16", "--top-k", "17"], "--top-k 17"),
        (["--retrain", "--records", "8", "--held-out-records", "8"], "held_out=8"),
        (["--e2e"], "needs --asset"),
        (["--e2e", "--asset", "ASSET", "--save-minutes", "11"], "--save-minutes"),
        (["--e2e", "--asset", "ASSET"], "MoE asset not found"),
    ],
)
def test_moefy_cli_refuses_bad_input_before_loading(tmp_path, monkeypatch, argv, msg):
    from m2r2_jax.loading import registry as R
    from train.moefy import main

    def no_load(*a, **k):  # every one of these is refused before a model is read
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(R, "load_model", no_load)
    argv = [str(tmp_path / "missing") if v == "ASSET" else v for v in argv]
    with pytest.raises(M2R2Error, match=msg) as e:
        main([*argv, "--distill-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # nothing written
