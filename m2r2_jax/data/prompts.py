"""Training prompts for self-distillation: read, normalise, dedupe, hold out eval sets.

A source is a local `.json`/`.jsonl` file, a directory (every such file below
it, sorted), or a hub dataset name (`datasets.load_dataset(name, split="train")`).
Local files are read through `datasets`' json builder, with a plain `json`
fallback for files it cannot parse. The record format is detected from the
keys (see /work/shared/data/SOURCES.md):

  conversations  first human turn (LLaMA-Factory dpo / ShareGPT style)
  messages       first user turn (kto demo / OpenAI style)
  parent_message_id + text   Open-Assistant trees: root prompter messages
  turns          first turn (MT-Bench style)
  question       GSM8K
  instances      Self-Instruct tasks: instruction + first instance's input
  instruction    Alpaca family (+ input), LIMA, GPTeacher, Code Alpaca, ...
  Instruction / prompt   WizardLM / Koala test sets (eval files)

Instruction and a non-empty input are joined with a blank line. Files whose
instructions mostly carry literal two-character "\\n" escapes (Alpaca-CoT aqua
and qasc) get them turned into newlines.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from m2r2_jax.data import data_root, quiet_datasets
from m2r2_jax.errors import M2R2Error

EVAL_FILES = (
    "mt_bench/question.jsonl",
    "spec_bench/question.jsonl",
    "vicuna_bench/question.jsonl",
    "koala/koala_test_set.jsonl",
    "self_instruct/user_oriented_instructions.jsonl",
    "wizardlm/WizardLM_testset.jsonl",
    "alpaca_eval/alpaca_eval_prompts.jsonl",
)
_TRAIN_PARTS = ("train_prompts", "alpaca/alpaca_en_demo.json", "self_instruct/seed_tasks.jsonl")
_EXTS = (".json", ".jsonl")


def default_train_sources(root: str | Path | None = None, *, check: bool = True) -> list[str]:
    root = Path(root) if root is not None else data_root()
    out = [str(root / p) for p in _TRAIN_PARTS]
    if check:
        for p in out:
            if not Path(p).exists():
                raise M2R2Error(f"training prompt source not found: {p} (set M2R2_DATA to the data directory)")
    return out


DEFAULT_TRAIN_SOURCES = default_train_sources(check=False)


def normalize(text: str) -> str:
    """The dedupe / eval-matching key: lower-case, whitespace collapsed."""
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------- reading


def _looks_local(src: str) -> bool:
    return src.startswith(("/", ".", "~")) or src.endswith(_EXTS) or Path(src).expanduser().exists()


def _local_files(src: str) -> list[Path]:
    p = Path(src).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in _EXTS)
        if not files:
            raise M2R2Error(f"no .json/.jsonl files under {src}")
        return files
    if p.is_file():
        if p.suffix not in _EXTS:
            raise M2R2Error(f"unsupported prompt file {src}: expected .json or .jsonl")
        return [p]
    raise M2R2Error(f"prompt source not found: {src}")


def _read_plain_json(path: Path) -> list[dict]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise M2R2Error(f"cannot read {path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise M2R2Error(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".jsonl":
        obj = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise M2R2Error(f"cannot parse {path}, line {n}: {e.msg} (column {e.colno})") from None
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise M2R2Error(f"cannot parse {path}: {e}") from None
    if isinstance(obj, dict):  # {"data": [...]}: the one list of records inside
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if len(lists) == 1 else [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise M2R2Error(f"{path}: expected a list of JSON objects (records)")
    return obj


def read_records(path: str | Path) -> tuple[list[dict], str]:
    """Records of one local file -> (records, reader) with reader 'datasets' or 'json'."""
    datasets = quiet_datasets()
    path = Path(path)
    try:
        rows = datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    except Exception:  # noqa: BLE001 - structure the Arrow json reader rejects
        return _read_plain_json(path), "json"
    try:
        detect_format(_keys(rows))
    except M2R2Error:  # e.g. {"data": [...]} read as one row: unwrap with json
        return _read_plain_json(path), "json"
    return rows, "datasets"


def _read_hub(name: str) -> list[dict]:
    datasets = quiet_datasets()
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:  # noqa: BLE001 - offline, unknown name, no train split, ...
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise M2R2Error(
            f"cannot load hub dataset {name!r} (not a local path; offline or not found): {type(e).__name__}: {msg}"
        ) from None
    return ds.to_list()


# ----------------------------------------------------------------------------- formats


def detect_format(keys: Iterable[str]) -> str:
    k = set(keys)
    if "conversations" in k:
        return "conversations"
    if "messages" in k:
        return "messages"
    if "parent_message_id" in k and "text" in k:
        return "oa_tree"
    if "turns" in k:
        return "turns"
    if "question" in k:
        return "question"
    if "instruction" in k and "instances" in k:
        return "self_instruct"
    if "instruction" in k:
        return "instruction"
    if "Instruction" in k:
        return "Instruction"
    if "prompt" in k:
        return "prompt"
    raise M2R2Error(f"unknown prompt format (keys: {sorted(k)})")


def _s(x: Any) -> str:
    return x if isinstance(x, str) else ""


def _join(instruction: Any, inp: Any) -> str:
    a, b = _s(instruction).strip(), _s(inp).strip()
    return f"{a}\n\n{b}" if a and b else a


def _first_turn(turns: Any, role_key: str, text_key: str, roles: tuple[str, ...]) -> str:
    for t in turns or ():
        if isinstance(t, dict) and t.get(role_key) in roles:
            return _s(t.get(text_key))
    return ""


def _extract(rec: dict, fmt: str) -> str | None:
    """The prompt of one record ('' = empty, None = not a prompt, e.g. an OA reply)."""
    if fmt == "conversations":
        return _first_turn(rec.get("conversations"), "from", "value", ("human", "user"))
    if fmt == "messages":
        return _first_turn(rec.get("messages"), "role", "content", ("user", "human"))
    if fmt == "oa_tree":
        if rec.get("parent_message_id") is not None or rec.get("role", "prompter") != "prompter":
            return None
        return _s(rec.get("text"))
    if fmt == "turns":
        t = rec.get("turns") or []
        if not isinstance(t, (list, tuple)):
            raise M2R2Error(f"a record's 'turns' must be a list of strings, got {type(t).__name__} {str(t)[:40]!r}")
        return _s(t[0]) if t else ""
    if fmt == "question":
        return _s(rec.get("question"))
    if fmt == "self_instruct":
        inst = rec.get("instances") or []
        first = inst[0].get("input") if inst and isinstance(inst[0], dict) else ""
        return _join(rec.get("instruction"), first)
    if fmt == "instruction":
        return _join(rec.get("instruction"), rec.get("input"))
    if fmt == "Instruction":
        return _s(rec.get("Instruction"))
    return _s(rec.get("prompt"))


def _keys(records: list[dict]) -> set[str]:
    keys: set[str] = set()
    for r in records[:1000]:
        keys.update(r)
    return keys


def _escaped_newlines(records: list[dict]) -> bool:
    """Alpaca-CoT aqua/qasc write line breaks as literal backslash-n in every instruction."""
    inst = [_s(r.get("instruction")) for r in records]
    return bool(inst) and sum("\\n" in s for s in inst) >= 0.9 * len(inst)


def prompts_of(records: list[dict], where: str = "records") -> tuple[list[str], str, int]:
    """-> (non-empty prompts, format, number of records that gave a prompt or an empty one)."""
    if not records:
        return [], "empty", 0
    try:
        fmt = detect_format(_keys(records))
    except M2R2Error as e:
        raise M2R2Error(f"{where}: {e}") from None
    unescape = fmt in ("instruction", "self_instruct") and _escaped_newlines(records)
    out, seen = [], 0
    for r in records:
        if unescape:
            r = {**r, "instruction": _s(r.get("instruction")).replace("\\n", "\n")}
        p = _extract(r, fmt)
        if p is None:
            continue
        seen += 1
        p = p.strip()
        if p:
            out.append(p)
    return out, fmt, seen


# ----------------------------------------------------------------------------- eval hold-out


def find_eval_root(paths: Iterable[str | Path]) -> Path | None:
    """The nearest ancestor of the given local paths that holds any evaluation set."""
    for p in paths:
        p = Path(p).expanduser().resolve()
        for a in ([p] if p.is_dir() else []) + list(p.parents):
            if any((a / f).is_file() for f in EVAL_FILES):
                return a
    return None


def _eval_texts(rec: dict) -> Iterable[str]:
    turns = rec.get("turns")
    for t in turns if isinstance(turns, (list, tuple)) else [turns]:
        yield _s(t)
    for k in ("question", "prompt", "Instruction", "instruction"):
        yield _s(rec.get(k))
    inst = rec.get("instances") or []
    if inst and isinstance(inst[0], dict):
        yield _join(rec.get("instruction"), inst[0].get("input"))


def eval_keys(root: str | Path) -> tuple[set[str], list[str]]:
    """Normalised texts of every eval set under `root` (all turns, instruction +/- input)."""
    keys: set[str] = set()
    used = []
    for f in EVAL_FILES:
        p = Path(root) / f
        if p.is_file():
            used.append(str(p))
            for rec in _read_plain_json(p):
                keys.update(normalize(t) for t in _eval_texts(rec) if t.strip())
    return keys, used


# ----------------------------------------------------------------------------- API


@dataclasses.dataclass
class SourceStats:
    source: str  # the file (or hub name)
    format: str
    reader: str  # datasets | json | hub
    records: int  # records that are prompts (OA: root prompter messages)
    prompts: int  # non-empty prompts
    duplicates: int  # dropped as duplicates of an earlier prompt
    eval_overlap: int  # dropped as matches of an evaluation set
    kept: int  # contributed to the pool (before shuffle / limit)


@dataclasses.dataclass
class PromptSet:
    prompts: list[str]
    stats: list[SourceStats]
    eval_files: list[str]  # evaluation sets used for the hold-out ([] = check skipped)

    @property
    def counts(self) -> dict[str, int]:
        return {s.source: s.kept for s in self.stats}


def collect_prompts(
    sources: list[str] | str,
    *,
    limit: int | None = None,
    seed: int = 0,
    exclude_eval: bool = True,
    eval_root: str | Path | None = None,
    shuffle: bool = True,
) -> PromptSet:
    """Read, dedupe, hold out eval prompts, shuffle with `seed`, then keep `limit`."""
    if isinstance(sources, (str, Path)):
        sources = [str(sources)]
    if not sources:
        raise M2R2Error("no prompt sources given")
    items: list[tuple[str, str, list[dict] | None]] = []  # (label, kind, hub records)
    local: list[str] = []
    for src in map(str, sources):
        if _looks_local(src):
            local.append(src)
            items += [(str(f), "local", None) for f in _local_files(src)]
        else:
            items.append((src, "hub", _read_hub(src)))
    ekeys: set[str] = set()
    efiles: list[str] = []
    if exclude_eval:
        root = Path(eval_root) if eval_root is not None else find_eval_root(local)
        if root is not None:
            ekeys, efiles = eval_keys(root)
    seen: set[str] = set()
    pool: list[str] = []
    stats = []
    for label, _kind, recs in items:
        reader = "hub"
        if recs is None:
            recs, reader = read_records(label)
        ps, fmt, nrec = prompts_of(recs, label)
        st = SourceStats(label, fmt, reader, nrec, len(ps), 0, 0, 0)
        for p in ps:
            k = normalize(p)
            if k in seen:
                st.duplicates += 1
                continue
            seen.add(k)
            if k in ekeys:
                st.eval_overlap += 1
                continue
            pool.append(p)
            st.kept += 1
        stats.append(st)
    if shuffle:
        random.Random(seed).shuffle(pool)
    if limit is not None:
        pool = pool[: max(0, int(limit))]
    return PromptSet(pool, stats, efiles)


def load_prompts(
    sources: list[str] | str,
    *,
    limit: int | None = None,
    seed: int = 0,
    exclude_eval: bool = True,
    eval_root: str | Path | None = None,
    shuffle: bool = True,
) -> list[str]:
    """Prompts from the sources (file order kept when shuffle=False)."""
    return collect_prompts(
        sources, limit=limit, seed=seed, exclude_eval=exclude_eval, eval_root=eval_root, shuffle=shuffle
    ).prompts


def prompt_stats(sources: list[str] | str, **kw) -> list[SourceStats]:
    """Per-file counts (see SourceStats); same keywords as load_prompts."""
    return collect_prompts(sources, **kw).stats
