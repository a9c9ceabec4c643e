"""CPU kernels (m2r2_jax/kernels): the packed small-row matmul and the block attention against XLA,
their row independence, and decoding with packed params (AR and speculative, lossless)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax import kernels as K
from m2r2_jax.backend import CPU_KERNELS, XLA
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.drafters import DraftOptions
from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
from m2r2_jax.decoding.trees import get_tree
from m2r2_jax.decoding.verify import TreeTables, verify
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L


def test_kernels_build_where_a_compiler_exists():
    if shutil.which("g++") or shutil.which("c++"):
        assert K.available()


def test_prefetch_rows_flag(monkeypatch):
    """The software prefetch's row limit is a compile flag: the env override, the AMD default, an error
    line for a bad value."""
    monkeypatch.setenv("M2R2_KERNEL_PREFETCH_ROWS", "3")
    assert K._flags()[-1] == "-DM2R2_PREFETCH_MAX_ROWS=3"
    monkeypatch.setenv("M2R2_KERNEL_PREFETCH_ROWS", "many")
    with pytest.raises(M2R2Error, match="M2R2_KERNEL_PREFETCH_ROWS"):
        K._flags()
    monkeypatch.delenv("M2R2_KERNEL_PREFETCH_ROWS")
    monkeypatch.setattr(K, "_cpu_info", lambda: "vendor_id\t: AuthenticAMD\n")
    assert K._flags()[-1] == "-DM2R2_PREFETCH_MAX_ROWS=1"
    monkeypatch.setattr(K, "_cpu_info", lambda: "vendor_id\t: GenuineIntel\n")
    assert K._flags() == K._FLAGS


needs_kernels = pytest.mark.skipif(not K.available(), reason="no C++ compiler: the CPU kernels are not built")


@needs_kernels
@pytest.mark.parametrize("D_,N", [(64, 64), (96, 100), (576, 192), (160, 1536)])
def test_packed_matmul_matches_numpy_and_is_row_independent(D_, N):
    rs = np.random.RandomState(D_ + N)
    w = rs.randn(D_, N).astype(np.float32)
    pw = K.pack(jnp.asarray(w))
    assert np.array_equal(np.asarray(K.unpack(pw)), w)
    x = rs.randn(9, D_).astype(np.float32)
    f = jax.jit(K.packed_matmul)
    y = np.asarray(f(jnp.asarray(x), pw))
    np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=0, atol=2e-5 * np.sqrt(D_) * 4)
    for M in (1, 2, 5, 7):  # row r of an M-row product is the same bits as that row alone
        ym = np.asarray(f(jnp.asarray(x[:M]), pw))
        assert np.array_equal(ym, y[:M])
    # [..., D] inputs keep their leading axes
    assert f(jnp.asarray(x[:6].reshape(2, 3, D_)), pw).shape == (2, 3, N)


@needs_kernels
@pytest.mark.parametrize("D_,N", [(64, 64), (96, 100), (160, 4097)])
def test_packed_argmax_equals_argmax_of_packed_matmul(D_, N):
    """The fused head + argmax is jnp.argmax of the packed product, row by row whatever the row count."""
    rs = np.random.RandomState(D_ + N + 1)
    pw = K.pack(jnp.asarray(rs.randn(D_, N).astype(np.float32)))
    x = jnp.asarray(rs.randn(13, D_).astype(np.float32))
    want = np.asarray(jnp.argmax(K.packed_matmul(x, pw), -1))
    f = jax.jit(K.packed_argmax)
    got = np.asarray(f(x, pw))
    assert got.dtype == np.int32 and np.array_equal(got, want)
    for M in (1, 5):
        assert np.array_equal(np.asarray(f(x[:M], pw)), want[:M])
    assert np.array_equal(np.asarray(f(x[:6].reshape(2, 3, D_), pw)), want[:6].reshape(2, 3))


@needs_kernels
def test_packed_argmax_ties_nan_and_padding():
    """Ties go to the lowest column (also across panels and threads' units), a NaN wins (the first one),
    and the zero-padded columns past N never do, all as jnp.argmax of the logits."""
    V = 64 * 40 + 3  # padded to 41 panels
    w = np.full((8, V), -3.0, np.float32)
    x = np.zeros((5, 8), np.float32)
    x[:, 0] = 1.0
    x[1, 0] = 2.0
    w[0, [70, 1500, V - 1]] = -1.0  # a three-way tie in different panels
    x[3, 0] = 0.0  # row 3: all logits 0.0 (a tie everywhere)
    w[1:3] = 0.0
    w[1, [900, 2000]], w[2, [900, 2000]] = 1e30, -1e30
    x[4, 1] = x[4, 2] = 1e30  # row 4 only: inf - inf = NaN at columns 900 and 2000
    xs, pw = jnp.asarray(x), K.pack(jnp.asarray(w))
    want = np.asarray(jnp.argmax(K.packed_matmul(xs, pw), -1))
    assert want.tolist() == [70, 70, 70, 0, 900]
    assert np.array_equal(np.asarray(K.packed_argmax(xs, pw)), want)


@needs_kernels
def test_packed_weight_merges_match_dense():
    rs = np.random.RandomState(0)
    w, ab, g = rs.randn(64, 100), rs.randn(64, 100), rs.randn(100)
    pw = K.pack(jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(
        np.asarray(K.unpack(K.add_dense(pw, jnp.asarray(ab, jnp.float32)))), w + ab, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        np.asarray(K.unpack(K.scale_columns(pw, jnp.asarray(g, jnp.float32)))), w * g[None], rtol=1e-6, atol=1e-6
    )


@needs_kernels
@pytest.mark.parametrize("hd", [16, 64])
def test_block_attention_matches_masked_attention(hd):
    cfg = ModelConfig(num_heads=6, num_kv_heads=2, head_dim=hd, hidden_size=6 * hd)
    rs = np.random.RandomState(hd)
    B, T, S = 3, 5, 40
    r = lambda *s: jnp.asarray(rs.randn(*s).astype(np.float32))  # noqa: E731
    q, kl, vl = r(B, T, 6, hd) * 2, r(B, 2, T, hd), r(B, 2, T, hd)
    kc, vc = r(B, 2, S, hd), r(B, 2, S, hd)
    start = jnp.asarray([0, 9, 35], jnp.int32)
    local = np.tril(np.ones((T, T), bool))
    local[3, 1] = False  # a tree mask, not only causal
    got = K.block_attention(q, kc, vc, start, kl, vl, local)
    kcc, vcc = L.write_cache(kc, kl, start), L.write_cache(vc, vl, start)
    want = L.attend(cfg, q, kcc, vcc, L.block_mask(start, T, S, jnp.asarray(local)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # one query alone gives the same bits as inside the block
    one = K.block_attention(q[:, 2:3], kc, vc, start, kl, vl, local[2:3])
    assert np.array_equal(np.asarray(one)[:, 0], np.asarray(got)[:, 2])


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params)


@needs_kernels
def test_packed_forward_matches_xla(tiny):
    cfg, base = tiny
    packed = K.pack_decode_params(cfg, base)
    assert K.is_packed(packed) and not K.is_packed(base)
    rs = np.random.RandomState(1)
    cache = D.init_cache(cfg, 2, 64)
    toks = jnp.asarray(rs.randint(3, 256, (2, 12)), jnp.int32)
    start = jnp.zeros((2,), jnp.int32)
    want, cw = D.forward(cfg, base, toks, cache, start)
    got, cg = D.forward(cfg, packed, toks, cache, start, backend=CPU_KERNELS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(cg.k[1]), np.asarray(cw.k[1]), rtol=1e-5, atol=1e-5)
    # then a tree block over that cache, per-row starts
    local = jnp.asarray(get_tree("tree16").ancestor_mask)
    t2 = jnp.asarray(rs.randint(3, 256, (2, 16)), jnp.int32)
    s2 = jnp.asarray([12, 7], jnp.int32)
    want2, _ = D.forward(cfg, base, t2, cw, s2, local_mask=local)
    got2, _ = D.forward(cfg, packed, t2, cg, s2, local_mask=local, backend=CPU_KERNELS)
    np.testing.assert_allclose(np.asarray(got2), np.asarray(want2), rtol=1e-4, atol=1e-4)


@needs_kernels
def test_packed_decode_one_row_equals_block_rows(tiny):
    """With the kernels, a one-token step and the rows of a chain verification are bit-identical in the
    matmuls and the attention; the logits of the first row agree to float rounding of the rest."""
    cfg, base = tiny
    packed = K.pack_decode_params(cfg, base)
    rs = np.random.RandomState(2)
    cache = D.init_cache(cfg, 1, 64)
    prompt = jnp.asarray(rs.randint(3, 256, (1, 9)), jnp.int32)
    _, cache = D.forward(cfg, packed, prompt, cache, jnp.zeros((1,), jnp.int32), backend=CPU_KERNELS)
    blk = jnp.asarray(rs.randint(3, 256, (1, 4)), jnp.int32)
    start = jnp.full((1,), 9, jnp.int32)
    lb, _ = D.forward(cfg, packed, blk, cache, start, backend=CPU_KERNELS)
    l1, _ = D.forward(cfg, packed, blk[:, :1], cache, start, backend=CPU_KERNELS)
    np.testing.assert_allclose(np.asarray(l1[:, 0]), np.asarray(lb[:, 0]), rtol=1e-6, atol=1e-6)


@needs_kernels
def test_greedy_verify_equals_argmax_of_logits(tiny):
    """Greedy verification returns the argmax of the logits verification returns (the kernels' fused head
    and XLA's jnp.argmax), and writes the same cache."""
    cfg, base = tiny
    tt = TreeTables.of([get_tree("tree16")])
    rs = np.random.RandomState(5)
    toks = jnp.asarray(rs.randint(3, 256, (2, tt.block)), jnp.int32)
    pos = jnp.asarray([7, 3], jnp.int32)
    for backend, params in ((CPU_KERNELS, CPU_KERNELS.prepare(cfg, base)), (XLA, base)):
        cache = D.init_cache(cfg, 2, 64)
        _, cache = D.forward(
            cfg,
            params,
            jnp.asarray(rs.randint(3, 256, (2, 7)), jnp.int32),
            cache,
            jnp.zeros((2,), jnp.int32),
            backend=backend,
        )
        lg, c1 = verify(cfg, backend, params, tt, 0, toks, cache, pos)
        tg, c2 = verify(cfg, backend, params, tt, 0, toks, cache, pos, greedy=True)
        assert tg.dtype == jnp.int32 and tg.shape == toks.shape
        assert np.array_equal(np.asarray(tg), np.asarray(jnp.argmax(lg, -1)))
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(c1.k + c1.v, c2.k + c2.v))


def _m2r2(cfg):
    mc = M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8).validate(cfg.num_layers)
    m = init_m2r2(cfg, mc, jax.random.key(3))
    m = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape) if getattr(p[-1], "key", "") == "b" else x
        ),
        m,
    )
    return mc, m


