"""Self-distillation cache: the frozen base's own greedy answers to training prompts.

Layout of `out_dir`:
  shard_00000.jsonl ...  records {"prompt_ids", "answer_ids", "prompt"}; `answer_ids`
                         ends with an EOS id unless the answer hit max_new_tokens
  manifest.json          model identity (source, config, parameter fingerprint, a probe
                         encoding), generation settings, the finished shards

Prompts are chat-encoded, the ones longer than `max_prompt_tokens` skipped, the
rest sorted by token length (ties: input order) so that a batch shares a prompt
bucket, and generated in batches with the jitted `Generator`. Each shard is
written atomically and then recorded in the manifest, so an interrupted run
resumes where it stopped: prompts already in finished shards are not redone
(the done set is keyed by prompt text, so a rerun with more prompts extends the
cache). A cache made with another model or other settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from m2r2_jax.distill_cache import FORMAT, MANIFEST, load_distill_cache, read_manifest, shard_files
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model.params import params_fingerprint

PROBE = "Hello! Please answer briefly: what is 2 + 2?"


@dataclasses.dataclass
class DistillModel:
    """What the cache needs from a model: `encode` maps prompt text to the full
    model input (chat template applied)."""

    cfg: Any
    params: Any
    encode: Callable[[str], Sequence[int]]
    source: str = ""


def as_distill_model(model) -> DistillModel:
    """A LoadedModel (chat-encoded with its tokenizer), a DistillModel, or a tuple
    (cfg, params, encode_fn[, source])."""
    if isinstance(model, DistillModel):
        return model
    if isinstance(model, tuple) and len(model) in (3, 4):
        return DistillModel(*model)
    if all(hasattr(model, a) for a in ("cfg", "params", "tokenizer")):
        tok = model.tokenizer
        if tok is None:
            raise M2R2Error("the distillation cache needs the model's tokenizer (load it with tokenizer=True)")
        from m2r2_jax.loading.tokenizer import encode_prompt

        return DistillModel(
            model.cfg, model.params, lambda t: encode_prompt(tok, t, chat=True), str(getattr(model, "source", ""))
        )
    raise M2R2Error(
        f"cannot build a distillation cache from a {type(model).__name__}: "
        "expected a LoadedModel or (cfg, params, encode_fn)"
    )


def _identity(m: DistillModel) -> dict:
    config = json.loads(m.cfg.to_json())
    if not config.get("matmul_dtype"):  # the default (no matmul cast) leaves manifests as they were
        config.pop("matmul_dtype", None)
    return {
        "source": m.source,
        "config": config,
        "params_fingerprint": params_fingerprint(m.params),
        "probe_ids": [int(i) for i in m.encode(PROBE)],
    }


def _settings(m: DistillModel, max_prompt_tokens: int, max_new_tokens: int) -> dict:
    return {
        "max_prompt_tokens": int(max_prompt_tokens),
        "max_new_tokens": int(max_new_tokens),
        "chat_template": True,
        "decoding": "greedy",
        "stop_ids": [int(i) for i in m.cfg.eos_token_ids],
    }


def _differences(a: dict, b: dict, prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------- manifest


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- build


def _done_prompts(files: list[Path]) -> set[str]:
    done = set()
    for f in files:
        with open(f, encoding="utf-8") as fh:
            done.update(json.loads(line)["prompt"] for line in fh if line.strip())
    return done


def _cache_len(cfg, prompt_len: int, max_new: int) -> int | None:
    """The batch's cache: the prompt bucket + max_new, rounded like every decode cache."""
    from m2r2_jax.decoding.generate import bucket, round_cache

    s = round_cache(bucket(prompt_len) + max_new)
    return s if s <= cfg.max_position_embeddings else None


