"""The peers trained to a wall-clock budget (`--minutes M`, the equal-budget comparison with M2R2): the
flag's one check (`parse_minutes`, the type of `--minutes` in every peer trainer's parser and the check of
`spec_peers.RunLimits`), the budget fields a peer checkpoint's metadata carries (written by the training
loop at every save: training/spec_peers.py, training/peers.train_specee) as eval.compare / eval.dynamic
read them, the publication of a finished run, and M2R2's minutes to a step projected on this machine.

The budget is measured from the start of a call's first step, its compile included, summed over resumed
calls (each resumed call compiles again); a run stops after the step during which it ran out, and saves.
The learning-rate schedule stays defined on `--steps`: give a step count the budget does not reach.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from m2r2_jax.errors import M2R2Error

BUDGET_FIELDS = ("train_minutes", "steps_run", "trainable_params", "budget_minutes")


def parse_minutes(text) -> float | None:
    """`--minutes` as given (the command line's text, or a number; None: no budget) -> minutes, a finite
    number > 0, or one error line."""
    if text is None:
        return None
    try:
        m = math.nan if isinstance(text, bool) else float(text)
    except (TypeError, ValueError):
        m = math.nan
    if not (math.isfinite(m) and m > 0):
        raise M2R2Error(f"--minutes must be a number of minutes > 0, got {text!r}")
    return m


def _newest_step(out_dir) -> Path | None:
    ck = Path(out_dir) / "checkpoints"
    if not ck.is_dir():
        return None
    steps = sorted(int(c.name) for c in ck.iterdir() if c.name.isdigit() and (c / "meta" / "metadata").is_file())
    return ck / str(steps[-1]) if steps else None


def read_budget(out_dir) -> dict:
    """A trained peer's budget from its newest checkpoint's metadata: {train_minutes, steps_run,
    trainable_params, budget_minutes} (None where it does not record one; all None without a
    checkpoint). `steps_run` falls back to the checkpoint's step."""
    step_dir = _newest_step(out_dir)
    if step_dir is None:
        return dict.fromkeys(BUDGET_FIELDS)
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise M2R2Error(f"cannot read {step_dir / 'meta' / 'metadata'}: {e}") from None
    if not isinstance(meta, dict):
        raise M2R2Error(f"{step_dir / 'meta' / 'metadata'}: not a JSON object")
    out = {k: meta.get(k) for k in BUDGET_FIELDS}
    if out["steps_run"] is None:
        out["steps_run"] = meta.get("step")
    return out


# the peers whose loaders (training.peers.load_*) restore the optimizer state too
_LOADS_OPT_STATE = ("exit_heads", "layerskip", "skipdecode", "specee")


def publish(src, dst, max_mb: float = 30.0) -> dict:
    """Copy a finished run's newest checkpoint to `dst` (a folder meant for git) as its loaders read it:
    params, extra and meta, plus the optimizer state for the early-exit peers (their loaders restore it);
    floating leaves stored as bfloat16 when the float32 arrays exceed `max_mb` (the loaders restore into
    float32 trees, so they read either). summary.json and metrics.jsonl are copied beside it.
    -> {kind, step, stored_dtype, megabytes}."""
    import shutil

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    step_dir = _newest_step(src)
    if step_dir is None:
        raise M2R2Error(f"publish: no checkpoint under {Path(src) / 'checkpoints'}")
    step = int(step_dir.name)
    src_ck = Path(src).resolve() / "checkpoints"
    meta = json.loads((step_dir / "meta" / "metadata").read_text(encoding="utf-8"))
    names = ["params", "extra"] + (["opt_state"] if meta.get("kind") in _LOADS_OPT_STATE else [])
    with ocp.CheckpointManager(src_ck) as mngr:
        args = {k: ocp.args.StandardRestore() for k in names}
        got = mngr.restore(step, args=ocp.args.Composite(**args))
    trees = {k: got[k] for k in names}
    nbytes = sum(x.nbytes for k in names if k != "extra" for x in jax.tree.leaves(trees[k]))
    dtype = "float32"
    if nbytes > max_mb * 1e6:
        dtype = "bfloat16"
        half = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        for k in names:
            if k != "extra":
                trees[k] = jax.tree.map(half, trees[k])
    out = Path(dst).resolve()
    if (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, stored_dtype=dtype, published_from=str(src))
    items = {k: ocp.args.StandardSave(v) for k, v in trees.items()}
    with ocp.CheckpointManager(out / "checkpoints") as mngr:
        mngr.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), force=True)
        mngr.wait_until_finished()
    for f in ("summary.json", "metrics.jsonl"):
        if (Path(src) / f).is_file():
            shutil.copyfile(Path(src) / f, out / f)
    size = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    return dict(kind=meta.get("kind"), step=step, stored_dtype=dtype, megabytes=round(size / 1e6, 1))


def projected_minutes(metrics_path, steps: int, first: int = 1) -> dict:
    """The wall minutes `steps` training steps take on this machine, projected from a short run's
    metrics.jsonl (Tracker lines with `tokens` and `tokens_per_second`: per step tokens /
    tokens_per_second = that step's wall seconds): the first logged step (it compiles) plus
    (steps - 1) x the median of the later ones. The peers' equal budget is M2R2's run to its equal-budget
    step projected so on the machine the peers train on (a run's own record mixes machines and, early
    on, contention). -> {minutes, first_step_seconds, step_seconds, probe_steps}."""
    secs = {}
    try:
        lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise M2R2Error(f"cannot read {metrics_path}: {e}") from None
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        if r.get("step", 0) >= first and r.get("tokens_per_second"):
            secs[r["step"]] = float(r["tokens"]) / float(r["tokens_per_second"])
    if len(secs) < 3 or min(secs) != first:
        raise M2R2Error(f"{metrics_path}: need the timings of step {first} and at least two later steps")
    ordered = [secs[k] for k in sorted(secs)]
    later = sorted(ordered[1:])
    median = later[len(later) // 2] if len(later) % 2 else 0.5 * (later[len(later) // 2 - 1] + later[len(later) // 2])
    return dict(
        minutes=(ordered[0] + (steps - 1) * median) / 60.0,
        first_step_seconds=ordered[0],
        step_seconds=median,
        probe_steps=len(ordered),
    )
