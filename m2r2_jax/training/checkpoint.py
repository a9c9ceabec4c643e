"""Orbax checkpoints of the trainable M2R2 tree only (the base is never written).

Items per step: `params` (M2R2 tree), `opt_state`, `extra` (draft vocabulary
ids), `meta` (JSON: step, data position, seed, resolved config, base model
identity). Restores go into an abstract tree carrying the target shardings, so
a checkpoint written on 8 devices restores on 1 and vice versa; a checkpoint
for another base model or M2R2 config is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from m2r2_jax.errors import M2R2Error
from m2r2_jax.orbax_paths import ckpt_path, restore_error


def base_identity(model_name: str, cfg, params, fingerprint: str | None = None) -> dict:
    """The base model an M2R2 checkpoint belongs to. The same weights in another dtype are the same
    base: pass `fingerprint` (LoadedModel.fingerprint, taken from the source weights at float32)
    when `params` were loaded in another dtype."""
    from m2r2_jax.model.params import params_fingerprint

    c = cfg.record()  # fields added since checkpoints began are left out at their defaults
    for k in ("dtype", "param_dtype", "matmul_dtype"):
        c.pop(k, None)
    fp = fingerprint or params_fingerprint(params)
    return {"model": model_name, "config": json.loads(json.dumps(c)), "fingerprint": fp}


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    def __init__(self, directory: str | Path, save_every: int = 50, keep: int = 2, async_save: bool = True):
        ocp = _ocp()
        self.dir = ckpt_path(directory)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save, create=True
        )
        self.mngr = ocp.CheckpointManager(self.dir, options=opts)

    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def save(self, step: int, params, opt_state, extra: dict, meta: dict, force: bool = False) -> bool:
        ocp = _ocp()
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            extra=ocp.args.StandardSave(extra),
            meta=ocp.args.JsonSave(meta),
        )
        return self.mngr.save(step, args=args, force=force)

    def restore(self, step: int, abstract_params, abstract_opt, abstract_extra) -> tuple[Any, Any, dict, dict]:
        ocp = _ocp()
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt),
            extra=ocp.args.StandardRestore(abstract_extra),
            meta=ocp.args.JsonRestore(),
        )
        try:
            r = self.mngr.restore(step, args=args)
        except Exception as e:
            raise M2R2Error(f"cannot restore checkpoint step {step} from {self.dir}: {restore_error(e)}") from None
        return r.params, r.opt_state, r.extra, dict(r.meta)

    def read_meta(self, step: int) -> dict:
        return read_meta(self.dir / str(step))

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def latest_step(directory: str | Path) -> int | None:
    """The newest finished step in a checkpoint directory (None when there is none), creating nothing."""
    d = ckpt_path(directory)
    if not d.is_dir():
        return None
    steps = [int(c.name) for c in d.iterdir() if c.is_dir() and c.name.isdigit() and (c / "meta").is_dir()]
    return max(steps) if steps else None


def read_meta(step_dir: Path) -> dict:
    """A step's metadata, checked for the fields every reader needs (step, config, base)."""
    f = ckpt_path(step_dir) / "meta" / "metadata"
    if not f.is_file():
        raise M2R2Error(f"not an M2R2 checkpoint (no meta): {step_dir}")
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise M2R2Error(f"corrupt checkpoint metadata {f}: {e}") from None
    if not isinstance(meta, dict):
        raise M2R2Error(f"corrupt checkpoint metadata {f}: expected a JSON object")
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise M2R2Error(f"corrupt checkpoint metadata {f}: no valid 'step' (got {step!r})")
    for k in ("config", "base"):
        if not isinstance(meta.get(k), dict):
            raise M2R2Error(f"corrupt checkpoint metadata {f}: no {k!r} object")
    return meta


