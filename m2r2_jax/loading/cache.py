"""A disk cache for models read from GGUF files. Parsing a GGUF file's metadata (the tokenizer's ~49k
tokens and merges) and dequantizing its tensors takes tens of seconds on a CPU, twice over when
transformers builds the tokenizer from the same file. The first load writes what it produced — the
config (JSON), the float32 params (safetensors) and the tokenizer (`save_pretrained`) — under
`$M2R2_CACHE_DIR` (default `~/.cache/m2r2_jax`), keyed by the file's resolved path, size and mtime;
later loads read those. `M2R2_CACHE_DIR=off` disables it. A cache that cannot be written (read-only
home) is skipped silently; a damaged entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from m2r2_jax.config import ModelConfig, from_dict, to_dict

VERSION = 1  # bump when the cached layout or the loader's output changes


def root() -> Path | None:
    v = os.environ.get("M2R2_CACHE_DIR", "")
    if v.lower() in ("off", "0", "none"):
        return None
    return Path(v).expanduser() if v else Path.home() / ".cache" / "m2r2_jax"


def entry(path: str | Path, kind: str) -> Path | None:
    """The cache directory for one file's `kind` ("params" or "tokenizer"); None when caching is off
    or the file cannot be stat'ed."""
    r = root()
    if r is None:
        return None
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        return None
    key = hashlib.sha1(f"{VERSION}:{p}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return r / "gguf" / f"{p.stem}-{key}.{kind}"


def _publish(dst: Path, fill) -> None:
    """Write into a temporary sibling, then rename into place (readers never see half an entry)."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".", dir=dst.parent))
        try:
            fill(tmp)
            if dst.exists():
                shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def load_params(e: Path | None) -> tuple[ModelConfig, Any] | None:
    """(config, params as float32 numpy in `model_spec` layout) from a cache entry, or None."""
    if e is None or not (e / "params.safetensors").is_file():
        return None
    try:
        import jax
        from safetensors.numpy import load_file

        from m2r2_jax.model.params import ParamSpec, flatten_with_names, model_spec

        cfg = from_dict(ModelConfig, json.loads((e / "config.json").read_text()))
        flat = load_file(str(e / "params.safetensors"))
        spec = model_spec(cfg)
        named = dict(flatten_with_names(spec))
        if set(named) != set(flat) or any(tuple(flat[n].shape) != tuple(s.shape) for n, s in named.items()):
            return None
        treedef = jax.tree.structure(spec, is_leaf=lambda x: isinstance(x, ParamSpec))
        return cfg, jax.tree.unflatten(treedef, [flat[n] for n in named])
    except Exception:  # noqa: BLE001 - a damaged entry is a miss
        return None


def save_params(e: Path | None, cfg: ModelConfig, params) -> None:
    if e is None:
        return
    from safetensors.numpy import save_file

    from m2r2_jax.model.params import flatten_with_names

    flat = {n: np.ascontiguousarray(a, np.float32) for n, a in flatten_with_names(params)}

    def fill(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(to_dict(cfg)))
        save_file(flat, str(tmp / "params.safetensors"))

    _publish(e, fill)


def load_tokenizer(e: Path | None):
    if e is None or not (e / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(e))
    except Exception:  # noqa: BLE001 - a damaged entry is a miss
        return None


def save_tokenizer(e: Path | None, tok) -> None:
    if e is not None:
        _publish(e, lambda tmp: tok.save_pretrained(str(tmp)))
