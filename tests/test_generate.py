"""The jitted generator: HF greedy parity, batching, buckets, sampling, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params)


def _prompts(n, lo=3, hi=30, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 256, rs.randint(lo, hi)).tolist() for _ in range(n)]


def test_greedy_matches_hf_generate(tiny, tiny_llama_dir):
    import transformers as tf

    cfg, params = tiny
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    gen = Generator(cfg)
    for p in _prompts(3):
        ours = gen.generate(params, [p], GenerateConfig(max_new_tokens=24, stop_ids=(-1,))).new_ids[0]
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(p) :
            ].tolist()
        assert ours == ref


def test_batched_equals_one_by_one(tiny):
    cfg, params = tiny
    gen = Generator(cfg)
    prompts = _prompts(4, seed=3)
    g = GenerateConfig(max_new_tokens=16, stop_ids=(-1,))
    batched = gen.generate(params, prompts, g).new_ids
    single = [gen.generate(params, [p], g).new_ids[0] for p in prompts]
    assert batched == single


def test_no_recompile_within_bucket(tiny):
    cfg, params = tiny
    gen = Generator(cfg)
    g = GenerateConfig(max_new_tokens=8)
    gen.generate(params, [[5, 6, 7]], g)
    assert gen.compiles == 1
    r = gen.generate(params, [list(range(10, 22))], g)  # 12 tokens: same 16-bucket
    assert gen.compiles == 1 and r.compile_seconds == 0.0
    gen.generate(params, [list(range(10, 40))], g)  # 30 tokens: next bucket
    assert gen.compiles == 2


def test_eos_stops_generation(tiny):
    cfg, params = tiny
    gen = Generator(cfg)
    full = gen.generate(params, [[5, 6, 7]], GenerateConfig(max_new_tokens=12, stop_ids=(-1,))).new_ids[0]
    stop = full[4]
    cut = gen.generate(params, [[5, 6, 7]], GenerateConfig(max_new_tokens=12, stop_ids=(stop,))).new_ids[0]
    assert cut == full[: full.index(stop) + 1]


def test_sampling_seeded_and_filters(tiny):
    cfg, params = tiny
    gen = Generator(cfg)
    mk = lambda seed, **kw: GenerateConfig(
        max_new_tokens=16, stop_ids=(-1,), sampling=SamplingConfig(temperature=1.0, seed=seed, **kw)
    )
    a = gen.generate(params, [[5, 6, 7]], mk(1)).new_ids[0]
    b = gen.generate(params, [[5, 6, 7]], mk(1)).new_ids[0]
    c = gen.generate(params, [[5, 6, 7]], mk(2)).new_ids[0]
    assert a == b and a != c
    # top_k=1 is greedy whatever the seed
    greedy = gen.generate(params, [[5, 6, 7]], GenerateConfig(max_new_tokens=16, stop_ids=(-1,))).new_ids[0]
    assert gen.generate(params, [[5, 6, 7]], mk(3, top_k=1)).new_ids[0] == greedy
    # a tiny top_p keeps only the most likely token
    assert gen.generate(params, [[5, 6, 7]], mk(4, top_p=1e-6)).new_ids[0] == greedy


def test_sampling_distribution_matches_softmax():
    from m2r2_jax.decoding.sampling import select

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: select(logits, k, False, 1.0, 0, 1.0)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # top_p=0.7 keeps {0.5, 0.3} renormalised
    draws = jax.vmap(lambda k: select(logits, k, False, 1.0, 0, 0.7)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.625, 0.375, 0, 0], atol=0.03)


def test_prompt_longer_than_cache(tiny):
    cfg, params = tiny
    with pytest.raises(M2R2Error, match="longer than the cache length 32"):
        Generator(cfg).generate(params, [list(range(3, 30))], GenerateConfig(max_new_tokens=8, cache_len=32))
    with pytest.raises(M2R2Error, match="exceeds the model's context"):
        Generator(cfg).generate(params, [[3] * 500], GenerateConfig(max_new_tokens=64))


def test_decode_block_same_tokens_and_checked(tiny):
    """block > 1 runs each step over the token + padding slots: same greedy tokens, cache sized for it."""
    cfg, params = tiny
    gen = Generator(cfg)
    prompts = _prompts(3, seed=4)
    plain = gen.generate(params, prompts, GenerateConfig(max_new_tokens=12, stop_ids=(-1,))).new_ids
    blocked = gen.generate(params, prompts, GenerateConfig(max_new_tokens=12, stop_ids=(-1,), block=4)).new_ids
    assert blocked == plain
    with pytest.raises(M2R2Error, match="block must be an integer >= 1"):
        GenerateConfig(max_new_tokens=4, block=0)
    # the padding slots need room: 20 + 10 + 3 > 32
    with pytest.raises(M2R2Error, match="needs a cache of 33"):
        gen.generate(params, [list(range(3, 23))], GenerateConfig(max_new_tokens=10, cache_len=32, block=4))


def test_bf16_matmul_rows_padded_same_result():
    """A one-row bf16 product is padded to MIN_MM_ROWS rows (XLA:CPU's one-row bf16 path is slow);
    the row's result is the unpadded product's up to f32 accumulation order."""
    from m2r2_jax.model import layers as L

    rs = np.random.RandomState(0)
    w = jnp.asarray(rs.randn(64, 96), jnp.bfloat16)
    x = jnp.asarray(rs.randn(1, 64), jnp.float32)
    ref = np.asarray(x.astype(jnp.bfloat16), np.float32) @ np.asarray(w, np.float32)
    y = L.matmul(x, w, jnp.dtype(jnp.bfloat16))
    assert y.shape == (1, 96) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    x3 = jnp.asarray(rs.randn(1, 1, 64), jnp.float32)
    lg = L.rows_logits(x3, w.T, jnp.dtype(jnp.bfloat16))
    assert lg.shape == (1, 1, 96)
    np.testing.assert_allclose(
        np.asarray(lg[0]),
        np.asarray(x3[0].astype(jnp.bfloat16), np.float32) @ np.asarray(w, np.float32),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_dtype_refused(tiny):
    import dataclasses

    cfg, _ = tiny
    for k, v in (("matmul_dtype", "float9"), ("param_dtype", "int8"), ("dtype", "")):
        with pytest.raises(M2R2Error, match=f"{k}="):
            dataclasses.replace(cfg, **{k: v}).validate()
    assert dataclasses.replace(cfg, matmul_dtype="").validate().mm_dtype is None


def test_chunked_prefill_equals_one_block(tiny, tiny_llama_dir):
    """Prompts in a bucket larger than PREFILL_CHUNK are prefilled chunk by chunk, up to the longest
    prompt only: same logits and cache as one block over the whole bucket, and generation still
    matches HF for a prompt that spans several chunks."""
    import transformers as tf

    from m2r2_jax import kernels as K
    from m2r2_jax.backend import CPU_KERNELS, XLA
    from m2r2_jax.decoding.generate import PREFILL_CHUNK, pad_prompts, prefill
    from m2r2_jax.model import decoder as D

    cfg, params = tiny
    rs = np.random.RandomState(3)
    lens = [PREFILL_CHUNK + 9, 2 * PREFILL_CHUNK + 5]  # bucket 4 * chunk: the last chunk is never run
    P = 4 * PREFILL_CHUNK
    toks = jnp.asarray(pad_prompts([rs.randint(3, 256, n).tolist() for n in lens], P))
    ln = jnp.asarray(lens, jnp.int32)
    variants = [(XLA, params)] + ([(CPU_KERNELS, CPU_KERNELS.prepare(cfg, params))] if K.wanted(cfg) else [])
    for be, prm in variants:
        one = jax.jit(lambda p, t, l: prefill(cfg, p, t, l, D.init_cache(cfg, 2, P + 32), chunk=P, backend=be))
        chunked = jax.jit(lambda p, t, l: prefill(cfg, p, t, l, D.init_cache(cfg, 2, P + 32), backend=be))
        (lo, co), (lc, cc) = one(prm, toks, ln), chunked(prm, toks, ln)
        for b, n in enumerate(lens):
            if prm is params:
                np.testing.assert_allclose(np.asarray(lc[b]), np.asarray(lo[b]), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(
                    np.asarray(cc.k[1][b, :, :n]), np.asarray(co.k[1][b, :, :n]), rtol=1e-5, atol=1e-5
                )
            else:  # the kernels' rows do not depend on the block: bit for bit
                assert np.array_equal(np.asarray(lc[b]), np.asarray(lo[b]))
                assert np.array_equal(np.asarray(cc.v[0][b, :, :n]), np.asarray(co.v[0][b, :, :n]))
    hf = tf.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    p = rs.randint(3, 256, lens[1]).tolist()
    ours = Generator(cfg).generate(params, [p], GenerateConfig(max_new_tokens=12, stop_ids=(-1,))).new_ids[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[
            0, len(p) :
        ].tolist()
    assert ours == ref
