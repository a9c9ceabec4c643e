"""Evaluation prompt sets as `EvalItem(id, category, turns)`.

`load_eval_set(name_or_path)` takes
  * a short name resolved under the shared data root (`$M2R2_DATA`, see
    `m2r2_jax.data.prompts.data_root`): mt_bench, spec_bench, koala,
    self_instruct, wizardlm, vicuna_bench, alpaca_eval; `builtin` is the
    project's own 16 prompts over 8 categories (m2r2_jax/assets/prompts/), so
    the README's main job runs on a machine without the shared data;
  * a local .json/.jsonl file (or a directory of them), read through
    `datasets.load_dataset("json", ...)`;
  * otherwise a hub dataset name, `name` or `name:split` (default split: test,
    else train, else the first), through `datasets.load_dataset`.

Record formats (detected from the keys):
  turns                       MT-Bench / Spec-Bench / Vicuna bench: all turns, `category`
  instruction + instances     Self-Instruct: instruction + the first instance's input
  instruction (+ input)       Alpaca family; AlpacaEval's `dataset` is the category
  Instruction                 WizardLM test set, `Skill` as the category
  prompt / question           Koala / GSM8K-like single prompts
Spec-Bench's 13 categories are mapped to its 6 task groups (multi-turn =
the 8 MT-Bench categories, translation, summarization, qa, math, rag); the
original category is kept in `raw_category`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path
from typing import Any

from m2r2_jax.errors import M2R2Error

EVAL_SETS = {
    "mt_bench": "mt_bench/question.jsonl",
    "spec_bench": "spec_bench/question.jsonl",
    "koala": "koala/koala_test_set.jsonl",
    "self_instruct": "self_instruct/user_oriented_instructions.jsonl",
    "wizardlm": "wizardlm/WizardLM_testset.jsonl",
    "vicuna_bench": "vicuna_bench/question.jsonl",
    "alpaca_eval": "alpaca_eval/alpaca_eval_prompts.jsonl",
}

MT_BENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
SPEC_BENCH_GROUPS = {
    **{c: "multi-turn" for c in MT_BENCH_CATEGORIES},
    "translation": "translation",
    "summarization": "summarization",
    "qa": "qa",
    "math_reasoning": "math",
    "rag": "rag",
}
_SPEC_ONLY = {"translation", "summarization", "qa", "math_reasoning", "rag"}
_EXTS = (".json", ".jsonl")


@dataclasses.dataclass
class EvalItem:
    id: str
    category: str
    turns: list[str]
    raw_category: str | None = None  # the record's own category where `category` is a group
    source: str = ""  # file or hub name it came from
    reference: str | None = None  # the dataset's reference answer to the first turn, where it has one


# ----------------------------------------------------------------------------- reading


def _local_records(path: Path) -> list[dict]:
    from m2r2_jax.data.prompts import read_records

    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in _EXTS)
    if not files:
        raise M2R2Error(f"no .json/.jsonl files under {path}")
    recs: list[dict] = []
    for f in files:
        if f.suffix not in _EXTS:
            raise M2R2Error(f"unsupported eval file {f}: expected .json or .jsonl")
        recs += read_records(f)[0]
    return recs


def _hub_records(name: str) -> list[dict]:
    from huggingface_hub.utils import logging as hf_logging

    from m2r2_jax.data import quiet_datasets

    datasets = quiet_datasets()
    ds_name, _, split = name.partition(":")
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # offline: no retry chatter before the one-line error
    try:
        if split:
            ds = datasets.load_dataset(ds_name, split=split)
        else:
            dd = datasets.load_dataset(ds_name)
            split = next((s for s in ("test", "train", "validation") if s in dd), next(iter(dd)))
            ds = dd[split]
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split, ...
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise M2R2Error(
            f"cannot load eval set {name!r}: not a short name ({', '.join(EVAL_SETS)}) or a local "
            f"path, and the hub dataset could not be loaded (offline or not found): "
            f"{type(e).__name__}: {msg}"
        ) from None
    finally:
        hf_logging.set_verbosity(level)
    return ds.to_list()


def _looks_local(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.endswith(_EXTS) or Path(s).expanduser().exists()


def _default_category(label: str) -> str:
    for short, rel in EVAL_SETS.items():
        if label.replace("\\", "/").endswith(rel):
            return short
    p = Path(label)
    return p.stem if p.suffix in _EXTS else label.rstrip("/").split("/")[-1].split(":")[0]


# ----------------------------------------------------------------------------- formats


def _s(x: Any) -> str:
    return x.strip() if isinstance(x, str) else ""


def _join(a: Any, b: Any) -> str:
    a, b = _s(a), _s(b)
    return f"{a}\n\n{b}" if a and b else a


def _format(keys: set[str]) -> str:
    for fmt, need in (
        ("turns", "turns"),
        ("self_instruct", "instances"),
        ("instruction", "instruction"),
        ("Instruction", "Instruction"),
        ("prompt", "prompt"),
        ("question", "question"),
    ):
        if need in keys and (fmt != "self_instruct" or "instruction" in keys):
            return fmt
    raise M2R2Error(
        f"unknown eval record format (keys: {sorted(keys)}); expected one of turns, instruction, "
        f"Instruction, prompt, question"
    )


def _turns(rec: dict, row: int, label: str) -> list[str]:
    """A record's `turns`: a list of strings (a bare string or a number is an error, not a guess)."""
    t = rec.get("turns")
    if t is None:
        return []
    if not isinstance(t, (list, tuple)) or not all(isinstance(x, str) or x is None for x in t):
        raise M2R2Error(
            f"{label}: record {row + 1}: 'turns' must be a list of strings, got {type(t).__name__} {str(t)[:40]!r}"
        )
    return [_s(x) for x in t if _s(x)]


