"""The self-distillation cache's on-disk format, read side (written by training/distill.py): a
directory of JSONL shards listed in manifest.json. Low in the layering so that any layer may read a
cache (training reads it as data; the REST drafter reads its answers as a datastore)."""

from __future__ import annotations

import json
from pathlib import Path

from m2r2_jax.errors import M2R2Error

MANIFEST = "manifest.json"
FORMAT = "m2r2-distill-cache/1"


def read_manifest(out_dir: str | Path) -> dict | None:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        man = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise M2R2Error(f"corrupt distill cache manifest {p}: {e}") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise M2R2Error(f"{p} is not a distill cache manifest ({FORMAT})")
    return man


def shard_files(out: Path, man: dict) -> list[Path]:
    files = [out / s["file"] for s in man.get("shards", [])]
    for f in files:
        if not f.is_file():
            raise M2R2Error(f"distill cache {out}: shard {f.name} is listed in the manifest but missing")
    return files


def load_distill_cache(out_dir: str | Path):
    """The finished shards of a cache as one `datasets.Dataset`."""
    import datasets

    out = Path(out_dir)
    man = read_manifest(out)
    if man is None:
        raise M2R2Error(f"no distill cache at {out} (missing {MANIFEST})")
    files = shard_files(out, man)
    if not files:
        feats = datasets.Features(
            {
                "prompt_ids": datasets.List(datasets.Value("int64")),
                "answer_ids": datasets.List(datasets.Value("int64")),
                "prompt": datasets.Value("string"),
            }
        )
        return datasets.Dataset.from_dict({"prompt_ids": [], "answer_ids": [], "prompt": []}, features=feats)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets.load_dataset("json", data_files=[str(f) for f in files], split="train")
