"""The Flax modules: their params and logical axes, the decoder's exit-policy seam, and the shipped
M2R2 checkpoint through the modules against values computed before the modules existed."""

import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.backend import XLA
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.modules import M2R2
from m2r2_jax.m2r2.params import init_m2r2, m2r2_spec
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.modules import Attention, DecoderLayer, ExitPolicy
from m2r2_jax.model.params import init_model, logical_axes, model_spec, module_tree, plain_tree

GOLDEN = Path(__file__).parent / "data" / "shipped_checkpoint_golden.json"


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params)


def test_params_carry_logical_axes(tiny):
    cfg, base = tiny
    spec = model_spec(cfg)
    assert logical_axes(spec)["layers"][1]["attn"]["wq"] == ("embed", "heads")
    assert logical_axes(spec)["embed"] == ("vocab", "embed")
    assert jax.tree.structure(
        jax.tree.map(lambda x: 0, spec, is_leaf=lambda x: hasattr(x, "axes"))
    ) == jax.tree.structure(jax.tree.map(lambda x: 0, base))
    boxed = jax.eval_shape(
        lambda: M2R2(cfg, M2R2Config(rate=1, rank=4, router_dim=8)).init(jax.random.key(0), method="declare")
    )
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["fast"]["0"]["q"]["a"]) == ("embed", "rank")
    assert tuple(specs["router"]["w_out"]) == ("router", None)
    mc = M2R2Config(rate=1, rank=4, router_dim=8)
    assert logical_axes(m2r2_spec(cfg, mc))["fast"][0]["gate"]["b"] == ("rank", "mlp")
    # the list layout <-> Flax's string-keyed children: a re-keying of the same leaves
    m = init_m2r2(cfg, mc, jax.random.key(0))
    assert plain_tree(module_tree(m)) == m and isinstance(module_tree(m)["fast"], dict)


def test_random_init_from_the_modules(tiny):
    cfg, _ = tiny
    p = init_model(cfg, jax.random.key(0))
    assert float(jnp.std(p["layers"][0]["mlp"]["gate"])) == pytest.approx(0.02, rel=0.1)
    assert bool(jnp.all(p["final_norm"] == 1.0))
    mc = M2R2Config(rate=1, rank=4, router_dim=8)
    m = init_m2r2(cfg, mc, jax.random.key(1))
    assert all(bool(jnp.all(ad[t]["b"] == 0)) for ad in m["fast"] for t in mc.targets)
    assert all(bool(jnp.all(ad["gain_attn"] == 1)) for ad in m["fast"])


class ExitAfter(ExitPolicy):
    """Every token whose row index is in `rows` exits after layer `layer`."""

    def __init__(self, layer, rows):
        self.exit_layers, self.rows = (layer,), rows

    def decide(self, layer, h):
        return jnp.broadcast_to(jnp.isin(jnp.arange(h.shape[0]), jnp.asarray(self.rows))[:, None], h.shape[:2])


def _reference_exit(cfg, params, tokens, exit_after):
    """Plain-Python reference of state propagation: run the layers one by one over the whole
    sequence; after `exit_after` the token's state stays, and each later layer still writes the K/V
    of that frozen state (what a later token reads)."""
    T = tokens.shape[1]
    cos, sin = L.rope_cos_sin(cfg, jnp.arange(T)[None])
    h = D.embed(cfg, params, tokens)
    kv = []
    for i in range(cfg.num_layers):
        lp = params["layers"][i]
        x = L.rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
        k, v = Attention(cfg).apply({"params": lp["attn"]}, x, cos, sin, method="project_kv")
        kv.append((k, v))
        if i >= exit_after:  # frozen: only the K/V of this layer are computed from it
            continue
        empty = D.KVCache([jnp.zeros_like(k)], [jnp.zeros_like(v)])
        attend = D.cache_attention_for(cfg, XLA, empty, jnp.zeros((1,), jnp.int32), T, None)(0)
        h, _ = DecoderLayer(cfg).apply({"params": lp}, h, cos, sin, attend)
    return h, kv