def _item(rec: dict, fmt: str, row: int, default_cat: str, label: str) -> EvalItem | None:
    rid = next((rec[k] for k in ("question_id", "id", "idx") if rec.get(k) is not None), row)
    raw = ref = None
    if fmt == "turns":
        turns = _turns(rec, row, label)
        raw = _s(rec.get("category")) or None
        r = rec.get("reference")
        ref = _s(r[0]) if isinstance(r, (list, tuple)) and r else _s(r)
    elif fmt == "self_instruct":
        inst = rec.get("instances") or []
        first = inst[0] if inst and isinstance(inst[0], dict) else {}
        turns = [_join(rec.get("instruction"), first.get("input"))]
        ref = _s(first.get("output"))
        raw = _s(rec.get("motivation_app")) or None  # ~70 apps: too fine to be the category
    elif fmt == "instruction":
        turns = [_join(rec.get("instruction"), rec.get("input"))]
        ref = _s(rec.get("output"))
        raw = _s(rec.get("dataset")) or _s(rec.get("category")) or None
    elif fmt == "Instruction":
        turns = [_s(rec.get("Instruction"))]
        raw = _s(rec.get("Skill")) or None
    else:
        turns = [_s(rec.get(fmt))]
        raw = _s(rec.get("category")) or None
    turns = [t for t in turns if t]
    if not turns:
        return None
    cat = default_cat if fmt == "self_instruct" else (raw or default_cat)
    return EvalItem(str(rid), cat, turns, raw, label, ref or None)


def items_of(records: list[dict], label: str, default_category: str | None = None) -> list[EvalItem]:
    """Records of one source -> EvalItems (records without any prompt text are skipped)."""
    if not records:
        return []
    keys: set[str] = set()
    for r in records[:1000]:
        keys.update(k for k, v in r.items() if v is not None)
    fmt = _format(keys)
    cat = default_category or _default_category(label)
    items = [it for i, r in enumerate(records) if (it := _item(r, fmt, i, cat, label)) is not None]
    if fmt == "turns" and any(it.raw_category in _SPEC_ONLY for it in items):  # Spec-Bench: task groups
        for it in items:
            it.category = SPEC_BENCH_GROUPS.get(it.raw_category or "", it.category)
    return items


def balanced_limit(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    """The first `limit` items taken round-robin over categories (in first-seen order), returned in file order."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise M2R2Error(f"limit must be >= 1, got {limit}")
    by_cat: OrderedDict[str, list[int]] = OrderedDict()
    for i, it in enumerate(items):
        by_cat.setdefault(it.category, []).append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for idx in by_cat.values():
            if depth < len(idx) and len(picked) < limit:
                picked.append(idx[depth])
        depth += 1
    return [items[i] for i in sorted(picked)]


def resolve_eval_source(name_or_path: str) -> tuple[str, str]:
    """-> (kind, location): ('local', path) or ('hub', name)."""
    from m2r2_jax.data import data_root

    s = str(name_or_path)
    if s == "builtin":  # the project's own small prompt set, shipped in the package
        return "local", str(Path(__file__).resolve().parents[1] / "assets" / "prompts" / "builtin.jsonl")
    if s in EVAL_SETS:
        p = data_root() / EVAL_SETS[s]
        if not p.is_file():
            raise M2R2Error(f"eval set {s!r} not found at {p} (set M2R2_DATA to the shared data directory)")
        return "local", str(p)
    if _looks_local(s):
        p = Path(s).expanduser()
        if not p.exists():
            raise M2R2Error(f"eval set file not found: {s}")
        return "local", str(p)
    return "hub", s


def load_eval_set(name_or_path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """Items of an eval set (see the module doc); `limit` keeps a category-balanced subset in file order."""
    kind, loc = resolve_eval_source(str(name_or_path))
    if kind == "local":
        recs = _local_records(Path(loc))
        default = str(name_or_path) if str(name_or_path) in EVAL_SETS else None
    else:
        recs, default = _hub_records(loc), None
    items = items_of(recs, loc, default)
    if not items:
        raise M2R2Error(f"eval set {name_or_path} has no prompts")
    return balanced_limit(items, limit)
