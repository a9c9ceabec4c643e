"""The HF transformers (torch) model of a loaded base: the reference our decoding is compared with."""

from __future__ import annotations

import os

from m2r2_jax.errors import M2R2Error


def hf_reference_model(m):
    """A float32 torch model of `m` (a `LoadedModel`): from its GGUF file or its safetensors directory."""
    try:
        import torch
        import transformers as tf
    except ImportError as e:
        raise M2R2Error(f"the HF reference needs torch and transformers: {e}") from None
    if getattr(m, "derived_from", ""):
        raise M2R2Error(
            f"no HF reference for a model derived from {m.derived_from!r} (e.g. MoEfied): it has no HF checkpoint"
        )
    if m.kind == "gguf":
        d, f = os.path.split(m.source)
        ref = tf.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    else:
        from m2r2_jax.loading.hf_safetensors import resolve_hf_dir

        ref = tf.AutoModelForCausalLM.from_pretrained(str(resolve_hf_dir(m.source)), dtype=torch.float32)
    if ref is None:
        raise M2R2Error("could not build the HF reference model")
    return ref.eval()
