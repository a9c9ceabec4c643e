"""HF safetensors checkpoints (local directory, or a hub id when online).

One regex table maps HF tensor names to our tree paths; every tensor is
checked against the spec (missing / extra / mis-shaped -> one clear error).
MoE experts arrive one tensor per expert (the hub's layout, and what
transformers' `save_pretrained` writes by default) or as fused [expert, ...]
tensors (transformers' in-memory layout, `save_original_format=False`); both
become our stacked [expert, ...] leaves.
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

_L = r"model\.layers\.(\d+)\."
# (HF name regex, our dotted path template, how the tensor becomes our leaf):
#   "="   as it is
#   "T"   transposed: HF's [out, in] -> our [in, out]
#   "E"   one expert's [out, in] (expert index: the regex's 2nd group), transposed into its row of the
#         stacked [expert, in, out] leaf
#   "X"   all experts [expert, out, in] -> [expert, in, out]
#   "GU"  fused gate and up [expert, 2F, D] (gate rows first, as transformers chunks them) -> the two
#         leaves {path}.gate and {path}.up [expert, D, F]
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    (r"model\.embed_tokens\.weight", "embed", "="),
    (r"model\.norm\.weight", "final_norm", "="),
    (r"lm_head\.weight", "lm_head", "T"),
    (_L + r"input_layernorm\.weight", "layers.{0}.attn_norm", "="),
    (_L + r"post_attention_layernorm\.weight", "layers.{0}.mlp_norm", "="),
    (_L + r"self_attn\.(q|k|v|o)_proj\.weight", "layers.{0}.attn.w{1}", "T"),
    (_L + r"self_attn\.(q|k|v)_proj\.bias", "layers.{0}.attn.b{1}", "="),
    (_L + r"self_attn\.(q|k)_norm\.weight", "layers.{0}.attn.{1}_norm", "="),  # OLMoE
    (_L + r"mlp\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{1}", "T"),  # dense layers
    # Qwen2-MoE, OLMoE (and Mixtral in transformers' layout): router, experts, shared expert
    (_L + r"mlp\.gate\.weight", "layers.{0}.mlp.router", "T"),
    (_L + r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.{2}", "E"),
    (_L + r"mlp\.experts\.gate_up_proj", "layers.{0}.mlp", "GU"),
    (_L + r"mlp\.experts\.down_proj", "layers.{0}.mlp.down", "X"),
    (_L + r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", "layers.{0}.mlp.shared.{1}", "T"),
    (_L + r"mlp\.shared_expert_gate\.weight", "layers.{0}.mlp.shared_gate", "T"),
    # Mixtral (hub): w1 = gate, w3 = up, w2 = down
    (_L + r"block_sparse_moe\.gate\.weight", "layers.{0}.mlp.router", "T"),
    (_L + r"block_sparse_moe\.experts\.(\d+)\.w1\.weight", "layers.{0}.mlp.gate", "E"),
    (_L + r"block_sparse_moe\.experts\.(\d+)\.w3\.weight", "layers.{0}.mlp.up", "E"),
    (_L + r"block_sparse_moe\.experts\.(\d+)\.w2\.weight", "layers.{0}.mlp.down", "E"),
    # GraniteMoE: hub names, then transformers' layout
    (_L + r"block_sparse_moe\.router\.(?:layer\.)?weight", "layers.{0}.mlp.router", "T"),
    (_L + r"block_sparse_moe\.(?:input_linear\.weight|experts\.gate_up_proj)", "layers.{0}.mlp", "GU"),
    (_L + r"block_sparse_moe\.(?:output_linear\.weight|experts\.down_proj)", "layers.{0}.mlp.down", "X"),
)
_COMPILED = [(re.compile(p + r"$"), t, op) for p, t, op in KEY_TABLE]


def hf_to_path(name: str) -> tuple[str, str, int | None] | None:
    """HF tensor name -> (our path, op (see KEY_TABLE), expert index for op "E"), or None."""
    for rx, tmpl, op in _COMPILED:
        m = rx.match(name)
        if m:
            return tmpl.format(*m.groups()), op, (int(m.group(2)) if op == "E" else None)
    return None


def _hf_shape(op: str, want: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that op turns into our leaf of shape `want` (for GU: the gate leaf's)."""
    if op == "T":
        return want[::-1]
    if op == "E":
        return want[1:][::-1]
    if op == "X":
        return (want[0], want[2], want[1])
    if op == "GU":
        return (want[0], 2 * want[2], want[1])
    return want


def _leaves(op: str, path: str, arr: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The (our path, value) pairs one checked HF tensor becomes (an "E" value: one expert's row)."""
    if op in ("T", "E"):
        return [(path, arr.T)]
    if op == "X":
        return [(path, arr.transpose(0, 2, 1))]
    if op == "GU":
        f = arr.shape[1] // 2
        return [(path + ".gate", arr[:, :f].transpose(0, 2, 1)), (path + ".up", arr[:, f:].transpose(0, 2, 1))]
    return [(path, arr)]


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
    experts: dict[str, dict[int, np.ndarray]] = {}  # stacked leaf -> expert -> its row
    for name, arr in _read_tensors(_shard_files(d)):
        m = hf_to_path(name)
        if m is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # buffer some old checkpoints carry; recomputed from config
            raise M2R2Error(f"unexpected tensor {name!r} in {d} (not part of a {cfg.arch} model)")
        path, op, expert = m
        if path == "lm_head" and cfg.tie_word_embeddings:
            continue  # tied: the head is the embedding
        leaf = path + ".gate" if op == "GU" else path
        if leaf not in wanted:
            raise M2R2Error(f"unexpected tensor {name!r} in {d} (config has no {leaf})")
        want = _hf_shape(op, tuple(wanted[leaf].shape))
        if tuple(arr.shape) != want:
            raise M2R2Error(f"shape mismatch for {name!r}: checkpoint {tuple(arr.shape)}, config expects {want}")
        if op == "E" and expert >= wanted[leaf].shape[0]:
            raise M2R2Error(f"unexpected tensor {name!r} in {d} (config has {wanted[leaf].shape[0]} experts)")
        for p, v in _leaves(op, path, arr):
            v = np.ascontiguousarray(v.astype(wanted[p].dtype))
            rows = experts.setdefault(p, {}) if op == "E" else None
            if p in got or (rows is not None and expert in rows) or (rows is None and p in experts):
                raise M2R2Error(f"tensor {name!r} in {d} gives {p} a second time")
            if rows is None:
                got[p] = v
            else:
                rows[expert] = v
    for p, rows in experts.items():
        absent = [e for e in range(wanted[p].shape[0]) if e not in rows]
        if absent:
            raise M2R2Error(f"missing tensor(s) in {d}: {p} of expert(s) {', '.join(map(str, absent[:5]))}")
        got[p] = np.stack([rows[e] for e in range(len(rows))])
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
