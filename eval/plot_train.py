"""Training curves from train.train's metrics.jsonl.

python -m eval.plot_train RUN_DIR/metrics.jsonl --out curves.png [--smooth 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from m2r2_jax.cli import run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.plot_train", description=__doc__.split("\n")[0])
    p.add_argument("metrics")
    p.add_argument("--out", required=True)
    p.add_argument("--smooth", type=int, default=10)
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)

    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.plots import render_train_curves

    src, out = Path(a.metrics), Path(a.out)
    if not src.is_file():
        raise M2R2Error(f"metrics file not found: {src}")
    if not out.parent.is_dir():
        raise M2R2Error(f"--out: directory {out.parent} does not exist")
    try:
        rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise M2R2Error(f"corrupt metrics file {src}: {e}") from None
    if not rows or "step" not in rows[0]:
        raise M2R2Error(f"{src} has no training metrics rows")
    out.write_bytes(render_train_curves(rows, a.title or str(src), a.smooth))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main)
