"""Where Orbax reads and writes, and how its errors are shown: shared by the training checkpoints and
the shipped assets (low in the layering: stdlib + etils only)."""

from __future__ import annotations

from pathlib import Path


def ckpt_path(p):
    """A checkpoint location: a local path (made absolute) or a remote one such as gs://bucket/run,
    as etils.epath paths (what Orbax reads and writes through)."""
    from etils import epath

    s = str(p)
    if "://" in s:
        return epath.Path(s)
    return epath.Path(Path(s).expanduser().absolute())


def restore_error(e: Exception) -> str:
    """The checkpoint library's error: its first line, without the TensorStore spec it may dump."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg.split(" See full TensorStore details")[0]
