"""HF safetensors checkpoints (local directory, or a hub id when online).

One regex table maps HF tensor names to our tree paths; every tensor is
checked against the spec (missing / extra / mis-shaped -> one clear error).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from m2r2_jax.config import ModelConfig, model_config_from_hf
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model.params import ParamSpec, flatten_with_names, model_spec

# (HF name regex, our dotted path template, transpose?)
KEY_TABLE: tuple[tuple[str, str, bool], ...] = (
    (r"model\.embed_tokens\.weight", "embed", False),
    (r"model\.norm\.weight", "final_norm", False),
    (r"lm_head\.weight", "lm_head", True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm", False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.mlp_norm", False),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "layers.{0}.attn.wq", True),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "layers.{0}.attn.wk", True),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "layers.{0}.attn.wv", True),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attn.wo", True),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "layers.{0}.attn.bq", False),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "layers.{0}.attn.bk", False),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "layers.{0}.attn.bv", False),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.mlp.gate", True),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.mlp.up", True),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.mlp.down", True),
)
_COMPILED = [(re.compile(p + r"$"), t, tr) for p, t, tr in KEY_TABLE]


def hf_to_path(name: str) -> tuple[str, bool] | None:
    for rx, tmpl, tr in _COMPILED:
        m = rx.match(name)
        if m:
            return tmpl.format(*m.groups()), tr
    return None


def resolve_hf_dir(name_or_path: str) -> Path:
    """A local directory, or a hub id downloaded through huggingface_hub."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise M2R2Error(f"not a checkpoint directory: {p}")
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")):
        raise M2R2Error(f"model not found: {name_or_path} (no such directory, file or hub id)")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name_or_path, allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"]
            )
        )
    except Exception as e:  # offline, unknown repo, auth...
        raise M2R2Error(
            f"cannot fetch {name_or_path!r} from the hub: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def read_hf_config(d: Path) -> dict:
    f = d / "config.json"
    if not f.is_file():
        raise M2R2Error(f"missing config.json in {d}")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise M2R2Error(f"corrupt config.json in {d}: {e}") from None


def _shard_files(d: Path) -> list[Path]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise M2R2Error(f"corrupt {index}: {e}") from None
        files = sorted({d / v for v in weight_map.values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise M2R2Error(f"no *.safetensors files in {d}")
    for f in files:
        if not f.is_file():
            raise M2R2Error(f"missing safetensors shard {f}")
    return files


def _read_tensors(files: list[Path]):
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="flax") as sf:
                for name in sf.keys():
                    yield name, np.asarray(sf.get_tensor(name))
        except M2R2Error:
            raise
        except Exception as e:
            raise M2R2Error(
                f"cannot read safetensors file {f}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None


def load_hf_checkpoint(name_or_path: str, **cfg_overrides) -> tuple[ModelConfig, dict, Path]:
    """Returns (config, params as numpy in the spec's layout/dtype, directory)."""
    d = resolve_hf_dir(name_or_path)
    cfg = model_config_from_hf(read_hf_config(d), **cfg_overrides)
    spec = model_spec(cfg)
    wanted: dict[str, ParamSpec] = dict(flatten_with_names(spec))
    got: dict[str, np.ndarray] = {}
    for name, arr in _read_tensors(_shard_files(d)):
        m = hf_to_path(name)
        if m is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # buffer some old checkpoints carry; recomputed from config
            raise M2R2Error(f"unexpected tensor {name!r} in {d} (not part of a {cfg.arch} model)")
        path, transpose = m
        if path == "lm_head" and cfg.tie_word_embeddings:
            continue  # tied: the head is the embedding
        if path not in wanted:
            raise M2R2Error(f"unexpected tensor {name!r} in {d} (config has no {path})")
        if transpose:
            arr = arr.T
        want = wanted[path]
        if tuple(arr.shape) != tuple(want.shape):
            raise M2R2Error(
                f"shape mismatch for {name!r}: checkpoint {tuple(arr.shape[::-1] if transpose else arr.shape)}"
                f", config expects {tuple(want.shape[::-1] if transpose else want.shape)}"
            )
        got[path] = np.ascontiguousarray(arr.astype(want.dtype))
    missing = [k for k in wanted if k not in got]
    if missing:
        raise M2R2Error(f"missing tensor(s) in {d}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return cfg, unflatten_to_spec(spec, got), d


def unflatten_to_spec(spec, flat: dict[str, np.ndarray]):
    import jax

    names = [n for n, _ in flatten_with_names(spec)]
    treedef = jax.tree.structure(spec, is_leaf=lambda x: isinstance(x, ParamSpec))
    return jax.tree.unflatten(treedef, [flat[n] for n in names])


def is_hf_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and os.access(p, os.R_OK)
