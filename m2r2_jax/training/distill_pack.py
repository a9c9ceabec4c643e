"""A self-distillation cache kept in git: its answers without the prompts' text.

A distillation of ~20k answers takes longer than one working session, and a new checkout keeps only
what git holds; the training prompts must not be copied into the project. The pack is the cache's
journal in that form: per finished shard one `shard_NNNNN.npz` (numeric arrays only, read with
allow_pickle=False) holding, per row, the SHA-1 of the prompt text, the prompt's token count and the
answer's token ids; `pack.json` holds the cache manifest's model identity, settings and shard list.

`sync_pack(cache, pack)` adds the cache's shards the pack lacks; `restore_cache(pack, cache, prompts,
encode)` rebuilds the shards the cache lacks from the pack, the prompt texts found by their hash among
`prompts` (the training sources, read from ../shared/data as always) and re-encoded (the token count
must match). Either refuses when the two disagree on a shard they both hold.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from m2r2_jax.distill_cache import FORMAT, MANIFEST, read_manifest, shard_files
from m2r2_jax.errors import M2R2Error

PACK = "pack.json"
PACK_FORMAT = "m2r2-distill-pack/1"


def prompt_hash(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda t: t.write_text(json.dumps(obj, indent=1), encoding="utf-8"))


def read_pack(pack_dir: str | Path) -> dict | None:
    p = Path(pack_dir) / PACK
    if not p.is_file():
        return None
    try:
        man = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise M2R2Error(f"corrupt distill pack {p}: {e}") from None
    if not isinstance(man, dict) or man.get("format") != PACK_FORMAT:
        raise M2R2Error(f"{p} is not a distill pack ({PACK_FORMAT})")
    return man


def _entry(s: dict) -> tuple:
    return Path(s["file"]).stem, int(s["rows"]), int(s["new_tokens"])


def _check_prefix(short: list[dict], long: list[dict], what: str) -> None:
    a, b = [_entry(s) for s in short], [_entry(s) for s in long]
    if b[: len(a)] != a:
        raise M2R2Error(f"{what}: the cache and the pack hold different shards under the same names")


def _same_run(cache_man: dict, pack_man: dict, where: str) -> None:
    for k in ("model", "settings"):
        if cache_man.get(k) != pack_man.get(k):
            raise M2R2Error(f"{where}: the cache and the pack were made with another {k}")


def sync_pack(cache_dir: str | Path, pack_dir: str | Path) -> int:
    """Add to the pack the finished shards of the cache it lacks; -> shards added."""
    cache, pack = Path(cache_dir), Path(pack_dir)
    man = read_manifest(cache)
    if man is None:
        raise M2R2Error(f"no distill cache at {cache} (missing {MANIFEST})")
    pm = read_pack(pack) or {"format": PACK_FORMAT, "model": man["model"], "settings": man["settings"], "shards": []}
    _same_run(man, pm, f"distill pack {pack}")
    _check_prefix(pm["shards"], man["shards"], f"distill pack {pack}")
    new = man["shards"][len(pm["shards"]) :]
    if not new:
        return 0
    pack.mkdir(parents=True, exist_ok=True)
    vocab = int(man["model"]["config"]["vocab_size"])
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    files = dict(zip([s["file"] for s in man["shards"]], shard_files(cache, man)))
    for s in new:
        with open(files[s["file"]], encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        arrays = {
            "prompt_sha1": np.frombuffer(b"".join(prompt_hash(r["prompt"]) for r in rows), np.uint8).reshape(-1, 20),
            "prompt_len": np.asarray([len(r["prompt_ids"]) for r in rows], np.int32),
            "answer_len": np.asarray([len(r["answer_ids"]) for r in rows], np.int32),
            "answer_ids": np.asarray([t for r in rows for t in r["answer_ids"]], dtype),
        }
        name = Path(s["file"]).stem + ".npz"
        _write_atomic(pack / name, lambda t, a=arrays: np.savez_compressed(open(t, "wb"), **a))
        pm["shards"].append({"file": name, "rows": s["rows"], "new_tokens": s["new_tokens"]})
        _write_json(pack / PACK, pm)
    return len(new)


def restore_cache(
    pack_dir: str | Path, cache_dir: str | Path, prompts: Sequence[str], encode: Callable[[str], Sequence[int]]
) -> int:
    """Rebuild in the cache the pack's shards it lacks; -> shards written. Refused, with nothing written,
    when a packed prompt is not among `prompts` or re-encodes to another length."""
    pack, cache = Path(pack_dir), Path(cache_dir)
    pm = read_pack(pack)
    if pm is None:
        return 0
    man = read_manifest(cache)
    if man is None:
        if cache.is_dir() and any(cache.glob("shard_*.jsonl")):
            raise M2R2Error(f"{cache} holds shard files but no {MANIFEST}: not restoring over an unknown cache")
        man = {"format": FORMAT, "model": pm["model"], "settings": pm["settings"], "shards": [], "complete": False}
    _same_run(man, pm, f"distill pack {pack}")
    _check_prefix(man["shards"], pm["shards"], f"distill pack {pack}")
    todo = pm["shards"][len(man["shards"]) :]
    if not todo:
        return 0
    by_hash = {prompt_hash(t): t for t in prompts}
    built = []  # every shard checked before anything is written
    for s in todo:
        with np.load(pack / s["file"], allow_pickle=False) as z:
            sha, plen, alen, ans = z["prompt_sha1"], z["prompt_len"], z["answer_len"], z["answer_ids"]
        ends = np.cumsum(alen)
        rows = []
        for i in range(len(plen)):
            text = by_hash.get(sha[i].tobytes())
            if text is None:
                raise M2R2Error(f"distill pack {pack}: a prompt of {s['file']} is not among the training prompts")
            ids = [int(t) for t in encode(text)]
            if len(ids) != int(plen[i]):
                raise M2R2Error(f"distill pack {pack}: a prompt of {s['file']} encodes to another length")
            a = ans[ends[i] - alen[i] : ends[i]]
            rows.append({"prompt_ids": ids, "answer_ids": a.astype(np.int64).tolist(), "prompt": text})
        built.append((Path(s["file"]).stem + ".jsonl", s, rows))
    cache.mkdir(parents=True, exist_ok=True)
    for name, s, rows in built:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        _write_atomic(cache / name, lambda t, x=text: t.write_text(x, encoding="utf-8"))
        man["shards"].append({"file": name, "rows": s["rows"], "new_tokens": s["new_tokens"]})
    man["complete"] = False  # the distillation run decides (it knows the prompts still to do)
    _write_json(cache / MANIFEST, man)
    return len(built)
