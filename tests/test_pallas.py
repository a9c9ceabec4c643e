"""The Pallas tree-verification attention (kernels/pallas_attention.py), run in interpret mode on the CPU:
against a plain-numpy joint softmax, inside the decoder (equal to XLA's attention), and in the
speculative loop (lossless)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.kernels.pallas_attention import tree_attention
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.model import decoder as D

PALLAS_CPU = Backend("pallas", interpret=True)


def _reference(q, kc, vc, plen, kl, vl, lm):
    B, T, H, hd = q.shape
    G = H // kc.shape[1]
    out = np.zeros((B, T, H, hd))
    for b in range(B):
        for t in range(T):
            for h in range(H):
                k = h // G
                keys = np.concatenate([kc[b, k, : plen[b]], kl[b, k][lm[t]]])
                vals = np.concatenate([vc[b, k, : plen[b]], vl[b, k][lm[t]]])
                s = keys @ q[b, t, h] / np.sqrt(hd)
                p = np.exp(s - s.max())
                out[b, t, h] = (p / p.sum()) @ vals
    return out.reshape(B, T, H * hd)


@pytest.mark.parametrize("T,G,plen", [(1, 3, (100, 7)), (5, 2, (256, 0)), (16, 1, (129, 128))])
def test_tree_attention_matches_numpy(T, G, plen):
    rs = np.random.RandomState(T)
    B, KV, hd, S = 2, 2, 64, 256
    H = KV * G
    q = rs.randn(B, T, H, hd).astype(np.float32)
    kc, vc = rs.randn(B, KV, S, hd).astype(np.float32), rs.randn(B, KV, S, hd).astype(np.float32)
    kl, vl = rs.randn(B, KV, T, hd).astype(np.float32), rs.randn(B, KV, T, hd).astype(np.float32)
    lm = np.tril(np.ones((T, T), bool))
    if T > 3:
        lm[3, 1] = False  # a tree: node 3 does not see node 1
    got = tree_attention(*map(jnp.asarray, (q, kc, vc, np.asarray(plen, np.int32), kl, vl, lm)), interpret=True)
    np.testing.assert_allclose(np.asarray(got), _reference(q, kc, vc, plen, kl, vl, lm), rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params)


def test_decoder_forward_with_pallas_attention_equals_xla(tiny):
    """Prefill, then a draft-tree block over the cache, per-row starts: the Pallas backend's logits and
    cache equal XLA's."""
    from m2r2_jax.decoding.trees import get_tree

    cfg, base = tiny
    rs = np.random.RandomState(1)
    toks = jnp.asarray(rs.randint(3, 256, (2, 12)), jnp.int32)
    start = jnp.zeros((2,), jnp.int32)
    want, cw = D.forward(cfg, base, toks, D.init_cache(cfg, 2, 128), start)
    got, cg = D.forward(cfg, base, toks, D.init_cache(cfg, 2, 128), start, backend=PALLAS_CPU)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    local = jnp.asarray(get_tree("tree16").ancestor_mask)
    t2 = jnp.asarray(rs.randint(3, 256, (2, 16)), jnp.int32)
    s2 = jnp.asarray([12, 7], jnp.int32)
    want2, _ = D.forward(cfg, base, t2, cw, s2, local_mask=local)
    got2, _ = D.forward(cfg, base, t2, cg, s2, local_mask=local, backend=PALLAS_CPU)
    np.testing.assert_allclose(np.asarray(got2), np.asarray(want2), rtol=1e-4, atol=1e-4)


def test_speculative_lossless_with_pallas_attention(tiny):
    from m2r2_jax.decoding.drafters import DraftOptions
    from m2r2_jax.decoding.generate import GenerateConfig, Generator
    from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
    from m2r2_jax.m2r2.config import M2R2Config
    from m2r2_jax.m2r2.params import init_m2r2

    cfg, base = tiny
    mc = M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8).validate(cfg.num_layers)
    m2r2 = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if getattr(p[-1], "key", "") == "b" else x
        ),
        init_m2r2(cfg, mc, jax.random.key(3)),
    )
    prompts = [[5, 6, 7, 8, 5, 6, 7], [40, 41, 42]]
    ar = Generator(cfg, backend=XLA).generate(base, prompts, GenerateConfig(max_new_tokens=12, stop_ids=(-1,)))
    spec = SpeculativeDecoder(
        cfg, DraftOptions(tree="star3", lookup=3, lookup_min_ngram=1).drafter(cfg, mc, PALLAS_CPU), PALLAS_CPU
    )
    r = spec.generate(
        base,
        spec.prepare(base, m2r2, np.arange(cfg.vocab_size, dtype=np.int32)),
        prompts,
        SpecConfig(max_new_tokens=12, stop_ids=(-1,)),
    )
    assert r.new_ids == ar.new_ids and sum(r.accepted) > 0


def test_sharded_over_a_mesh_equals_one_device():
    """On a mesh the kernel runs per shard (batch rows over data x fsdp, KV heads with their query heads
    over tensor), with the same result; the axes are the rule table's."""
    from m2r2_jax.kernels.pallas_attention import sharded_tree_attention
    from m2r2_jax.sharding import RULES, MeshConfig, make_mesh

    assert RULES["batch"] == RULES["cache_batch"] == ("data", "fsdp")
    assert RULES["heads"] == RULES["kv_heads"] == RULES["cache_heads"] == "tensor"
    rs = np.random.RandomState(7)
    B, T, KV, G, hd, S = 4, 3, 2, 2, 16, 256
    q = rs.randn(B, T, KV * G, hd).astype(np.float32)
    kc, vc = rs.randn(B, KV, S, hd).astype(np.float32), rs.randn(B, KV, S, hd).astype(np.float32)
    kl, vl = rs.randn(B, KV, T, hd).astype(np.float32), rs.randn(B, KV, T, hd).astype(np.float32)
    plen = np.array([200, 3, 129, 0], np.int32)
    lm = np.tril(np.ones((T, T), bool))
    args = tuple(map(jnp.asarray, (q, kc, vc, plen, kl, vl, lm)))
    ref = np.asarray(tree_attention(*args, interpret=True))
    for mc in (MeshConfig(data=2, fsdp=1, tensor=2), MeshConfig(data=1, fsdp=2, tensor=1)):
        got = jax.jit(sharded_tree_attention(make_mesh(mc), interpret=True))(*args)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)
