"""GGUF loader: real SmolLM2 GGUF vs transformers' GGUF loader, plus tiny
synthetic GGUF files (written with gguf-py) for qwen2 biases, Llama-3 RoPE
factors, the Q/K permutation and the strictness errors."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.gguf_loader import default_gguf_path, gguf_tokenizer, read_gguf
from m2r2_jax.model.params import flatten_with_names


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q_proj / k_proj rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# our path -> (HF state_dict name, transposed?)
def hf_name(path: str) -> tuple[str, bool]:
    if path == "embed":
        return "model.embed_tokens.weight", False
    if path == "final_norm":
        return "model.norm.weight", False
    if path == "lm_head":
        return "lm_head.weight", True
    _, i, *rest = path.split(".")
    sub = {
        "attn_norm": ("input_layernorm.weight", False),
        "mlp_norm": ("post_attention_layernorm.weight", False),
        "attn.wq": ("self_attn.q_proj.weight", True),
        "attn.wk": ("self_attn.k_proj.weight", True),
        "attn.wv": ("self_attn.v_proj.weight", True),
        "attn.wo": ("self_attn.o_proj.weight", True),
        "attn.bq": ("self_attn.q_proj.bias", False),
        "attn.bk": ("self_attn.k_proj.bias", False),
        "attn.bv": ("self_attn.v_proj.bias", False),
        "mlp.gate": ("mlp.gate_proj.weight", True),
        "mlp.up": ("mlp.up_proj.weight", True),
        "mlp.down": ("mlp.down_proj.weight", True),
    }[".".join(rest)]
    return f"model.layers.{i}.{sub[0]}", sub[1]


# ----------------------------------------------------------------------------- real model (SmolLM2)


@pytest.fixture(scope="module")
def smol_path():
    try:
        return default_gguf_path()
    except M2R2Error as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ours(smol_path):
    return read_gguf(smol_path)


@pytest.fixture(scope="module")
def hf_ref(smol_hf):
    """(config, {name: float32 numpy}) from transformers' own GGUF loader (session fixture)."""
    return smol_hf.config, {k: v.numpy() for k, v in smol_hf.state_dict().items()}


@pytest.mark.slow
def test_config_fields(ours, hf_ref):
    cfg, params, md = ours
    hf_cfg, _ = hf_ref
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and "lm_head" not in params
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None and not cfg.qkv_bias
    assert cfg.rms_norm_eps == hf_cfg.rms_norm_eps == float(np.float32(1e-5))  # exact f32 value, as transformers
    assert (cfg.max_position_embeddings, cfg.bos_token_id, cfg.eos_token_ids) == (8192, 1, (2,))
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
    # and the same as what transformers derived
    assert cfg.num_layers == hf_cfg.num_hidden_layers and cfg.num_kv_heads == hf_cfg.num_key_value_heads
    assert cfg.head_dim == hf_cfg.head_dim and cfg.vocab_size == hf_cfg.vocab_size
    assert cfg.tie_word_embeddings == hf_cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(hf_cfg.rms_norm_eps, rel=1e-6)
    assert cfg.eos_token_ids == (hf_cfg.eos_token_id,) and cfg.bos_token_id == hf_cfg.bos_token_id


@pytest.mark.slow
def test_params_match_transformers(ours, hf_ref):
    _, params, _ = ours
    _, sd = hf_ref
    used = set()
    for path, arr in flatten_with_names(params):
        name, transpose = hf_name(path)
        ref = sd[name].T if transpose else sd[name]
        assert arr.dtype == np.float32 and arr.shape == ref.shape, path
        np.testing.assert_allclose(arr, ref, rtol=0, atol=1e-6, err_msg=path)
        used.add(name)
    # everything transformers loaded is covered (lm_head.weight is the tied embedding)
    assert set(sd) - used <= {"lm_head.weight"}
    if "lm_head.weight" in sd:
        np.testing.assert_array_equal(sd["lm_head.weight"], params["embed"])


