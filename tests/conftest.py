"""Shared fixtures. 8 forced CPU devices for the sharding tests: must be set
before JAX initialises its backends."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# the tests run on the CPU even where libtpu is installed (the `tpu` extra: ahead-of-time compilation only)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one persistent compilation cache for the session, shared with the CLI subprocesses: the same tiny
# programs compile once across tests and processes
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="m2r2-jax-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def save_tiny_hf(path, kind="llama", **kw):
    """A tiny random HF model saved as safetensors; returns the torch model."""
    import torch
    import transformers as tf

    torch.manual_seed({"llama": 0, "qwen2": 1, "mistral": 2}[kind] + kw.pop("seed_offset", 0))
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[kind]
    cfg = cfg_cls(**{**TINY, **kw})
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # make norms and biases non-trivial so the test can catch mistakes
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_hf(
        d,
        "llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        rope_theta=10000.0,
    )
    return d


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_qwen2")
    save_tiny_hf(d, "qwen2", tie_word_embeddings=True)
    return d


# ----------------------------------------------------------------------------- SmolLM2 (real model)


@pytest.fixture(scope="session")
def smol_gguf():
    from m2r2_jax.loading.registry import resolve

    return resolve("smollm2-135m")[1]


@pytest.fixture(scope="session")
def smol_hf(smol_gguf):
    """transformers' own GGUF-loaded SmolLM2 in float32: the reference (built once per session)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    d, name = os.path.split(smol_gguf)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smol():
    from m2r2_jax.loading.registry import load_model

    return load_model("smollm2-135m")
