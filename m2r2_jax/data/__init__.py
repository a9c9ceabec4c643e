"""Data: training prompt sources, evaluation sets, packed training batches (all read through `datasets`)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """`$M2R2_DATA`, default `<repo>/../shared/data` (not checked here)."""
    env = os.environ.get("M2R2_DATA")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


def quiet_datasets():
    """The `datasets` module with its progress bars and info logging off."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets
