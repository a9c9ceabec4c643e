"""Speed and acceptance of self-speculative decoding against plain AR decoding,
both in the SAME run on the same prompts.

For every eval item and turn: the prompt is the chat template
(`apply_chat_template(messages, add_generation_prompt=True)`) over the
conversation so far, where earlier assistant turns are the model's OWN answers
(the decoded text of the AR run); then the plain jitted AR loop (`Generator`)
and the speculative loop (`SpeculativeDecoder`) answer it, one right after the
other. An executable is compiled and run once untimed the first time a shape
bucket appears (its compile time is reported as `compile_seconds`), so the
timed runs never include compilation. With batch size B > 1, B prompts of one
category run together through both loops: times are per batch, tokens summed.

Greedy decoding must be lossless: spec `new_ids` == AR `new_ids`, checked
token for token on EVERY prompt (`equal`; null when sampling).

Speed-up (overall and per category) = (spec tokens / spec seconds) /
(AR tokens / AR seconds); when both sides produce the same tokens (greedy,
lossless) this is exactly total AR time / total spec time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.data.eval_sets import EvalItem
from m2r2_jax.decoding.drafters import DraftOptions
from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.decoding.sampling import SamplingConfig
from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.tokenizer import encode_chat

SPEEDUP_DEFINITION = (
    "(spec tokens / spec seconds) / (AR tokens / AR seconds) summed over all timed runs; "
    "equals total AR time / total spec time when both emit the same tokens (greedy)"
)


@dataclasses.dataclass
class M2R2Bundle:
    mc: Any  # M2R2Config
    params: Any  # trained M2R2 tree
    draft_ids: Any  # draft vocabulary ids
    meta: dict | None = None

    @classmethod
    def of(cls, x) -> M2R2Bundle:
        """A bundle, or `load_m2r2`'s (mc, params, draft_ids[, meta]) tuple."""
        if isinstance(x, cls):
            return x
        if isinstance(x, (tuple, list)) and len(x) in (3, 4):
            return cls(*x)
        raise M2R2Error("m2r2 must be an M2R2Bundle or a (mc, params, draft_ids[, meta]) tuple")


def _kind_counts(sp) -> dict:
    """Steps and accepted tokens of the prompt-lookup steps and the lookup-extended M2R2 steps."""
    k = sp.kinds
    z = {"steps": [0], "accepted": [0]}
    lk, ex = k.get("lookup", z), k.get("m2r2+lookup", z)
    return dict(
        lookup_steps=int(sum(lk["steps"])),
        lookup_accepted=int(sum(lk["accepted"])),
        ext_steps=int(sum(ex["steps"])),
        ext_accepted=int(sum(ex["accepted"])),
    )


def _batches(items: Sequence[EvalItem], batch_size: int) -> list[list[EvalItem]]:
    """B = 1: file order. B > 1: category-homogeneous chunks (per-category timing stays exact)."""
    if batch_size == 1:
        return [[it] for it in items]
    by_cat: OrderedDict[str, list[EvalItem]] = OrderedDict()
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    return [g[i : i + batch_size] for g in by_cat.values() for i in range(0, len(g), batch_size)]


def _timed(fn):
    """Run; if that call compiled, it was the warm-up: run again for the timing. -> (result, compile s)."""
    r = fn()
    if r.compile_seconds > 0:
        c = r.compile_seconds
        r = fn()
        return r, c
    return r, 0.0


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _agg(units: list[dict]) -> dict:
    ar_s = sum(u["ar_seconds"] for u in units)
    sp_s = sum(u["spec_seconds"] for u in units)
    ar_n = sum(u["ar_tokens"] for u in units)
    sp_n = sum(u["spec_tokens"] for u in units)
    steps = sum(u["steps"] for u in units)
    acc = sum(u["accepted"] for u in units)
    l_steps = sum(u.get("lookup_steps", 0) for u in units)
    l_acc = sum(u.get("lookup_accepted", 0) for u in units)
    e_steps = sum(u.get("ext_steps", 0) for u in units)
    e_acc = sum(u.get("ext_accepted", 0) for u in units)
    passes = sum(u.get("draft_passes", 0) for u in units)
    ar_tps, sp_tps = _ratio(ar_n, ar_s), _ratio(sp_n, sp_s)
    return dict(
        ar_seconds=ar_s,
        spec_seconds=sp_s,
        ar_tokens=ar_n,
        spec_tokens=sp_n,
        ar_tps=ar_tps,
        spec_tps=sp_tps,
        speedup=sp_tps / ar_tps if ar_tps and sp_tps else None,
        tau=_ratio(acc + steps, steps),
        steps=steps,
        accepted=acc,
        lookup_steps=l_steps,
        lookup_accepted=l_acc,
        ext_steps=e_steps,
        ext_accepted=e_acc,
        draft_passes=passes,
    )