def test_exit_policy_seam(tiny):
    """No exit: the plain forward. Rows that exit after layer 0: their state is the one after layer 0
    and the later layers' cache holds the K/V computed from it (CALM's state propagation), as the
    plain-Python reference builds it; the other row is untouched."""
    cfg, base = tiny
    toks = jnp.asarray(np.random.RandomState(0).randint(3, 256, (2, 7)), jnp.int32)
    start = jnp.zeros((2,), jnp.int32)
    h0, c0, _ = D.forward_hidden(cfg, base, toks, D.init_cache(cfg, 2, 8), start)
    h1, c1, at = D.forward_exit(cfg, base, toks, D.init_cache(cfg, 2, 8), start, ExitPolicy())
    assert np.array_equal(np.asarray(h0), np.asarray(h1)) and bool(jnp.all(at == cfg.num_layers))
    h2, c2, at2 = D.forward_exit(cfg, base, toks, D.init_cache(cfg, 2, 8), start, ExitAfter(0, [1]))
    assert np.asarray(at2).tolist() == [[cfg.num_layers] * 7, [1] * 7]
    np.testing.assert_allclose(np.asarray(h2[0]), np.asarray(h0[0]), atol=1e-6)
    ref_h, ref_kv = _reference_exit(cfg, base, toks[1:], exit_after=1)
    np.testing.assert_allclose(np.asarray(h2[1]), np.asarray(ref_h[0]), atol=1e-5)
    for i in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(c2.k[i][1, :, :7]), np.asarray(ref_kv[i][0][0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(c2.v[i][1, :, :7]), np.asarray(ref_kv[i][1][0]), atol=1e-5)
    # row 0 did not exit: its cache is the plain forward's
    np.testing.assert_allclose(np.asarray(c2.k[2][0]), np.asarray(c0.k[2][0]), atol=1e-6)


@pytest.mark.slow
def test_shipped_checkpoint_matches_values_before_the_modules(smol):
    """The shipped checkpoint loads unchanged (same tree paths) and the module code computes what the
    pre-module functions computed (tests/data/shipped_checkpoint_golden.json, made at 746ae92): the
    fast stream's top-5 logits, its draft-vocabulary argmax and the ARLA router's logits."""
    from m2r2_jax.m2r2 import stream as S
    from m2r2_jax.training.checkpoint import load_m2r2

    g = json.loads(GOLDEN.read_text())
    ck = Path(__file__).resolve().parents[1] / "m2r2_jax" / "assets" / "smollm2-135m-r3"
    mc, m2r2, draft_ids, _ = load_m2r2(ck, smol.cfg, smol.params, "smollm2-135m", base_fingerprint=smol.fingerprint)
    assert smol.fingerprint == g["fingerprint"]
    toks = jnp.asarray([g["tokens"]], jnp.int32)
    slow = S.slow_pass(smol.cfg, smol.params, toks)
    hs = S.fast_train_pass(smol.cfg, mc, smol.params, m2r2, toks, slow)
    lg = np.asarray(S.draft_logits(smol.cfg, smol.params, hs[-1], None)[0])
    top = np.asarray(g["top5_ids"])
    assert (np.argsort(-lg, -1)[:, :1] == top[:, :1]).all()
    np.testing.assert_allclose(np.take_along_axis(lg, top, -1), np.asarray(g["top5_logits"]), atol=2e-4, rtol=1e-5)
    dl = S.draft_logits(smol.cfg, smol.params, hs[-1], jnp.asarray(draft_ids))[0]
    assert np.asarray(jnp.argmax(dl, -1)).tolist() == g["draft_vocab_argmax"]
    r = S.arla_router(smol.cfg, mc, m2r2["router"], hs, slow.hiddens[mc.branch])[0]
    np.testing.assert_allclose(np.asarray(r), np.asarray(g["router_logits"]), atol=2e-4, rtol=1e-4)
