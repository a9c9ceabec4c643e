"""The peers trained to a wall-clock budget (`--minutes M`, the equal-budget comparison with M2R2): the
flag's check, the early-exit peers (exit heads, LayerSkip, SkipDecode) run through the trained
speculative peers' loop (training/spec_peers.py: its `budget_minutes` stop, Orbax checkpoints, exact
resume), and the budget fields every peer checkpoint's metadata carries for eval.compare / eval.dynamic.

The budget is measured from the start of a call's first step, its compile included, summed over resumed
calls (each resumed call compiles again); a run stops after the step during which it ran out, and saves.
The learning-rate schedule stays defined on `--steps`: give a step count the budget does not reach.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax

from m2r2_jax.errors import M2R2Error

BUDGET_FIELDS = ("train_minutes", "steps_run", "trainable_params", "budget_minutes")


def parse_minutes(text) -> float | None:
    """`--minutes` as given (None: no budget) -> minutes, a finite number > 0, or one error line."""
    if text is None:
        return None
    try:
        m = float(text)
    except (TypeError, ValueError):
        m = math.nan
    if not (math.isfinite(m) and m > 0):
        raise M2R2Error(f"--minutes must be a number of minutes > 0, got {text!r}")
    return m


def split_minutes(argv) -> tuple[float | None, list[str] | None]:
    """argv (None: sys.argv[1:]) -> (--minutes checked, the other arguments) for a trainer whose own
    parser has no --minutes; given with --budget-minutes it is one error line."""
    import argparse
    import sys

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--minutes", default=None)
    a, rest = p.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    minutes = parse_minutes(a.minutes)
    if minutes is not None and any(x == "--budget-minutes" or x.startswith("--budget-minutes=") for x in rest):
        raise M2R2Error("--minutes and --budget-minutes are the same budget: give one")
    return minutes, rest


def run_dir_of(argv) -> str | None:
    """The --out of a trainer's arguments (None when not given)."""
    import argparse

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--out", default=None)
    return p.parse_known_args(list(argv))[0].out


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


def stamp_budget(out_dir, budget_minutes: float | None, summary: dict | None = None) -> dict | None:
    """Write the budget fields into the newest checkpoint's metadata (`summary`: a trainer's summary,
    for the minutes and parameters a loop did not record there) -> the fields, None without a
    checkpoint (no step finished). Idempotent: a rerun of a finished run writes the same fields."""
    step_dir = _newest_step(out_dir)
    if step_dir is None:
        return None
    f = step_dir / "meta" / "metadata"
    meta = json.loads(f.read_text(encoding="utf-8"))
    s = summary or {}
    fields = dict(
        train_minutes=meta.get("train_minutes", s.get("minutes")),
        steps_run=int(s.get("steps", meta.get("step", 0))),
        trainable_params=meta.get("trainable_params", s.get("trainable_params")),
        budget_minutes=budget_minutes,
    )
    tmp = f.with_name(f.name + ".tmp")
    tmp.write_text(json.dumps(dict(meta, **fields)), encoding="utf-8")
    os.replace(tmp, f)
    return fields


def finish(kind: str, out_dir, budget_minutes: float | None, summary: dict) -> dict:
    """After a trainer's run: the budget fields stamped into its newest checkpoint and added to the
    summary; a line on stderr when a budgeted run did not end on its budget (its --steps ended it, or
    no step finished)."""
    import sys

    fields = stamp_budget(out_dir, budget_minutes, summary)
    if fields is None:
        print(f"{kind}: no step finished within the budget; nothing was saved", file=sys.stderr)
        return summary
    if budget_minutes is not None and summary.get("stopped") == "steps":
        print(
            f"{kind}: --steps ended the run after {fields['train_minutes']} of {budget_minutes} budget "
            "minutes; give more --steps for an equal-budget run",
            file=sys.stderr,
        )
    return dict(summary, **fields)


def _scalar_step(step, metrics: dict[str, int]):
    """A peer step whose metrics include per-layer vectors ({name: size}) -> (one whose metrics are all
    scalars, as the loop logs them: `name` of size n > 1 becomes `name/0` .. `name/{n-1}`; their names)."""
    sizes = tuple(metrics.values())

    def run(params, opt_state, base, tokens, mask):
        params, opt_state, *ms = step(params, opt_state, base, tokens, mask)
        flat = []
        for m, n in zip(ms, sizes):
            flat.extend([m] if n == 1 else [m[i] for i in range(n)])
        return (params, opt_state, *flat)

    names = [[k] if n == 1 else [f"{k}/{i}" for i in range(n)] for k, n in metrics.items()]
    return run, tuple(x for group in names for x in group)


