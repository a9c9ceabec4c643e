"""MoEfication (training/moefy.py, loading/moefied.py) on tiny random configs: the all-experts unit-weight
MoE is the dense model, the clustering is a balanced partition, the router trains, the asset
round-trips through Orbax into the alias-style loader, and a bad asset is refused with one line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import load_moefied, moe_config, moefy_params, read_moe_asset, save_moe_asset
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


def test_asset_round_trip_and_alias_loader(tiny_llama_dir, tmp_path, monkeypatch):
    cfg, dense, fp = _hf_base(tiny_llama_dir)
    perm, router = _random_asset(cfg, 4, seed=3)
    save_moe_asset(tmp_path / "a", perm, router, {"base": {"fingerprint": fp}, "experts": 4, "top_k": 2})
    p2, r2, meta = read_moe_asset(tmp_path / "a", cfg, fp)
    np.testing.assert_array_equal(p2, perm)
    np.testing.assert_array_equal(r2, router)
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
    for name, msg in cases.items():
        with pytest.raises(M2R2Error, match=msg) as e:
            load_moefied(str(tiny_llama_dir), tmp_path / name, tokenizer=False)
        assert "\n" not in str(e.value), (name, str(e.value))
    json.loads((tmp_path / "dup" / "0" / "meta" / "metadata").read_text())  # the metadata itself was fine