@pytest.mark.slow
def test_qk_permutation_undone(ours, smol_path):
    """Ours is exactly the inverse of llama.cpp's permute (independently of transformers)."""
    cfg, params, _ = ours
    reader = gguf.GGUFReader(str(smol_path))
    raw = {t.name: t for t in reader.tensors}
    for key, gname, n in (
        ("wq", "blk.3.attn_q.weight", cfg.num_heads),
        ("wk", "blk.3.attn_k.weight", cfg.num_kv_heads),
    ):
        t = raw[gname]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))
        hf_layout = params["layers"][3]["attn"][key].T
        assert not np.array_equal(hf_layout, w)  # the permutation is real ...
        np.testing.assert_array_equal(llamacpp_permute(hf_layout, n), w)  # ... and undone exactly


@pytest.mark.slow
def test_tokenizer_cached(smol_path):
    tok = gguf_tokenizer(smol_path)
    assert gguf_tokenizer(str(smol_path)) is tok
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"
    assert tok.decode(tok("Hello world")["input_ids"]) == "Hello world"


@pytest.mark.slow
def test_disk_cache_round_trip(smol_path, ours, tmp_path, monkeypatch):
    """The GGUF disk cache returns what the GGUF file gives (config, params, tokenizer), and a damaged
    entry is a miss, not an error."""
    from transformers import AutoTokenizer

    from m2r2_jax.loading import cache

    monkeypatch.setenv("M2R2_CACHE_DIR", str(tmp_path / "c"))
    cfg, params, _ = ours
    e = cache.entry(smol_path, "params")
    assert e is not None and str(tmp_path) in str(e) and cache.load_params(e) is None
    cache.save_params(e, cfg, params)
    cfg2, params2 = cache.load_params(e)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)
    (e / "params.safetensors").write_bytes(b"not safetensors")
    assert cache.load_params(e) is None

    ref = AutoTokenizer.from_pretrained(str(smol_path.parent), gguf_file=smol_path.name)
    t = cache.entry(smol_path, "tokenizer")
    cache.save_tokenizer(t, ref)
    tok = cache.load_tokenizer(t)
    texts = ["Hello world", "  déjà vu\n\ttabs 123456 <|im_end|>", "def f(x):\n    return x**2  # ok"]
    for s in texts:
        assert tok(s)["input_ids"] == ref(s)["input_ids"]
    chat = [{"role": "user", "content": "Name three rivers."}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
        chat, add_generation_prompt=True
    )
    monkeypatch.setenv("M2R2_CACHE_DIR", "off")
    assert cache.entry(smol_path, "params") is None


