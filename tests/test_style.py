"""The tree is formatted and linted as pyproject.toml configures ruff (`ruff format`, `ruff check`)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args):
    exe = shutil.which("ruff")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "ruff", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("args", [("check", "."), ("format", "--check", ".")])
def test_ruff(args):
    r = _ruff(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
