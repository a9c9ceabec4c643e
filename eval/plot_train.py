"""Training curves from train.train's metrics.jsonl.

python -m eval.plot_train RUN_DIR/metrics.jsonl --out curves.png [--smooth 10]
python -m eval.plot_train RUN_A/metrics.jsonl RUN_B/metrics.jsonl --labels A,B --out compare.png

One file: its losses, agreement and per-layer agreement. Several: their agreement and KD loss on the
same axes (one label each, default the run directories' names).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m2r2_jax.cli import run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.plot_train", description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+")
    p.add_argument("--labels", default=None, help="comma-separated, one per metrics file (several files)")
    p.add_argument("--out", required=True)
    p.add_argument("--smooth", type=int, default=10)
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)

    from m2r2_jax.cli import check_number, read_json
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.plots import render_train_comparison, render_train_curves

    out = Path(a.out)
    check_number("--smooth", a.smooth, lo=1, integer=True)
    srcs = [Path(m) for m in a.metrics]
    labels = a.labels.split(",") if a.labels else [s.parent.name or str(s) for s in srcs]
    if len(labels) != len(srcs):
        raise M2R2Error(f"--labels: {len(labels)} labels for {len(srcs)} metrics files")
    if len(set(labels)) != len(labels):
        raise M2R2Error(f"--labels: repeated label among {labels} (give --labels)")
    if not out.parent.is_dir():
        raise M2R2Error(f"--out: directory {out.parent} does not exist")
    runs = {}
    for label, src in zip(labels, srcs):
        rows = read_json(src, jsonl=True)
        if not rows or any(not isinstance(r.get("step"), int) for r in rows):
            raise M2R2Error(f"{src} has no training metrics rows")
        runs[label] = rows
    if len(runs) == 1:
        png = render_train_curves(runs[labels[0]], a.title or str(srcs[0]), a.smooth)
    else:
        png = render_train_comparison(runs, a.title, a.smooth)
    out.write_bytes(png)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