@pytest.mark.slow
def test_corrupt_files(smol_path, tmp_path):
    data = smol_path.read_bytes()
    cases = {
        "truncated.gguf": data[: len(data) // 2],
        "header_only.gguf": data[:1000],
        "not_gguf.gguf": b"definitely not a gguf file" * 10,
        "empty.gguf": b"",
    }
    for fname, blob in cases.items():
        p = tmp_path / fname
        p.write_bytes(blob)
        with pytest.raises(M2R2Error, match="cannot read GGUF file") as ei:
            read_gguf(p)
        assert str(p) in str(ei.value) and "\n" not in str(ei.value), fname


def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    for fn in (read_gguf, gguf_tokenizer):
        with pytest.raises(M2R2Error, match="cannot read GGUF file") as ei:
            fn(p)
        assert str(p) in str(ei.value) and "\n" not in str(ei.value)


# ----------------------------------------------------------------------------- synthetic GGUF files

D, F, H, KV, HD, V, L = 16, 24, 4, 2, 4, 32, 2


def hf_weights(arch: str, seed=0) -> dict[str, np.ndarray]:
    """Random weights in HF layout ([out, in]), keyed by GGUF tensor name."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = {"token_embd.weight": r(V, D), "output_norm.weight": r(D), "output.weight": r(V, D)}
    for i in range(L):
        b = f"blk.{i}."
        w |= {
            b + "attn_norm.weight": r(D),
            b + "ffn_norm.weight": r(D),
            b + "attn_q.weight": r(H * HD, D),
            b + "attn_k.weight": r(KV * HD, D),
            b + "attn_v.weight": r(KV * HD, D),
            b + "attn_output.weight": r(D, H * HD),
            b + "ffn_gate.weight": r(F, D),
            b + "ffn_up.weight": r(F, D),
            b + "ffn_down.weight": r(D, F),
        }
        if arch == "qwen2":
            w |= {b + "attn_q.bias": r(H * HD), b + "attn_k.bias": r(KV * HD), b + "attn_v.bias": r(KV * HD)}
    return w


def write_gguf(path, arch: str, tensors: dict[str, np.ndarray], permute=None, rope_dim=HD):
    permute = arch == "llama" if permute is None else permute
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(rope_dim)
    w.add_vocab_size(V)
    w.add_eos_token_id(7)
    for name, arr in tensors.items():
        if permute and name.endswith(("attn_q.weight", "attn_k.weight")):
            arr = llamacpp_permute(arr, H if "attn_q" in name else KV)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_roundtrip(tmp_path, arch):
    hf = hf_weights(arch)
    cfg, params, _ = read_gguf(write_gguf(tmp_path / "m.gguf", arch, hf))
    assert (cfg.arch, cfg.qkv_bias, cfg.tie_word_embeddings, cfg.eos_token_ids) == (arch, arch == "qwen2", False, (7,))
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == HD and cfg.bos_token_id is None
    a = params["layers"][1]["attn"]
    np.testing.assert_array_equal(a["wq"], hf["blk.1.attn_q.weight"].T)
    np.testing.assert_array_equal(a["wk"], hf["blk.1.attn_k.weight"].T)
    np.testing.assert_array_equal(params["lm_head"], hf["output.weight"].T)
    np.testing.assert_array_equal(params["layers"][0]["mlp"]["down"], hf["blk.0.ffn_down.weight"].T)
    if arch == "qwen2":
        np.testing.assert_array_equal(a["bk"], hf["blk.1.attn_k.bias"])


def test_llama3_rope_freqs(tmp_path):
    """Llama-3.x GGUFs carry RoPE scaling only as the rope_freqs.weight tensor."""
    from m2r2_jax.config import ModelConfig, RopeScaling, rope_inv_freq

    hd = 64  # big enough to span the low / medium / high frequency bands
    base = ModelConfig(head_dim=hd, rope_theta=500000.0)
    want = RopeScaling(factor=32.0)
    factors = rope_inv_freq(base) / rope_inv_freq(ModelConfig(head_dim=hd, rope_theta=500000.0, rope_scaling=want))
    assert len(set(np.round(factors, 4))) > 2
    hf = hf_weights("llama")
    rng = np.random.default_rng(1)
    for i in range(L):
        hf[f"blk.{i}.attn_q.weight"] = rng.standard_normal((H * hd, D)).astype(np.float32)
        hf[f"blk.{i}.attn_k.weight"] = rng.standard_normal((KV * hd, D)).astype(np.float32)
        hf[f"blk.{i}.attn_v.weight"] = rng.standard_normal((KV * hd, D)).astype(np.float32)
        hf[f"blk.{i}.attn_output.weight"] = rng.standard_normal((D, H * hd)).astype(np.float32)
    cfg, params, _ = read_gguf(
        write_gguf(tmp_path / "a.gguf", "llama", hf | {"rope_freqs.weight": factors}, rope_dim=hd)
    )
    assert cfg.rope_scaling == want
    np.testing.assert_array_equal(params["layers"][0]["attn"]["wk"], hf["blk.0.attn_k.weight"].T)
    with pytest.raises(M2R2Error, match="rope_freqs.weight"):
        read_gguf(write_gguf(tmp_path / "b.gguf", "llama", hf | {"rope_freqs.weight": factors**0.5}, rope_dim=hd))


def test_strictness(tmp_path):
    hf = hf_weights("llama")
    cases = [
        ("gemma2", hf, "unsupported GGUF architecture 'gemma2'"),
        ("llama", {k: v for k, v in hf.items() if k != "blk.1.ffn_up.weight"}, r"missing tensor.*layers\.1\.mlp\.up"),
        ("llama", hf | {"blk.0.attn_q.bias": np.zeros(H * HD, np.float32)}, "unexpected tensor 'blk.0.attn_q.bias'"),
        (
            "llama",
            hf | {"blk.0.ffn_gate.weight": np.zeros((F + 1, D), np.float32)},
            "shape mismatch.*blk.0.ffn_gate.weight",
        ),
        ("qwen2", hf, r"missing tensor.*layers\.0\.attn\.bq"),
    ]
    for i, (arch, tensors, msg) in enumerate(cases):
        p = write_gguf(tmp_path / f"{i}.gguf", arch, tensors, permute=False)
        with pytest.raises(M2R2Error, match=msg) as ei:
            read_gguf(p)
        assert "\n" not in str(ei.value)
