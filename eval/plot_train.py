"""Training curves from train.train's metrics.jsonl.

python -m eval.plot_train RUN_DIR/metrics.jsonl --out curves.png [--smooth 10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from m2r2_jax.cli import run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.plot_train", description=__doc__.split("\n")[0])
    p.add_argument("metrics")
    p.add_argument("--out", required=True)
    p.add_argument("--smooth", type=int, default=10)
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)

    from m2r2_jax.cli import check_number, read_json
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.plots import render_train_curves

    src, out = Path(a.metrics), Path(a.out)
    check_number("--smooth", a.smooth, lo=1, integer=True)
    if not out.parent.is_dir():
        raise M2R2Error(f"--out: directory {out.parent} does not exist")
    rows = read_json(src, jsonl=True)
    if not rows or any(not isinstance(r.get("step"), int) for r in rows):
        raise M2R2Error(f"{src} has no training metrics rows")
    out.write_bytes(render_train_curves(rows, a.title or str(src), a.smooth))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
