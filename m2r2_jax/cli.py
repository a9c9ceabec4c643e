"""Shared CLI plumbing: one-line errors, model / mesh / backend flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable

from m2r2_jax.errors import M2R2Error


def run_main(main: Callable[[list[str] | None], int | None], argv=None) -> None:
    """Run a CLI entry point; a bad input exits 2 with one `error: ...` line.

    As a real process (argv None), the interpreter's teardown after that line is silenced: background
    threads of the checkpoint library may otherwise print tracebacks about their closed event loop."""
    try:
        rc = main(argv)
    except M2R2Error as e:
        msg = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"error: {msg}", file=sys.stderr, flush=True)
        if argv is None:
            _silence_teardown()
        sys.exit(2)
    sys.exit(rc or 0)


def _silence_teardown() -> None:
    import logging

    logging.disable(logging.CRITICAL)
    sys.unraisablehook = lambda *_: None
    try:
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives until exit
    except OSError:
        pass


def add_model_args(p: argparse.ArgumentParser, decode: bool = True) -> None:
    p.add_argument(
        "--model", default="smollm2-135m", help="alias (smollm2-135m), .gguf file, HF safetensors dir or hub id"
    )
    p.add_argument("--dtype", default=None, help="compute dtype (default float32; bfloat16 on TPU/GPU)")
    p.add_argument("--param-dtype", default=None, help="parameter dtype (default float32)")
    p.add_argument(
        "--matmul-dtype",
        default=None,
        help="matmul input dtype, accumulated in f32 (default: the compute dtype); "
        "bfloat16 with --param-dtype bfloat16 is the fast mode on AMX / AVX512-BF16 CPUs",
    )
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. data=1,fsdp=1,tensor=8 (default: no mesh, one device)")
    if not decode:
        return
    p.add_argument(
        "--cpu-kernel",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode through the CPU kernels (packed small-row matmul + block attention, "
        "m2r2_jax/kernels): auto = on the CPU backend with float32 params on one device; "
        "off = XLA's own dot and attention",
    )


def decode_setup(m, mode: str = "auto", mesh=None):
    """-> (backend, params) for decoding with `--cpu-kernel mode` (backend.resolve: one clear line when
    `on` cannot be honoured), the params laid out for that backend."""
    from m2r2_jax.backend import resolve

    backend = resolve(m.cfg, mode, mesh)
    return backend, backend.prepare(m.cfg, m.params)


def parse_mesh(spec: str | None):
    if not spec:
        return None
    from m2r2_jax.config import apply_overrides
    from m2r2_jax.sharding import MeshConfig, make_mesh, maybe_initialize_distributed

    cfg = apply_overrides(MeshConfig(), [s for s in spec.split(",") if s])
    maybe_initialize_distributed(cfg)
    return make_mesh(cfg)


def quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def read_json(path, jsonl: bool = False):
    """A JSON (or JSONL: a list of objects) file's data, with one clear error for a missing, unreadable,
    non-UTF-8 or malformed file (naming the line of a bad JSONL record)."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise M2R2Error(f"file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise M2R2Error(f"{p} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise M2R2Error(f"cannot read {p}: {e.strerror}") from None
    if not jsonl:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise M2R2Error(f"corrupt JSON {p}: {e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise M2R2Error(f"corrupt JSONL {p}, line {n}: {e.msg} (column {e.colno})") from None
            if not isinstance(rows[-1], dict):
                raise M2R2Error(f"corrupt JSONL {p}, line {n}: expected a JSON object")
    return rows


def check_number(flag: str, v, lo=None, hi=None, integer: bool = False) -> None:
    """One-line error unless v is a finite number (an integer when asked) in [lo, hi]."""
    import math

    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    ok = ok and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise M2R2Error(f"{flag} must be a finite {'integer' if integer else 'number'}{rng}, got {v!r}")


def add_budget_args(p: argparse.ArgumentParser, enforced: bool = True) -> None:
    """A peer trainer's `--minutes` (the wall-clock training budget; checked while parsing by
    peers.budget.parse_minutes: a bad value is one error line before anything runs) and, for the trainers
    of the one loop (`enforced`: training/spec_peers.py), `--save-minutes`."""
    from m2r2_jax.peers.budget import parse_minutes

    if not enforced:
        p.add_argument("--minutes", type=parse_minutes, default=None, help="the equal training budget, recorded")
        return
    p.add_argument(
        "--minutes",
        type=parse_minutes,
        default=None,
        metavar="M",
        help="wall-clock training budget: stop (and save) after the step during which M minutes of training "
        "are spent (first step's compile included, summed over resumed calls; --steps still sets the schedule)",
    )
    p.add_argument("--save-minutes", type=float, default=10.0, help="checkpoint at least this often (<= 10)")


def print_summary(kind: str, summary: dict) -> None:
    """A peer trainer's summary as one JSON line; on stderr, a budgeted run that saved nothing or that its
    --steps ended (its schedule then ends before its budget: an unequal comparison)."""
    import json

    b = summary.get("budget_minutes")
    if b is not None and not summary.get("steps"):
        print(f"{kind}: no step finished within the {b} minutes budget; nothing was saved", file=sys.stderr)
    elif b is not None and summary.get("stopped") == "steps":
        print(
            f"{kind}: --steps ended the run after {summary.get('minutes')} of {b} budget minutes; give more "
            "--steps for an equal-budget run",
            file=sys.stderr,
        )
    print(json.dumps(summary))


@dataclasses.dataclass(frozen=True)
class PeerTrainer:
    """A trained speculative peer's trainer CLI (train.train_<kind>): its own flag (the config field it
    sets, type, default, help), its default steps and lr, and whether --positions is a flag."""

    flag: str
    field: str
    cast: type
    default: float
    help: str
    steps: int
    lr: float
    positions: bool = False


PEER_TRAINERS = {
    "kangaroo": PeerTrainer("--exit-layer", "exit_layer", int, 3, "shallow base layers under the adapter", 200, 1e-3),
    "sps": PeerTrainer("--layers", "num_layers", int, 3, "the draft model's layers", 200, 3e-4),
    "medusa": PeerTrainer("--heads", "heads", int, 4, "Medusa heads", 400, 1e-3, True),
    "eagle": PeerTrainer("--noise", "noise", float, 0.2, "uniform noise on the input features", 400, 5e-4, True),
}


def _peer_training(kind: str):
    """-> (the peer's run config class, its training function, the summary key of its trained params)."""
    from m2r2_jax.peers import eagle, kangaroo, medusa, sps
    from m2r2_jax.training import medusa_eagle, spec_peers

    return {
        "kangaroo": (kangaroo.KangarooConfig, spec_peers.train_kangaroo, "adapter"),
        "sps": (sps.SPSConfig, spec_peers.train_sps, "draft"),
        "medusa": (medusa.MedusaConfig, medusa_eagle.train_medusa, "heads"),
        "eagle": (eagle.EagleConfig, medusa_eagle.train_eagle, "draft"),
    }[kind]


def peer_trainer_main(kind: str, doc: str, argv=None) -> int:
    """The trained speculative peers' trainer CLI (kind: kangaroo | sps | medusa | eagle; doc: the
    script's docstring): a self-distillation cache in, Orbax checkpoints, metrics and summary.json under
    --out; the same command resumes; `--minutes` ends it on wall clock. Prints the summary as one JSON
    line."""
    t = PEER_TRAINERS[kind]
    p = argparse.ArgumentParser(prog=f"python -m train.train_{kind}", description=doc.split("\n")[0])
    add_model_args(p, decode=False)
    p.add_argument("--distill-dir", required=True, help="a self-distillation cache (train.train --distill-only)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, summary.json)")
    p.add_argument(t.flag, type=t.cast, default=t.default, help=t.help + " (default %(default)s)")
    p.add_argument("--steps", type=int, default=t.steps)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    if t.positions:
        p.add_argument("--positions", type=int, default=96, help="loss positions per row that read the LM head")
    p.add_argument("--lr", type=float, default=t.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use the first N distilled answers")
    add_budget_args(p)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    quiet_env()
    from pathlib import Path

    from m2r2_jax.distill_cache import read_manifest
    from m2r2_jax.training.spec_peers import RunLimits

    config_cls, train, key = _peer_training(kind)
    run = dict(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, seed=a.seed)
    if t.positions:
        run["positions"] = a.positions
    c = config_cls(**{t.field: getattr(a, t.flag[2:].replace("-", "_"))}, **run)
    limits = RunLimits(budget_minutes=a.minutes, save_minutes=a.save_minutes)
    if a.limit is not None and a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if not Path(a.distill_dir).is_dir() or read_manifest(a.distill_dir) is None:
        raise M2R2Error(f"--distill-dir: no self-distillation cache at {a.distill_dir}")
    if Path(a.out).exists() and not Path(a.out).is_dir():
        raise M2R2Error(f"--out {a.out} is a file")

    from m2r2_jax.distill_cache import load_distill_cache
    from m2r2_jax.loading.registry import load_model

    ds = load_distill_cache(a.distill_dir)
    n = len(ds) if a.limit is None else min(a.limit, len(ds))
    records = [dict(prompt_ids=ds[i]["prompt_ids"], answer_ids=ds[i]["answer_ids"]) for i in range(n)]
    m = load_model(a.model, dtype=a.dtype, param_dtype=a.param_dtype, matmul_dtype=a.matmul_dtype, tokenizer=False)
    summary = train(m.cfg, m.params, records, c, a.out, a.model, m.fingerprint, limits, progress=not a.no_progress)
    summary.pop(key)
    print_summary(kind, summary)
    return 0