@needs_kernels
@pytest.mark.parametrize("tree,lookup", [("tree16", 3), ("star4", 4)])
def test_packed_speculative_lossless(tiny, tree, lookup):
    """Speculative decoding over packed params equals the packed AR decode token for token, one by one
    and batched, with and without prompt lookup."""
    cfg, base = tiny
    packed = CPU_KERNELS.prepare(cfg, base)
    mc, m2r2 = _m2r2(cfg)
    d = np.arange(cfg.vocab_size, dtype=np.int32)
    opts = DraftOptions(tree=tree, lookup=lookup, lookup_ngram=2, lookup_min_ngram=1)
    spec = SpeculativeDecoder(cfg, opts.drafter(cfg, mc, CPU_KERNELS), CPU_KERNELS)
    gen = Generator(cfg, backend=CPU_KERNELS)
    rs = np.random.RandomState(4)
    prompts = [rs.randint(3, 256, rs.randint(3, 20)).tolist() for _ in range(4)]
    prompts[0] = (prompts[0] * 3)[:17]  # something for lookup to find
    sc = SpecConfig(max_new_tokens=24, stop_ids=(-1,))
    g = GenerateConfig(max_new_tokens=24, stop_ids=(-1,))
    ar = [gen.generate(packed, [p], g).new_ids[0] for p in prompts]
    dp = spec.prepare(packed, m2r2, d)
    single = [spec.generate(packed, dp, [p], sc) for p in prompts]
    assert [r.new_ids[0] for r in single] == ar
    assert spec.generate(packed, dp, prompts, sc).new_ids == ar
    assert sum(sum(r.accepted) for r in single) > 0
    # the XLA backend over the unpacked params decodes the same tokens (f32: the kernels round like XLA
    # up to ~1e-6, far from any argmax tie on these prompts)
    assert [Generator(cfg).generate(base, [p], g).new_ids[0] for p in prompts] == ar


def test_backend_flag(tiny):
    """--cpu-kernel auto|on|off resolves to one backend, decided in one place (backend.resolve)."""
    from m2r2_jax.backend import resolve
    from m2r2_jax.cli import decode_setup
    from m2r2_jax.loading.registry import LoadedModel

    cfg, base = tiny
    m = LoadedModel(cfg, base, None, "tiny", "hf")
    assert decode_setup(m, "off") == (XLA, base)
    if K.available():
        backend, params = decode_setup(m, "on")
        assert backend == CPU_KERNELS and K.is_packed(params)
        # auto: the kernels where they pay (an AVX-512 CPU), else XLA
        assert decode_setup(m, "auto")[0] == (CPU_KERNELS if K.preferred() else XLA)
    bf = cfg.__class__(**{**cfg.__dict__, "param_dtype": "bfloat16"})
    assert resolve(bf, "auto") == XLA
    with pytest.raises(M2R2Error, match="float32"):
        resolve(bf, "on")
    with pytest.raises(M2R2Error, match="expected one of"):
        resolve(cfg, "sometimes")