HF_OPTIONS = {
    # name -> extra `generate` kwargs; all greedy, same max_new_tokens, EOS honoured as in ours
    "hf_greedy": {},
    "hf_prompt_lookup": {"prompt_lookup_num_tokens": 10},
    "hf_early_exit": {"assistant_early_exit": None},  # filled with the fast stream's depth
}


class HFBaselines:
    """HF transformers' own decoding options on the same prompts, timed in the same run.

    Each is warmed up once, then timed per prompt; their greedy tokens are compared with ours
    (`hf_equal`: HF greedy == our AR output), so the speed-ups compare equal outputs."""

    def __init__(self, ref, early_exit_layers: int, max_new_tokens: int, eos_ids):
        self.ref, self.max_new = ref, max_new_tokens
        self.options = {k: dict(v) for k, v in HF_OPTIONS.items()}
        self.options["hf_early_exit"]["assistant_early_exit"] = early_exit_layers
        self.eos = list(eos_ids)
        self.warm = False

    def _gen(self, ids, kw):
        import torch

        x = torch.tensor([ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.ref.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=self.max_new,
                do_sample=False,
                eos_token_id=self.eos,
                pad_token_id=self.eos[0],
                **kw,
            )
            dt = time.perf_counter() - t0
        return out[0, x.shape[1] :].tolist(), dt  # like ours: the answer including its EOS token

    def run(self, ids: list[int]) -> dict:
        if not self.warm:  # first-call overheads out of the timings
            for kw in self.options.values():
                self._gen(ids, kw)
            self.warm = True
        return {name: self._gen(ids, kw) for name, kw in self.options.items()}


def _lossless(rows: list[dict]) -> bool | None:
    eq = [r["equal"] for r in rows]
    return None if any(e is None for e in eq) else all(eq)


class Journal:
    """Append-only JSONL record of finished batches, so that a long eval can be resumed.

    Line 1 is a header (everything that decides the results: run config, item ids, the caller's
    `key`: model, checkpoint, dtypes); each later line is one finished batch (all its turns): its
    units, per-prompt rows, acceptance counts and compile seconds. A batch is either on a line or
    redone: the per-prompt AR/spec timings are taken back to back inside one process either way."""

    def __init__(self, path, header: dict):
        self.path, self.header = Path(path), json.loads(json.dumps(header))
        self.done: list[dict] = []

    def load(self) -> Journal:
        """Read finished batches from an existing journal; error if it was written by another run."""
        try:
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        except (OSError, ValueError) as e:
            raise M2R2Error(f"journal {self.path} is unreadable ({e}); delete it to start over") from None
        if not lines or lines[0].get("header") is None:
            raise M2R2Error(f"journal {self.path} has no header line; delete it to start over")
        old = lines[0]["header"]
        diff = sorted(k for k in set(old) | set(self.header) if old.get(k) != self.header.get(k))
        if diff:
            k = diff[0]
            raise M2R2Error(
                f"journal {self.path} was written by a different run ({k}: {old.get(k)!r} there, "
                f"{self.header.get(k)!r} now); delete it to start over"
            )
        for i, rec in enumerate(lines[1:]):
            if rec.get("batch") != i:
                raise M2R2Error(f"journal {self.path}: line {i + 2} holds batch {rec.get('batch')}, expected {i}")
        self.done = lines[1:]
        return self

    def append(self, rec: dict):
        """Append one finished batch; the first one writes the header too (a run that fails before any
        batch finished leaves no journal behind)."""
        if not self.path.exists():
            self.path.write_text(json.dumps({"header": self.header}) + "\n")
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclasses.dataclass(frozen=True)
class SpecEvalConfig:
    """What an eval run decodes with, validated once (decoding/sampling checks happen in their own configs)."""

    draft: Any = DraftOptions()  # M2R2's DraftOptions, or a peer's options (peer_drafters.options.draft_options)
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 1
    ar_block: int = 1  # > 1: the AR side decodes through blocks of that many slots (GenerateConfig.block)

    def __post_init__(self):
        SamplingConfig(self.temperature, 0, self.top_p, self.seed)
        GenerateConfig(max_new_tokens=self.max_new_tokens, block=self.ar_block)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise M2R2Error(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def run_spec_eval(
    model,
    m2r2,
    items: Sequence[EvalItem],
    ec: SpecEvalConfig = SpecEvalConfig(),
    *,
    backend: Backend = XLA,
    decode_params=None,
    ref_ar_params=None,
    hf_ref=None,
    journal=None,
    resume: bool = False,
    journal_key: dict | None = None,
    progress: bool = True,
) -> dict:
    """AR vs speculative on every turn of every item; see the module doc. `model` has `.cfg`, `.params`,
    `.tokenizer` (a `LoadedModel`); `m2r2` is an `M2R2Bundle` or `load_m2r2`'s tuple (unused, may be None,
    when `ec.draft` is a training-free peer's options: decoding/peer_drafters/options.py).

    `backend` and `decode_params`: what both loops decode with (default XLA and `model.params`; e.g. the
    CPU kernels and the params packed for them). `ref_ar_params`: the plain AR loop is also timed on
    every prompt through XLA's own ops with these (`speedup_vs_ref_ar`; greedy output compared in
    `ref_ar_equal`). `hf_ref`: an HF transformers (torch) model of the same base; when given (greedy,
    batch 1), HF greedy, prompt-lookup and early-exit assisted generation are timed on every prompt too.
    `ec.ar_block` > 1: the AR loop decodes through blocks of that many slots, the shapes of a verification
    of that many nodes, so both round alike; the one-slot AR loop is then timed too (`speedup_vs_block1_ar`).
    `journal` (a path): every finished batch is appended there (see `Journal`); with `resume` the
    batches already in it are taken from it, not rerun, provided it was written by the same run."""
    from tqdm import tqdm

    opts = ec.draft
    b = M2R2Bundle.of(m2r2) if opts.needs_m2r2 else None  # the training-free peers draft without it
    items = list(items)
    if not items:
        raise M2R2Error("no eval items given")
    greedy = ec.greedy
    if hf_ref is not None and (not greedy or ec.batch_size != 1):
        raise M2R2Error("HF baselines are timed greedy at batch size 1 only")
    cfg, tok = model.cfg, model.tokenizer
    base = model.params if decode_params is None else decode_params
    gen = Generator(cfg, backend=backend)
    ref_gen = Generator(cfg) if ref_ar_params is not None else None
    drafter = opts.drafter(cfg, b.mc if b else None, backend)
    spec = SpeculativeDecoder(cfg, drafter, backend)
    tree = drafter.trees[0]  # the first kind of step's tree: the per-depth and per-node statistics
    depth = getattr(getattr(drafter, "m2r2", drafter), "depth", None)  # M2R2's draft layers (None: a peer)
    # HF's early-exit assistant exits where our fast stream drafts from (a peer: half the depth)
    hf = (
        None
        if hf_ref is None
        else HFBaselines(hf_ref, depth or cfg.num_layers // 2, ec.max_new_tokens, cfg.eos_token_ids)
    )
    dparams = opts.prepare(spec, base, b)
    D = tree.max_depth
    depth_hits = np.zeros(D + 1, np.int64)
    node_tries = np.zeros(tree.size, np.int64)
    node_hits = np.zeros(tree.size, np.int64)
    compile_s = {"ar": 0.0, "spec": 0.0}
    units: list[dict] = []
    per_prompt: list[dict] = []
    t_start = time.perf_counter()
    jr = None
    # prompt lookup on top of another drafter's drafts (M2R2, Kangaroo, SpS; pld is lookup alone)
    lookup = (getattr(opts, "lookup", 0) or 0) if opts.name != "pld" else 0
    extend = "m2r2+lookup" in drafter.kinds
    if journal is not None:
        header = dict(
            tree_paths=[list(p) for p in tree.paths],
            max_new_tokens=ec.max_new_tokens,
            temperature=ec.temperature,
            top_p=ec.top_p,
            seed=ec.seed,
            batch_size=ec.batch_size,
            draft_layers=depth,
            ar_block=ec.ar_block,
            hf=hf is not None,
            lookup=[lookup, getattr(opts, "lookup_ngram", None), getattr(opts, "lookup_min_ngram", None)],
            lookup_extend=extend,
            backend=backend.name,
            ref_ar=ref_ar_params is not None,
            items=[[it.id, it.category, len(it.turns)] for it in items],
            **(journal_key or {}),
        )
        if opts.name != "m2r2":  # (absent for M2R2, so journals written before peers existed still resume)
            header.update(drafter=opts.name, draft_options=opts.describe())
        else:  # M2R2's newer knobs where not at their defaults (so older journals still resume)
            header.update(
                {
                    k: getattr(opts, k)
                    for k in ("draft_stop", "draft_dtype")
                    if getattr(opts, k) != getattr(DraftOptions, k)
                }
            )
        jr = Journal(journal, header)
        if resume and jr.path.exists():
            jr.load()
        for rec in jr.done:
            units += rec["units"]
            per_prompt += rec["per_prompt"]
            depth_hits += np.asarray(rec["depth_hits"], np.int64)
            node_tries += np.asarray(rec["node_tries"], np.int64)
            node_hits += np.asarray(rec["node_hits"], np.int64)
            for k in compile_s:
                compile_s[k] += rec["compile_seconds"][k]
    n_resumed = len(jr.done) if jr else 0
    bar = tqdm(
        total=sum(len(it.turns) for it in items),
        initial=len(per_prompt),
        disable=not progress,
        desc="spec eval",
        unit="prompt",
    )
    try:
        for bi, batch in enumerate(_batches(items, ec.batch_size)):
            if bi < n_resumed:
                continue
            snap = (
                len(units),
                len(per_prompt),
                depth_hits.copy(),
                node_tries.copy(),
                node_hits.copy(),
                dict(compile_s),
            )
            history: list[list[dict]] = [[] for _ in batch]
            for t in range(max(len(it.turns) for it in batch)):
                rows = [i for i, it in enumerate(batch) if t < len(it.turns)]
                msgs = [history[i] + [{"role": "user", "content": batch[i].turns[t]}] for i in rows]
                ids = [encode_chat(tok, m) for m in msgs]
                s = SamplingConfig(temperature=ec.temperature, top_p=ec.top_p, seed=ec.seed + len(units))
                g1 = GenerateConfig(max_new_tokens=ec.max_new_tokens, sampling=s)
                ar, c_ar = _timed(lambda: gen.generate(base, ids, dataclasses.replace(g1, block=ec.ar_block)))
                ar1 = None
                if ec.ar_block > 1:
                    ar1, c_ar1 = _timed(lambda: gen.generate(base, ids, g1))
                    compile_s["ar"] += c_ar1
                ref = None
                if ref_ar_params is not None:
                    ref, c_ref = _timed(lambda: ref_gen.generate(ref_ar_params, ids, g1))
                    compile_s["ar"] += c_ref
                sp, c_sp = _timed(
                    lambda: spec.generate(base, dparams, ids, SpecConfig(max_new_tokens=ec.max_new_tokens, sampling=s))
                )
                compile_s["ar"] += c_ar
                compile_s["spec"] += c_sp
                depth_hits += sp.depth_hits.sum(0)
                node_tries += sp.node_tries.sum(0)
                node_hits += sp.node_hits.sum(0)
                unit = dict(
                    category=batch[0].category,
                    rows=len(rows),
                    ar_seconds=ar.decode_seconds,
                    spec_seconds=sp.decode_seconds,
                    ar_tokens=sum(len(x) for x in ar.new_ids),
                    spec_tokens=sum(len(x) for x in sp.new_ids),
                    steps=int(sum(sp.steps)),
                    accepted=int(sum(sp.accepted)),
                    draft_passes=int(sum(sp.draft_passes)),
                    **_kind_counts(sp),
                )
                if ar1 is not None:
                    unit.update(ar1_seconds=ar1.decode_seconds, ar1_tokens=sum(len(x) for x in ar1.new_ids))
                if ref is not None:
                    unit.update(
                        ref_ar_seconds=ref.decode_seconds,
                        ref_ar_tokens=sum(len(x) for x in ref.new_ids),
                        ref_ar_equal=(ref.new_ids == ar.new_ids) if greedy else None,
                    )
                u = _agg([unit])
                for r, i in enumerate(rows):
                    it = batch[i]
                    steps, acc = int(sp.steps[r]), int(sp.accepted[r])
                    per_prompt.append(
                        dict(
                            id=it.id,
                            category=it.category,
                            raw_category=it.raw_category,
                            turn=t + 1,
                            batch=bi,
                            batch_rows=len(rows),
                            prompt_tokens=len(ids[r]),
                            ar_tokens=len(ar.new_ids[r]),
                            spec_tokens=len(sp.new_ids[r]),
                            steps=steps,
                            accepted=acc,
                            tau=_ratio(acc + steps, steps),
                            equal=(sp.new_ids[r] == ar.new_ids[r]) if greedy else None,
                            ar_seconds=u["ar_seconds"],
                            spec_seconds=u["spec_seconds"],
                            ar_tps=u["ar_tps"],
                            spec_tps=u["spec_tps"],
                            speedup=u["speedup"],
                        )
                    )
                    answer = tok.decode(ar.new_ids[r], skip_special_tokens=True)
                    history[i] = msgs[r] + [{"role": "assistant", "content": answer}]
                if hf is not None:  # batch 1: this unit is one prompt
                    hr = hf.run(ids[0])
                    unit.update({f"{k}_seconds": dt for k, (_, dt) in hr.items()})
                    unit.update({f"{k}_tokens": len(n) for k, (n, _) in hr.items()})
                    unit["hf_equal"] = per_prompt[-1]["hf_equal"] = hr["hf_greedy"][0] == ar.new_ids[0]
                units.append(unit)
                bar.update(len(rows))
                tot = _agg(units)
                bar.set_postfix(speedup=f"{tot['speedup'] or 0:.2f}", tau=f"{tot['tau'] or 0:.2f}")
            if jr is not None:
                nu, npp, dh, nt, nh, cs = snap
                jr.append(
                    dict(
                        batch=bi,
                        units=units[nu:],
                        per_prompt=per_prompt[npp:],
                        depth_hits=(depth_hits - dh).tolist(),
                        node_tries=(node_tries - nt).tolist(),
                        node_hits=(node_hits - nh).tolist(),
                        compile_seconds={k: compile_s[k] - cs[k] for k in compile_s},
                    )
                )
    finally:
        bar.close()

    per_category = {}
    for cat in OrderedDict.fromkeys(u["category"] for u in units):
        a = _agg([u for u in units if u["category"] == cat])
        rows = [r for r in per_prompt if r["category"] == cat]
        per_category[cat] = dict(
            prompts=len(rows),
            speedup=a["speedup"],
            tau=a["tau"],
            ar_tps=a["ar_tps"],
            spec_tps=a["spec_tps"],
            lossless=_lossless(rows),
            ar_seconds=a["ar_seconds"],
            spec_seconds=a["spec_seconds"],
            tokens=a["spec_tokens"],
        )
    tot = _agg(units)
    steps = tot["steps"]
    l_steps, l_acc = tot["lookup_steps"], tot["lookup_accepted"]
    e_steps, e_acc = tot["ext_steps"], tot["ext_accepted"]
    depth_acc = [dict(depth=d, rate=_ratio(float(depth_hits[d]), steps)) for d in range(1, D + 1)]
    node_acc = [
        dict(
            node=i,
            path=list(tree.paths[i - 1]),
            depth=int(tree.depth[i]),
            rank=int(tree.rank[i]),
            tries=int(node_tries[i]),
            hits=int(node_hits[i]),
            rate=_ratio(float(node_hits[i]), float(node_tries[i])),
        )
        for i in range(1, tree.size)
    ]
    ar_ms_tok = _ratio(1e3 * tot["ar_seconds"], tot["ar_tokens"])
    sp_ms_step = _ratio(1e3 * tot["spec_seconds"], steps)
    parts = spec.cost_breakdown(base, dparams, batch=ec.batch_size, greedy=greedy)
    step_cost = _ratio(sp_ms_step, ar_ms_tok) if sp_ms_step and ar_ms_tok else None
    # M2R2's fast-stream passes per M2R2-drafted step (the loop's count; a confidence stop skips some):
    # the draft's ms per step is the full draft's (timed alone) scaled by the share of passes run
    m2r2_steps = steps - l_steps
    counted = opts.name == "m2r2" and m2r2_steps and all("draft_passes" in u for u in units)  # (older journals: not)
    passes_per_step = _ratio(tot["draft_passes"], m2r2_steps) if counted else None
    draft_ms = parts["draft_ms"]
    if passes_per_step is not None and parts.get("draft_passes"):
        draft_ms = parts["draft_ms"] * passes_per_step / parts["draft_passes"]
    return {
        "config": dict(
            tree=tree.name,
            tree_size=tree.size,
            tree_depth=D,
            tree_paths=[list(p) for p in tree.paths],
            draft_layers=depth,
            max_new_tokens=ec.max_new_tokens,
            temperature=ec.temperature,
            top_p=ec.top_p,
            seed=ec.seed,
            batch_size=ec.batch_size,
            greedy=greedy,
            items=len(items),
            drafters=("M2R2 + prompt lookup" if lookup else "M2R2") if opts.name == "m2r2" else opts.name,
            drafter=opts.name,
            draft_options=opts.describe(),
            backend=backend.name,
        ),
        "overall_speedup": tot["speedup"],
        "speedup_definition": SPEEDUP_DEFINITION,
        "tau": tot["tau"],
        "lossless": _lossless(per_prompt),
        "prompts": len(per_prompt),
        "totals": {
            k: tot[k]
            for k in (
                "ar_seconds",
                "spec_seconds",
                "ar_tokens",
                "spec_tokens",
                "ar_tps",
                "spec_tps",
                "steps",
                "accepted",
            )
        },
        "per_category": per_category,
        "depth_acceptance": depth_acc,
        "node_acceptance": node_acc if greedy else [],
        "cost": {
            "ar_ms_per_token": ar_ms_tok,
            "spec_ms_per_step": sp_ms_step,
            "step_cost_in_ar_tokens": step_cost,
            "draft_ms": draft_ms,
            "draft_ms_full": parts["draft_ms"],
            "draft_passes_per_step": passes_per_step,
            "draft_passes_full": parts.get("draft_passes"),
            "verify_ms": parts["verify_ms"],
            # (with prompt lookup, steps mix two kinds: the M2R2 draft + verify split does not apply)
            "other_ms": sp_ms_step - draft_ms - parts["verify_ms"] if sp_ms_step and not lookup else None,
            "breakdown_setup": {k: parts[k] for k in ("cache_len", "fill", "block", "draft_layers", "batch")},
            "predicted_speedup": _ratio(tot["tau"], step_cost) if step_cost and tot["tau"] else None,
            "note": "one speculative step (draft + verify + accept, prefill amortised) in units of one AR "
            "token; speed-up ~= tau / step_cost. draft_ms: per M2R2-drafted step, the full draft's ms "
            "(draft_ms_full, timed alone, draft_passes_full fast-stream passes) x the share of passes run",
        },
        "lookup": dict(
            tokens=lookup,
            ngram=opts.lookup_ngram,
            min_ngram=opts.lookup_min_ngram,
            steps=l_steps,
            share_of_steps=_ratio(l_steps, steps),
            tau=_ratio(l_acc + l_steps, l_steps),
            tau_m2r2=_ratio(tot["accepted"] - l_acc + steps - l_steps, steps - l_steps),
            extend=extend,
            ext_steps=e_steps,
            ext_share_of_steps=_ratio(e_steps, steps),
            tau_ext=_ratio(e_acc + e_steps, e_steps),
            tau_m2r2_plain=_ratio(
                tot["accepted"] - l_acc - e_acc + steps - l_steps - e_steps, steps - l_steps - e_steps
            ),
        )
        if lookup
        else None,
        "ar_block": ec.ar_block,
        "speedup_vs_block1_ar": _ratio(
            tot["spec_tps"], _ratio(sum(u["ar1_tokens"] for u in units), sum(u["ar1_seconds"] for u in units))
        )
        if ec.ar_block > 1 and tot["spec_tps"]
        else None,
        "speedup_vs_ref_ar": _ratio(
            tot["spec_tps"], _ratio(sum(u["ref_ar_tokens"] for u in units), sum(u["ref_ar_seconds"] for u in units))
        )
        if ref_ar_params is not None and tot["spec_tps"]
        else None,
        "ref_ar_speedup": _ratio(
            tot["ar_tps"], _ratio(sum(u["ref_ar_tokens"] for u in units), sum(u["ref_ar_seconds"] for u in units))
        )
        if ref_ar_params is not None and tot["ar_tps"]
        else None,
        "ref_ar_equal": all(u["ref_ar_equal"] for u in units) if ref_ar_params is not None and greedy else None,
        "compile_seconds": dict(compile_s, ar_executables=gen.compiles, spec_executables=spec.compiles),
        "wall_seconds": time.perf_counter() - t_start,
        "resumed_batches": n_resumed,
        "hf": _hf_summary(units, list(hf.options)) if hf else None,
        "per_prompt": per_prompt,
    }


def _hf_summary(units: list[dict], names: list[str]) -> dict:
    """Tokens/s of each HF option and of ours over the same prompts; ratios to HF greedy."""
    tps = {n: _ratio(sum(u[f"{n}_tokens"] for u in units), sum(u[f"{n}_seconds"] for u in units)) for n in names}
    tps["ours_ar"] = _ratio(sum(u["ar_tokens"] for u in units), sum(u["ar_seconds"] for u in units))
    tps["ours_m2r2_spec"] = _ratio(sum(u["spec_tokens"] for u in units), sum(u["spec_seconds"] for u in units))
    g = tps["hf_greedy"]
    return {
        "tokens_per_second": tps,
        "speedup_vs_hf_greedy": {k: _ratio(v, g) if v and g else None for k, v in tps.items()},
        "hf_greedy_equals_ours": all(u["hf_equal"] for u in units),
        "prompts": len(units),
    }


def machine_info() -> dict:
    """Where and when a result was measured: CPU model, JAX backend, date and the repository's commit."""
    import datetime
    import subprocess

    import jax

    d = jax.devices()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    try:
        root = Path(__file__).resolve().parents[2]
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return dict(
        platform=platform.platform(),
        processor=cpu,
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        jax=jax.__version__,
        backend=jax.default_backend(),
        devices=len(d),
        device_kind=d[0].device_kind if d else None,
        commit=commit,
        uncommitted_changes=dirty,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