def check_compatible(meta: dict, base_id: dict, m2r2_cfg: dict | None, where: str) -> None:
    """Refuse a checkpoint made for another base model or another M2R2 architecture, naming what differs."""
    b = meta.get("base")
    if not isinstance(b, dict):
        raise M2R2Error(f"checkpoint {where}: its metadata has no base model identity")
    old_cfg, new_cfg = b.get("config") or {}, base_id["config"]
    diff = [k for k in sorted(set(old_cfg) | set(new_cfg)) if old_cfg.get(k) != new_cfg.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {old_cfg.get(k)!r} there, {new_cfg.get(k)!r} here" for k in diff[:4])
        raise M2R2Error(f"checkpoint {where} was made for another base model config ({shown})")
    if b.get("fingerprint") != base_id["fingerprint"]:
        raise M2R2Error(
            f"checkpoint {where} was made for base model {b.get('model')!r} with other weights (weight "
            f"fingerprint {b.get('fingerprint')} there, {base_id['fingerprint']} for {base_id['model']!r} here)"
        )
    if m2r2_cfg is not None:
        from m2r2_jax.config import from_dict, to_dict
        from m2r2_jax.m2r2.config import M2R2Config

        old = to_dict(from_dict(M2R2Config, meta["config"].get("m2r2") or {}))  # keys added since: defaults
    if m2r2_cfg is not None and old != m2r2_cfg:
        diff = sorted(k for k in set(old) | set(m2r2_cfg) if old.get(k) != m2r2_cfg.get(k))
        raise M2R2Error(f"checkpoint {where} has a different M2R2 config (differs in: {', '.join(diff)})")


def resolve_checkpoint_dir(path: str | Path) -> tuple[Path, int]:
    """A training out_dir (its checkpoints/), a run dir (latest step inside) or a step dir -> (step dir, step)."""
    p = ckpt_path(path)
    if not p.exists():
        raise M2R2Error(f"checkpoint not found: {p}")
    if not p.is_dir():
        raise M2R2Error(f"checkpoint {p} is a file: expected a checkpoint directory (a run dir or a step dir)")
    if (p / "meta").is_dir():
        return p, int(read_meta(p)["step"])
    if (p / "checkpoints").is_dir() and (p / "config.yaml").exists():  # train.train's out_dir
        p = p / "checkpoints"
    steps = sorted((int(c.name), c) for c in p.iterdir() if c.is_dir() and c.name.isdigit() and (c / "meta").is_dir())
    if not steps:
        raise M2R2Error(f"no checkpoint steps in {p}")
    return steps[-1][1], steps[-1][0]


def load_m2r2(path: str | Path, cfg, base_params, model_name: str, mesh=None, base_fingerprint: str | None = None):
    """Load trained M2R2 params for inference: -> (M2R2Config, params, draft_ids, meta).
    `base_fingerprint`: see `base_identity` (needed when the base was loaded in another dtype)."""
    from m2r2_jax.m2r2.params import m2r2_spec
    from m2r2_jax.model.params import abstract_params, logical_axes
    from m2r2_jax.training.config import config_from_dict

    step_dir, step = resolve_checkpoint_dir(path)
    meta = read_meta(step_dir)
    check_compatible(meta, base_identity(model_name, cfg, base_params, base_fingerprint), None, str(step_dir))
    tc = config_from_dict(meta["config"])
    mc = tc.m2r2.validate(cfg.num_layers)
    spec = m2r2_spec(cfg, mc)
    abstract = abstract_params(spec)
    if mesh is not None:
        from m2r2_jax.sharding import tree_shardings

        sh = tree_shardings(mesh, logical_axes(spec), abstract)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
    ocp = _ocp()
    n_draft = int(meta.get("draft_vocab_size", 0))
    extra_abs = {"draft_ids": jax.ShapeDtypeStruct((n_draft,), np.int32)}
    try:
        with ocp.CheckpointManager(step_dir.parent) as mngr:
            r = mngr.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract), extra=ocp.args.StandardRestore(extra_abs)
                ),
            )
    except Exception as e:
        raise M2R2Error(f"cannot restore M2R2 params from {step_dir}: {restore_error(e)}") from None
    return mc, r.params, r.extra["draft_ids"], meta
