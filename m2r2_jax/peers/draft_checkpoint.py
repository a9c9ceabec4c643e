"""The trained speculative peers' checkpoints, read side (Kangaroo's adapter, the 2-model drafter's small
model, Medusa's heads, EAGLE's draft layer): which base a checkpoint belongs to, its metadata and config,
and its params restored from Orbax.

The training loop (training/spec_peers.py) writes them with `training.checkpoint.Checkpointer` (items
params / opt_state / extra / meta); decoding reads `params` and `meta` only. The meta names the base by
`base_signature`, a hash that the training params (float32, unpacked) and the decode-time params (the
CPU kernels' packed layout, or bfloat16) share, so a drafter can check its base where it is prepared.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np

from m2r2_jax.errors import M2R2Error
from m2r2_jax.kernels import PackedWeight
from m2r2_jax.orbax_paths import ckpt_path, restore_error


def _corner(w) -> np.ndarray:
    """The [:8, :8] corner of a weight (a packed one's first panel holds the same corner), rounded to
    bfloat16 so that a float32 and a bfloat16 load of the same weights agree."""
    a = w.data[0, :8, :8] if isinstance(w, PackedWeight) else w[tuple(slice(0, 8) for _ in np.shape(w))]
    return np.asarray(jax.numpy.asarray(a).astype(jax.numpy.bfloat16).astype(jax.numpy.float32))


def base_signature(cfg, base: dict) -> str:
    """The identity of a base model as a drafter sees it: its config (dtypes aside) and corners of its
    embedding, final norm and every layer's norms, query and down projections."""
    rec = cfg.record()
    for k in ("dtype", "param_dtype", "matmul_dtype"):
        rec.pop(k, None)
    h = hashlib.sha256(json.dumps(rec, sort_keys=True, default=str).encode())
    leaves = [("embed", base["embed"]), ("final_norm", base["final_norm"])]
    for i, lp in enumerate(base["layers"]):
        leaves += [
            (f"{i}.attn_norm", lp["attn_norm"]),
            (f"{i}.mlp_norm", lp["mlp_norm"]),
            (f"{i}.wq", lp["attn"]["wq"]),
        ]
        if "down" in lp["mlp"]:
            leaves.append((f"{i}.down", lp["mlp"]["down"]))
    for name, w in leaves:
        h.update(name.encode())
        h.update(_corner(w).tobytes())
    return h.hexdigest()[:32]


def resolve_draft_checkpoint(path, kind: str, label: str) -> tuple[Path, int, dict]:
    """A run dir (its latest step) or a step dir of a `kind` checkpoint -> (step dir, step, meta).
    `label` names the drafter in the one-line errors."""
    if not path:
        raise M2R2Error(f"{label}: a checkpoint directory is required")
    p = ckpt_path(path)
    if not p.exists():
        raise M2R2Error(f"{label}: checkpoint not found: {path}")
    if not p.is_dir():
        raise M2R2Error(f"{label}: checkpoint {path} is a file, expected a checkpoint directory")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not (p / "meta").is_dir():
        steps = sorted(int(c.name) for c in p.iterdir() if c.is_dir() and c.name.isdigit() and (c / "meta").is_dir())
        if not steps:
            raise M2R2Error(f"{label}: no checkpoint steps in {path}")
        p = p / str(steps[-1])
    f = p / "meta" / "metadata"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise M2R2Error(f"{label}: cannot read checkpoint metadata {f}: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        got = meta.get("kind") if isinstance(meta, dict) else None
        raise M2R2Error(f"{label}: {path} is not a {kind} checkpoint (kind {got!r})")
    for k in ("config", "base"):
        if not isinstance(meta.get(k), dict):
            raise M2R2Error(f"{label}: corrupt checkpoint metadata {f}: no {k!r} object")
    return Path(str(p)), int(p.name), meta


def check_base(meta: dict, cfg, base: dict, label: str, where) -> None:
    """Refuse a checkpoint trained on another base model (its config or its weights differ)."""
    want = meta["base"].get("signature")
    got = base_signature(cfg, base)
    if want != got:
        raise M2R2Error(
            f"{label}: checkpoint {where} was trained on another base model ({meta['base'].get('model')!r}, "
            f"signature {want}; this base: {got})"
        )


def restore_draft_params(step_dir: Path, step: int, abstract, label: str):
    """The `params` item of a checkpoint step, restored into `abstract` (shapes and dtypes checked)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.CheckpointManager(ckpt_path(step_dir).parent) as mngr:
            r = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    except Exception as e:
        raise M2R2Error(f"{label}: cannot restore params from {step_dir}: {restore_error(e)}") from None
    return r.params


def config_from_meta(cls, meta: dict, label: str):
    """The run config a checkpoint's meta records, as `cls` (one line when it does not fit)."""
    try:
        return cls(**meta["config"])
    except TypeError as e:
        raise M2R2Error(f"{label}: checkpoint config does not match {cls.__name__}: {e}") from None


def load_draft(path, kind: str, cls, cfg, base: dict | None, abstract):
    """A trained part (a run dir: its latest step; or a step dir) of a `kind` checkpoint -> (params, its
    config (a `cls`, checked against cfg), meta). `abstract(config)`: the params' abstract tree. With
    `base`, a checkpoint trained on another base model is refused (one line)."""
    step_dir, step, meta = resolve_draft_checkpoint(path, kind, kind)
    if base is not None:
        check_base(meta, cfg, base, kind, path)
    c = config_from_meta(cls, meta, kind)
    c.check(cfg)
    return restore_draft_params(step_dir, step, abstract(c), kind), c, meta