def build_distill_cache(
    model,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    max_prompt_tokens: int = 256,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    shard_size: int = 256,
    progress: bool = True,
    max_shards: int | None = None,
    mesh=None,
    on_shard: Callable[[], Any] | None = None,
):
    """Generate (or resume) the cache in `out_dir` and return it as a `datasets.Dataset`.

    `max_shards` stops after writing that many new shards (a deliberate partial
    run; a later call resumes). Counts of the run are in manifest["last_run"]. `on_shard()` runs
    after each shard is recorded (the git-kept pack: training/distill_pack.py).
    """
    from tqdm.auto import tqdm

    from m2r2_jax.decoding.generate import GenerateConfig, Generator

    if batch_size < 1 or shard_size < 1 or max_new_tokens < 1 or max_prompt_tokens < 1:
        raise M2R2Error("batch_size, shard_size, max_new_tokens and max_prompt_tokens must be >= 1")
    m = as_distill_model(model)
    if max_prompt_tokens + max_new_tokens > m.cfg.max_position_embeddings:
        raise M2R2Error(
            f"max_prompt_tokens {max_prompt_tokens} + max_new_tokens {max_new_tokens} exceeds the "
            f"model's context of {m.cfg.max_position_embeddings} positions"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident, settings = _identity(m), _settings(m, max_prompt_tokens, max_new_tokens)
    man = read_manifest(out)
    if man is None:
        if any(out.glob("shard_*.jsonl")):
            raise M2R2Error(f"{out} holds shard files but no {MANIFEST}: not resuming an unknown cache")
        man = {"format": FORMAT, "model": ident, "settings": settings, "shards": []}
    else:
        diff = _differences(man.get("model", {}), ident, "model") + _differences(
            man.get("settings", {}), settings, "settings"
        )
        if diff:
            raise M2R2Error(
                f"distill cache {out} was made with another model or settings "
                f"(differs: {', '.join(diff)}); use a new out_dir"
            )
    done = _done_prompts(shard_files(out, man))

    # encode the prompts still to do; skip the too long ones
    t0 = time.perf_counter()
    todo, too_long, n_done = [], 0, 0
    for i, text in enumerate(dict.fromkeys(prompts)):
        if text in done:
            n_done += 1
            continue
        ids = [int(t) for t in m.encode(text)]
        if not ids or len(ids) > max_prompt_tokens:
            too_long += 1
            continue
        todo.append((len(ids), i, ids, text))
    todo.sort(key=lambda x: (x[0], x[1]))
    chunks = [todo[k : k + shard_size] for k in range(0, len(todo), shard_size)]
    if max_shards is not None:
        chunks = chunks[: max(0, int(max_shards))]

    gen = Generator(m.cfg, mesh)
    B = max(1, min(batch_size, len(todo)))
    run = {
        "prompts_given": len(prompts),
        "already_done": n_done,
        "skipped_too_long": too_long,
        "generated": 0,
        "new_tokens": 0,
        "seconds": 0.0,
    }
    bar = tqdm(total=sum(map(len, chunks)), unit="prompt", disable=not progress, desc="distill")
    t_gen, n_tok = 0.0, 0
    try:
        for chunk in chunks:
            rows = []
            for b in range(0, len(chunk), B):
                batch = chunk[b : b + B]
                ids = [x[2] for x in batch]
                ids += [ids[-1]] * (B - len(ids))  # static batch shape: pad with copies
                g = GenerateConfig(
                    max_new_tokens=max_new_tokens, cache_len=_cache_len(m.cfg, batch[-1][0], max_new_tokens)
                )
                res = gen.generate(m.params, ids, g)
                t_gen += res.decode_seconds  # compile time excluded: steady-state tokens/s
                for (_, _, p_ids, text), ans in zip(batch, res.new_ids):
                    rows.append({"prompt_ids": p_ids, "answer_ids": [int(t) for t in ans], "prompt": text})
                    n_tok += len(ans)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{n_tok / max(t_gen, 1e-9):.0f}", refresh=False)
            name = f"shard_{len(man['shards']):05d}.jsonl"
            _write_atomic(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            man["shards"].append(
                {"file": name, "rows": len(rows), "new_tokens": sum(len(r["answer_ids"]) for r in rows)}
            )
            run.update(
                generated=run["generated"] + len(rows), new_tokens=n_tok, seconds=round(time.perf_counter() - t0, 3)
            )
            man["complete"] = False
            man["last_run"] = run
            _write_atomic(out / MANIFEST, json.dumps(man, indent=1))
            if on_shard is not None:
                on_shard()
    finally:
        bar.close()
    man["rows"] = sum(s["rows"] for s in man["shards"])
    man["complete"] = run["generated"] == len(todo)
    man["runtime"] = {"batch_size": batch_size, "shard_size": shard_size}
    run["seconds"] = round(time.perf_counter() - t0, 3)
    man["last_run"] = run
    _write_atomic(out / MANIFEST, json.dumps(man, indent=1))
    return load_distill_cache(out)
