"""Every drafter on the same prompts in one process: one table of speed-up over our own AR decode, tau,
losslessness, the draft and verify cost per step, trainable parameters and training minutes, per
category. Each drafter runs through `run_spec_eval` (the one jitted loop; its AR decode is timed in
the same call, so each speed-up is a ratio measured in one run), with its own journal under
`work_dir`, and a finished drafter's result is kept there, so an interrupted comparison resumes.

Drafter specs: a `--drafter` name of eval.speculative (decoding/peer_drafters/options.py DRAFTERS) for
the drafter alone (M2R2 alone is `m2r2`: prompt lookup off), or `NAME+lookup` for it combined with
prompt lookup (`COMBINES`: M2R2, Kangaroo, the 2-model drafter, Medusa, EAGLE, EAGLE-2; `m2r2+lookup`
is eval.speculative's default command).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from m2r2_jax.errors import M2R2Error

COMBINES = ("m2r2", "kangaroo", "sps", "medusa", "eagle", "eagle2")  # combine with prompt lookup in one loop


def parse_specs(text: str | Sequence[str]) -> tuple[str, ...]:
    from m2r2_jax.decoding.peer_drafters.options import DRAFTERS

    specs = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not specs:
        raise M2R2Error("--drafters: give at least one drafter")
    for s in specs:
        name, _, extra = s.partition("+")
        if name not in DRAFTERS:
            raise M2R2Error(f"--drafters: unknown drafter {name!r}; choose from {', '.join(DRAFTERS)}")
        if extra and (extra != "lookup" or name not in COMBINES):
            raise M2R2Error(f"--drafters: {s!r}: only {', '.join(c + '+lookup' for c in COMBINES)} combine")
    if len(set(specs)) != len(specs):
        raise M2R2Error("--drafters: a drafter is listed twice")
    return tuple(specs)


def spec_options(spec: str, knobs: dict | None = None):
    """The draft options of a spec; `knobs` (the peers' knob values, None = default) are handed to the
    drafter they belong to only."""
    from m2r2_jax.decoding.peer_drafters.options import DRAFTERS, draft_options

    name, _, extra = spec.partition("+")
    own = {k: v for k, v in (knobs or {}).items() if k in DRAFTERS[name][1] and v is not None}
    if name in COMBINES:
        own["lookup"] = own.get("lookup", 4) if extra else 0
    return draft_options(name, **own)


def _row(res: dict, trainable: int | None, minutes: float | None) -> dict:
    cost = res.get("cost") or {}
    return dict(
        speedup=res["overall_speedup"],
        tau=res["tau"],
        lossless=res["lossless"],
        draft_ms=cost.get("draft_ms"),
        verify_ms=cost.get("verify_ms"),
        step_ms=cost.get("spec_ms_per_step"),
        ar_tokens_per_second=(res.get("totals") or {}).get("ar_tps"),
        trainable_params=trainable,
        train_minutes=minutes,
        prompts=res["prompts"],
        per_category={
            cat: dict(speedup=c["speedup"], tau=c["tau"], lossless=c["lossless"], prompts=c["prompts"])
            for cat, c in res["per_category"].items()
        },
    )


def run_compare(
    model,
    bundle,
    items,
    specs: Sequence[str],
    base_config,
    work_dir,
    *,
    knobs: dict | None = None,
    backend=None,
    decode_params=None,
    resume: bool = False,
    progress: bool = True,
    journal_key: dict | None = None,
    budgets: dict[str, dict] | None = None,
) -> dict:
    """`base_config`: a SpecEvalConfig whose `draft` is replaced per spec; `bundle`: the M2R2 checkpoint
    (M2R2Bundle; needed by the m2r2 specs); `budgets`: {drafter name: {"trainable_params",
    "train_minutes"}} for trained drafters (M2R2's: its checkpoint's trainable parameters; minutes if
    its metadata has them). Training-free drafters report 0 and 0."""
    from m2r2_jax.backend import XLA
    from m2r2_jax.evaluation.spec_eval import machine_info, run_spec_eval

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {}
    budgets = dict(budgets or {})
    if bundle is not None and "m2r2" not in budgets:
        meta = getattr(bundle, "meta", None) or {}
        budgets["m2r2"] = dict(
            trainable_params=int(sum(x.size for x in jax.tree.leaves(bundle.params))),
            train_minutes=meta.get("train_minutes"),
        )
    for spec in specs:
        opts = spec_options(spec, knobs)
        name = spec.partition("+")[0]
        done = work / f"{spec}.json"
        # what a finished row was measured with: a row is reused only under the same key
        key = dict(journal_key or {}, drafter=spec, max_new_tokens=base_config.max_new_tokens)
        if not opts.needs_m2r2:
            key.pop("checkpoint", None)  # the M2R2 checkpoint matters to the m2r2 rows only
        key["options"] = opts.describe() if hasattr(opts, "describe") else {}
        key = json.loads(json.dumps(key, default=str))
        if resume and done.is_file():
            row = json.loads(done.read_text())
            old = row.get("key") or {}
            diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
            if diff:
                raise M2R2Error(
                    f"{done} was measured with other settings (differs in: {', '.join(diff)}): delete it to rerun"
                )
            out[spec] = row
            continue
        if opts.needs_m2r2 and bundle is None:
            raise M2R2Error(f"{spec}: needs the M2R2 checkpoint")
        ec = dataclasses.replace(base_config, draft=opts)
        journal = work / f"{spec}.partial.jsonl"
        res = run_spec_eval(
            model,
            bundle if opts.needs_m2r2 else None,
            items,
            ec,
            backend=backend or XLA,
            decode_params=decode_params,
            journal=journal,
            resume=resume and journal.exists(),
            journal_key=dict(journal_key or {}, drafter=spec),
            progress=progress,
        )
        b = budgets.get(name, {}) if opts.needs_m2r2 or name in budgets else dict(trainable_params=0, train_minutes=0)
        if name not in budgets and hasattr(opts, "budget"):  # a trained peer: its checkpoint's meta
            b = opts.budget()
        row = _row(res, b.get("trainable_params"), b.get("train_minutes"))
        row["options"] = key["options"]
        row["key"] = key
        # a long comparison's rows may come from several sessions (--resume): each says where and when
        m = machine_info()
        row["measured"] = dict(processor=m["processor"], date=m["date"], commit=m["commit"])
        done.write_text(json.dumps(row, default=str))
        journal.unlink(missing_ok=True)
        out[spec] = row
    return dict(drafters=out, lossless=all(r["lossless"] is not False for r in out.values()))


def _measured(row: dict) -> str:
    m = row.get("measured") or {}
    return " ".join(str(x) for x in (m.get("processor"), (m.get("date") or "")[:10]) if x) or "-"


def format_table(res: dict) -> str:
    def f(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    lines = [
        "| drafter | speed-up | tau | lossless | draft ms | verify ms | AR tok/s | trainable params | train min "
        "| measured |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in res["drafters"].items():
        loss = "n/a" if r["lossless"] is None else ("yes" if r["lossless"] else "NO")
        lines.append(
            f"| {name} | {f(r['speedup'])} | {f(r['tau'])} | {loss} | {f(r['draft_ms'], '.1f')} | "
            f"{f(r['verify_ms'], '.1f')} | {f(r.get('ar_tokens_per_second'), '.1f')} | "
            f"{r['trainable_params'] if r['trainable_params'] is not None else '-'} | "
            f"{f(r['train_minutes'], '.1f')} | {_measured(r)} |"
        )
    return "\n".join(lines)


def render_png(res: dict, title: str = "") -> bytes:
    """Speed-up over AR per drafter (bars), tau annotated."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(res["drafters"])
    sp = [res["drafters"][n]["speedup"] or 0.0 for n in names]
    fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 2), 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    bars = ax.bar(range(len(names)), sp, color="tab:blue")
    for b, n in zip(bars, names):
        tau = res["drafters"][n]["tau"]
        ax.annotate(
            "" if tau is None else f"tau {tau:.2f}",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speed-up over our AR (same run)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