def early_exit_recipe(kind: str, fingerprint: str = ""):
    """The `spec_peers.train_peer` recipe of an early-exit peer (kind: exit_heads | layerskip |
    skipdecode). Its checkpoints are what training.peers.load_exit_heads / load_layerskip /
    load_skipdecode read (kind, config, base_fingerprint; params, opt_state, extra seconds)."""
    from m2r2_jax.peers import exit_head as EH
    from m2r2_jax.peers import layerskip as LS
    from m2r2_jax.peers import skipdecode as SD
    from m2r2_jax.training.spec_peers import Peer

    if kind not in ("exit_heads", "layerskip", "skipdecode"):
        raise M2R2Error(f"unknown early-exit peer {kind!r}")

    def recipe(cfg, base, c):
        bad = [E for E in c.layers if not 1 <= E < cfg.num_layers]
        if bad:
            raise M2R2Error(f"exit layers must be in [1, {cfg.num_layers}), got {bad}")
        n = len(c.layers)
        if kind == "exit_heads":
            opt = EH.optimizer(c)
            params, step = EH.init_heads(cfg, n, c.rank, c.seed), EH.make_step(cfg, c, opt)
            metrics, key = {"loss": 1, "kl": n}, "heads"
        elif kind == "layerskip":
            opt = LS.optimizer(c)
            params, step = LS.init_adapters(cfg, c), LS.make_step(cfg, c, opt)
            metrics, key = {"loss": 1, "kl_exit": n, "kl_full": 1}, "adapters"
        else:
            opt = SD.optimizer(c)
            params, step = SD.init_adapters(cfg, c), SD.make_step(cfg, c, opt)
            metrics, key = {"kl": 1}, "adapters"
        step, names = _scalar_step(step, metrics)
        return Peer(kind, params, opt, step, names, key, dict(base_fingerprint=fingerprint))

    return recipe


def train_early_exit(kind, cfg, base, records, c, out_dir, model_name="", fingerprint="", limits=None, progress=True):
    """Train an early-exit peer (see early_exit_recipe) through the shared loop -> its summary (the
    trained tree under "params")."""
    from m2r2_jax.training.spec_peers import train_peer

    s = train_peer(
        early_exit_recipe(kind, fingerprint), cfg, base, records, c, out_dir, model_name, fingerprint, limits, progress
    )
    s["params"] = s.pop("heads" if kind == "exit_heads" else "adapters")
    s["layers"] = list(c.layers)
    return s


def run_peer_trainer(kind: str, doc: str, argv, trainer_main) -> int:
    """A trained speculative peer's CLI (`cli.peer_trainer_main`) with --minutes: checked before anything
    runs, passed on as its --budget-minutes, and the budget fields stamped into the checkpoint after."""
    import sys

    minutes, rest = split_minutes(argv)
    if "-h" in rest or "--help" in rest:
        print(
            "--minutes M: a wall-clock training budget: stop (and save) after the step during which it runs out "
            "(first step's compile included; --steps still sets the schedule). The other flags:"
        )
    args = rest + (["--budget-minutes", repr(minutes)] if minutes is not None else [])
    rc = trainer_main(kind, doc, args)
    out = run_dir_of(rest)
    if rc or out is None:
        return rc
    summary = {}
    if (Path(out) / "summary.json").is_file():
        summary = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    fields = finish(kind, out, minutes, summary)
    print(json.dumps({k: fields.get(k) for k in BUDGET_FIELDS}), file=sys.stderr)
    return rc


# the peers whose loaders (training.peers.load_*) restore the optimizer state too
_LOADS_OPT_STATE = ("exit_heads", "layerskip", "skipdecode", "specee")


def publish(src, dst, max_mb: float = 30.0) -> dict:
    """Copy a finished run's newest checkpoint to `dst` (a folder meant for git) as its loaders read it:
    params, extra and meta, plus the optimizer state for the early-exit peers (their loaders restore it);
    floating leaves stored as bfloat16 when the float32 arrays exceed `max_mb` (the loaders restore into
    float32 trees, so they read either). summary.json and metrics.jsonl are copied beside it.
    -> {kind, step, stored_dtype, megabytes}."""
    import shutil

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


def minutes_to_step(metrics_path, step: int) -> float:
    """The M2R2 run's training minutes up to `step` from its metrics.jsonl (Tracker lines with `tokens`
    and `tokens_per_second`: per step tokens / tokens_per_second = that step's wall seconds, the first
    step of every resumed call with its compile). Every step 1..step must be logged (log_every 1)."""
    secs = {}
    try:
        lines = Path(metrics_path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise M2R2Error(f"cannot read {metrics_path}: {e}") from None
    for line in lines:
        if not line.strip():
            continue
        r = json.loads(line)
        s = r.get("step", 0)
        if 1 <= s <= step and r.get("tokens_per_second"):
            secs[s] = float(r["tokens"]) / float(r["tokens_per_second"])
    missing = step - len(secs)
    if missing:
        raise M2R2Error(
            f"{metrics_path}: {missing} of steps 1..{step} have no timing (not reached yet, or log_every > 1)"
        )
    return sum(secs.values()) / 60.0
