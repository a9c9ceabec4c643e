"""The embedded default (SmolLM2-135M-Instruct GGUF) against transformers' own
GGUF-loaded model: logits parity and greedy continuation."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.loading.tokenizer import encode_prompt
from m2r2_jax.model import decoder as D

pytestmark = pytest.mark.slow


def test_logits_parity_fp32(smol, smol_hf):
    ids = encode_prompt(smol.tokenizer, "Give me three facts about octopuses.", chat=True)
    with torch.no_grad():
        ref = smol_hf(torch.tensor([ids])).logits.numpy()[0]
    cache = D.init_cache(smol.cfg, 1, 128)
    ours, _ = D.forward(smol.cfg, smol.params, jnp.asarray([ids], jnp.int32), cache, jnp.zeros(1, jnp.int32))
    ours = np.asarray(ours)[0]
    # f32 through 30 layers: the rounding depends on the CPU's matmul kernels (1e-4 on the AMD EPYC
    # box, 1.4e-4 on an Intel Xeon with logits up to ~20), so the bound scales with the logits
    assert np.abs(ours - ref).max() <= 1e-4 + 1e-5 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("prompt", ["Write a haiku about autumn leaves.", "What is 17 times 23?"])
def test_greedy_32_tokens_identical_to_hf(smol, smol_hf, prompt):
    ids = encode_prompt(smol.tokenizer, prompt, chat=True)
    ours = Generator(smol.cfg).generate(smol.params, [ids], GenerateConfig(max_new_tokens=32, stop_ids=(-1,)))
    with torch.no_grad():
        ref = smol_hf.generate(
            torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=2
        )[0, len(ids) :].tolist()
    assert ours.new_ids[0] == ref


def test_chat_template_matches_transformers(smol):
    msgs = [{"role": "user", "content": "Hello there"}]
    ref = smol.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert encode_prompt(smol.tokenizer, "Hello there", chat=True) == list(ref)


def test_shipped_checkpoint_speculative_on_cpu_kernels_equals_ar(smol):
    """The headline path: SmolLM2 + the shipped M2R2 checkpoint, the default drafting (star4 + prompt
    lookup 4 + the lookup extension), the CPU kernels where they build: the speculative output equals
    the AR output token for token, and the drafts are accepted."""
    from pathlib import Path

    from m2r2_jax.backend import resolve
    from m2r2_jax.decoding.drafters import DraftOptions
    from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
    from m2r2_jax.training.checkpoint import load_m2r2

    ck = Path(__file__).resolve().parents[1] / "m2r2_jax" / "assets" / "smollm2-135m-r3"
    mc, m2r2, draft_ids, _ = load_m2r2(ck, smol.cfg, smol.params, "smollm2-135m", base_fingerprint=smol.fingerprint)
    from m2r2_jax import kernels as K

    backend = resolve(smol.cfg, "on" if K.available() else "off")
    base = backend.prepare(smol.cfg, smol.params)
    prompts = [
        encode_prompt(smol.tokenizer, t, chat=True)
        for t in ("List the planets of the solar system in order.", "Write a Python function that reverses a string.")
    ]
    ar = Generator(smol.cfg, backend=backend).generate(base, prompts, GenerateConfig(max_new_tokens=48)).new_ids
    spec = SpeculativeDecoder(smol.cfg, DraftOptions().drafter(smol.cfg, mc, backend), backend)
    r = spec.generate(base, spec.prepare(base, m2r2, draft_ids), prompts, SpecConfig(max_new_tokens=48))
    assert r.new_ids == ar
    assert r.tau > 1.3 and sum(r.kinds["m2r2"]["accepted"]) > 0
