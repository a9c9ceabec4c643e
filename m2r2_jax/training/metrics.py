"""One small metrics tracker: TensorBoard (tensorboardX) + JSONL, process 0 only."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np


class Tracker:
    """`resume_step`: a run resumed from that step drops the JSONL records of later steps (logged before
    the interruption, after the last checkpoint), so every step appears once."""

    def __init__(self, out_dir: str | Path, enabled: bool | None = None, resume_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.dir = Path(out_dir)
        self._tb = None
        self._f = None
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / "metrics.jsonl"
            if path.exists():
                keep = [
                    line
                    for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step
                ]
                path.write_text("".join(line + "\n" for line in keep))
            self._f = open(path, "a")
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:  # TensorBoard is optional; JSONL always works
                self._tb = None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        flat = {}
        for k, v in metrics.items():
            a = np.asarray(v)
            if a.ndim == 0:
                flat[k] = float(a)
            else:
                for i, x in enumerate(a.reshape(-1)):
                    flat[f"{k}/{i}"] = float(x)
        self._f.write(json.dumps({"step": step, "time": time.time(), **flat}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in flat.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb is not None:
            self._tb.close()
