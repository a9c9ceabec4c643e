"""Logits parity with HF transformers (fp32) on tiny random configs, and loader strictness."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.model import decoder as D


def _hf_logits(d, ids):
    import transformers as tf

    m = tf.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.numpy()


def _our_logits(d, ids):
    cfg, params, _ = load_hf_checkpoint(str(d))
    params = jax.tree.map(jnp.asarray, params)
    cache = D.init_cache(cfg, ids.shape[0], 64)
    logits, _ = D.forward(cfg, params, jnp.asarray(ids, jnp.int32), cache, jnp.zeros(ids.shape[0], jnp.int32))
    return cfg, np.asarray(logits)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_logits_match_hf(fixture, request):
    d = request.getfixturevalue(fixture)
    ids = np.random.RandomState(0).randint(0, 256, (2, 48))
    cfg, ours = _our_logits(d, ids)
    ref = _hf_logits(d, ids)
    assert np.abs(ours - ref).max() <= 1e-4
    if fixture == "tiny_llama_dir":
        assert cfg.rope_scaling is not None and not cfg.tie_word_embeddings
    else:
        assert cfg.qkv_bias and cfg.tie_word_embeddings


def test_incremental_decode_matches_full_forward(tiny_llama_dir):
    """Prefill 20 tokens then feed 8 one at a time == one forward over all 28."""
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    params = jax.tree.map(jnp.asarray, params)
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (1, 28)), jnp.int32)
    full, _ = D.forward(cfg, params, ids, D.init_cache(cfg, 1, 64), jnp.zeros(1, jnp.int32))
    _, cache = D.forward(cfg, params, ids[:, :20], D.init_cache(cfg, 1, 64), jnp.zeros(1, jnp.int32))
    steps = []
    for t in range(20, 28):
        lg, cache = D.forward(cfg, params, ids[:, t : t + 1], cache, jnp.full((1,), t, jnp.int32))
        steps.append(lg[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), np.asarray(full[:, 20:]), atol=1e-5)


def test_mistral_sliding_window_refused_beyond_window(tmp_path):
    from conftest import save_tiny_hf

    from m2r2_jax.model.decoder import init_cache

    save_tiny_hf(tmp_path, "mistral", sliding_window=32)
    cfg, _, _ = load_hf_checkpoint(str(tmp_path))
    init_cache(cfg, 1, 32)  # within the window: exact, allowed
    with pytest.raises(M2R2Error, match="sliding-window"):
        init_cache(cfg, 1, 64)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_named(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(tiny_llama_dir, tmp_path / "m")
    f = d / "model.safetensors"
    t = load_file(f)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, f)
    with pytest.raises(M2R2Error, match=r"missing tensor.*layers\.1\.mlp\.up"):
        load_hf_checkpoint(str(d))


def test_extra_tensor_named(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    d = _copy(tiny_llama_dir, tmp_path / "m")
    f = d / "model.safetensors"
    t = load_file(f)
    t["model.layers.0.self_attn.rogue.weight"] = np.zeros((2, 2), np.float32)
    save_file(t, f)
    with pytest.raises(M2R2Error, match="unexpected tensor 'model.layers.0.self_attn.rogue.weight'"):
        load_hf_checkpoint(str(d))


def test_shape_mismatch_named(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M2R2Error, match=r"shape mismatch for 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight'"):
        load_hf_checkpoint(str(d))


def test_unsupported_architecture(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(M2R2Error, match="unsupported architecture"):
        load_hf_checkpoint(str(d))


def test_corrupt_and_missing_files(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(M2R2Error, match="cannot read safetensors file"):
        load_hf_checkpoint(str(d))
    with pytest.raises(M2R2Error, match="model not found"):
        load_hf_checkpoint(str(tmp_path / "nope"))
    (d / "config.json").write_text("{not json")
    with pytest.raises(M2R2Error, match="corrupt config.json"):
        load_hf_checkpoint(str(d))
