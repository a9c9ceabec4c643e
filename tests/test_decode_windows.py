"""The decode loop's growing attention windows and the batch-sized prefill chunk (decoding/generate.py):
the same greedy tokens as attending over the whole cache, rows crossing several windows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.decoding.generate import GenerateConfig, Generator, decode_windows, prefill_chunk
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint


def test_windows_and_chunks():
    assert decode_windows(32, 128, 16) == (32, 48, 64, 80, 96, 112, 128)
    assert decode_windows(20, 100, 16) == (32, 48, 64, 80, 96, 100)
    assert decode_windows(64, 64, 64) == (64,)
    assert decode_windows(64, 384, None) == (384,)
    assert [prefill_chunk(b) for b in (1, 16, 32, 64, 512)] == [64, 64, 32, 16, 16]
    with pytest.raises(M2R2Error, match="window must be an integer >= 1"):
        GenerateConfig(window=0)


def test_windowed_decode_same_tokens(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    params = jax.tree.map(jnp.asarray, params)
    rs = np.random.RandomState(5)
    prompts = [rs.randint(3, 256, n).tolist() for n in (3, 17, 30, 9)]  # bucket 32: windows 32, 64, 96
    gen = Generator(cfg)
    kw = dict(max_new_tokens=40, stop_ids=(-1,), cache_len=96)
    whole = gen.generate(params, prompts, GenerateConfig(window=None, **kw))
    windowed = gen.generate(params, prompts, GenerateConfig(window=32, **kw))
    assert windowed.new_ids == whole.new_ids
    assert windowed.steps == whole.steps == 39 and gen.compiles == 2
    # a stop token ends the loop inside a window; later windows run no step
    stop = whole.new_ids[0][5]
    cut = gen.generate(params, prompts[:1] * 4, GenerateConfig(window=32, **dict(kw, stop_ids=(stop,))))
    assert cut.new_ids[0] == whole.new_ids[0][: whole.new_ids[0].index(stop) + 1]
