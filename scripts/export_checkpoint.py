"""One training step's weights for inference: the step's Orbax items without the optimizer state (a third
of the size), in a new checkpoint directory that `--checkpoint` (and `load_m2r2`) takes.

    python scripts/export_checkpoint.py RUN_DIR OUT_DIR [--step N]

RUN_DIR is a training out_dir (or its checkpoints/ folder); the default step is the newest. Refused, with
nothing written, when the step is missing or its metadata unreadable, or OUT_DIR already holds it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, default=None)
    a = p.parse_args(argv)

    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.training.checkpoint import latest_step, read_meta

    src = Path(a.run_dir).resolve()
    if (src / "checkpoints").is_dir():
        src = src / "checkpoints"
    step = a.step if a.step is not None else latest_step(src)
    if step is None or not (src / str(step)).is_dir():
        raise M2R2Error(f"no checkpoint step {a.step if a.step is not None else '(any)'} in {src}")
    read_meta(src / str(step))  # a training step's metadata, checked
    out = Path(a.out_dir)
    if (out / str(step)).exists():
        raise M2R2Error(f"{out / str(step)} already exists")
    out.mkdir(parents=True, exist_ok=True)  # the step is copied beside its final place, then renamed
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        dst = Path(tmp) / str(step)
        shutil.copytree(src / str(step), dst, ignore=shutil.ignore_patterns("opt_state"))
        read_meta(dst)
        dst.rename(out / str(step))
    size = sum(f.stat().st_size for f in (out / str(step)).rglob("*") if f.is_file())
    print(f"step {step} of {src} -> {out / str(step)} ({size / 2**20:.1f} MiB, no optimizer state)")
    return 0


if __name__ == "__main__":
    from m2r2_jax.cli import run_main

    run_main(main)
