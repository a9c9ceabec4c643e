"""The trained peers' one training loop, on a self-distillation cache with the base frozen: Kangaroo's
adapter (peers/kangaroo.py) and the 2-model drafter's small model (peers/sps.py) here, Medusa's heads and
EAGLE's draft layer in medusa_eagle.py, the early-exit peers' exit heads and LayerSkip / SkipDecode
adapters in peers.py (training/).

One loop for all (`train_peer`, over the `Peer` a peer's recipe builds): Orbax checkpoints (params,
optimizer state, the seconds spent) every `save_every` steps, at least every `save_minutes` of wall clock,
and when a call ends; metrics (JSONL + TensorBoard) and a tqdm bar; the same command resumes exactly (the
data order is a function of the seed and the step). A run stops at `steps`, at `until` (as an
interruption would), or once `budget_minutes` of training (`--minutes`, summed over resumed calls) are
spent. Every checkpoint's meta names the base (`peers.draft_checkpoint.base_signature`) and carries the
budget fields (peers/budget.py BUDGET_FIELDS: train_minutes, steps_run, trainable_params,
budget_minutes), which eval.compare and eval.dynamic report.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from m2r2_jax.config import ModelConfig
from m2r2_jax.data.batches import pack_examples
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers import kangaroo as KG
from m2r2_jax.peers import sps as SP
from m2r2_jax.peers.budget import parse_minutes
from m2r2_jax.peers.draft_checkpoint import base_signature, resolve_draft_checkpoint
from m2r2_jax.training.checkpoint import Checkpointer, base_identity
from m2r2_jax.training.metrics import Tracker


@dataclasses.dataclass(frozen=True)
class RunLimits:
    """When a call stops and saves: `until` (a step, as an interruption would), `budget_minutes` (training
    minutes over all calls: `--minutes`, checked by peers.budget.parse_minutes), `save_minutes` /
    `save_every` (checkpoint cadence)."""

    until: int | None = None
    budget_minutes: float | None = None
    save_minutes: float = 10.0
    save_every: int = 25

    def __post_init__(self):
        object.__setattr__(self, "budget_minutes", parse_minutes(self.budget_minutes))
        if not (isinstance(self.save_minutes, (int, float)) and 0 < self.save_minutes <= 10):
            raise M2R2Error(f"save_minutes must be in (0, 10], got {self.save_minutes!r}")
        if isinstance(self.save_every, bool) or not isinstance(self.save_every, int) or self.save_every < 1:
            raise M2R2Error(f"save_every must be an integer >= 1, got {self.save_every!r}")


def _config_dict(c) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(c)))


@dataclasses.dataclass(frozen=True)
class Peer:
    """One peer as the loop trains it: its checkpoint kind, the trainable tree's start, the optimizer, the
    jitted step(params, opt_state, base, tokens, mask) -> (params, opt_state, *metrics named `metrics`;
    scalars, or vectors logged as `name/i`), the summary key the trained tree is returned under, and
    fields added to the meta and the summary."""

    kind: str
    params: Any
    opt: Any
    step: Callable
    metrics: tuple[str, ...]
    key: str
    extra_meta: dict = dataclasses.field(default_factory=dict)


def _scalars(names, values) -> dict[str, float]:
    """A step's metrics as the loop logs them: a vector metric `name` (one value per exit layer, say)
    becomes `name/0`, `name/1`, ... (the Tracker's names)."""
    out = {}
    for k, v in zip(names, values):
        a = np.asarray(v)
        out.update({k: float(a)} if a.ndim == 0 else {f"{k}/{j}": float(x) for j, x in enumerate(a.reshape(-1))})
    return out


def _train_draft(peer: Peer, cfg, base, records, c, out_dir, identity, limits, progress):
    """The shared loop -> (params, summary)."""
    kind, params = peer.kind, peer.params
    tokens, mask = pack_examples(records, c.seq_len)
    if len(tokens) < c.batch_size:
        raise M2R2Error(f"{len(tokens)} distilled examples, fewer than one batch of {c.batch_size}")
    out = Path(out_dir)
    last = None
    if (out / "checkpoints").is_dir():
        try:
            _, last, meta = resolve_draft_checkpoint(out, kind, kind)
        except M2R2Error:
            last = None
        if last is not None:
            if meta["base"].get("signature") != identity["signature"]:
                raise M2R2Error(f"{out}: its checkpoints were trained on another base model; use a new --out")
            if meta["config"] != _config_dict(c):
                diff = sorted(k for k in _config_dict(c) if meta["config"].get(k) != _config_dict(c)[k])
                raise M2R2Error(f"{out}: its checkpoints have another config (differs in: {', '.join(diff)})")
    opt_state = peer.opt.init(params)
    ck = Checkpointer(out / "checkpoints", save_every=limits.save_every, keep=2)
    trainable = int(sum(x.size for x in jax.tree.leaves(params)))
    meta = dict(kind=kind, base=identity, config=_config_dict(c), trainable_params=trainable, **peer.extra_meta)
    start, spent = 0, 0.0
    if last is not None:
        params, opt_state, ex, _ = ck.restore(last, params, opt_state, {"seconds": np.float64(0)})
        start, spent = last, float(ex["seconds"])
    tr = Tracker(out, resume_step=start)
    order = np.random.RandomState(c.seed).permutation(len(tokens) * (1 + c.steps * c.batch_size // len(tokens)))
    order %= len(tokens)
    end = c.steps if limits.until is None else min(limits.until, c.steps)
    budget_s = None if limits.budget_minutes is None else 60.0 * limits.budget_minutes
    t0 = time.perf_counter()
    t_saved, saved = t0, start
    i, stopped, metrics, step_s, step_cpu = start, "steps", None, [], []

    def save(n, force):
        el = spent + time.perf_counter() - t0
        m = dict(meta, step=n, steps_run=n, train_minutes=round(el / 60, 3), budget_minutes=limits.budget_minutes)
        return ck.save(n, params, opt_state, {"seconds": np.float64(el)}, m, force=force)

    bar = tqdm(range(start, end), desc=kind, disable=not progress, initial=start, total=c.steps)
    for i in bar:
        # the budget ends a run after the step during which it ran out: a call runs at least one step
        # unless earlier calls spent it all
        if budget_s is not None and (i > start or spent >= budget_s) and spent + time.perf_counter() - t0 >= budget_s:
            stopped = "budget"
            break
        idx = order[i * c.batch_size : (i + 1) * c.batch_size]
        ts, tc = time.perf_counter(), time.process_time()
        params, opt_state, *ms = peer.step(params, opt_state, base, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]))
        metrics = _scalars(peer.metrics, ms)
        step_s.append(time.perf_counter() - ts)
        step_cpu.append(time.process_time() - tc)
        tr.log(i + 1, metrics)
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
        now = time.perf_counter()
        if save(i + 1, force=now - t_saved >= 60.0 * limits.save_minutes or i + 1 == end):
            t_saved, saved = now, i + 1
    else:
        i = end
    done = i if stopped == "budget" else end
    if done > saved:
        save(done, force=True)
    ck.close()
    tr.close()
    summary = dict(
        kind=kind,
        steps=done,
        stopped=stopped,
        minutes=round((spent + time.perf_counter() - t0) / 60, 3),
        trainable_params=trainable,
        budget_minutes=limits.budget_minutes,
        examples=len(tokens),
        # wall and process CPU seconds (all threads) per step after the first (which compiles)
        seconds_per_step=None if len(step_s) < 2 else round(float(np.median(step_s[1:])), 3),
        cpu_seconds_per_step=None if len(step_cpu) < 2 else round(float(np.median(step_cpu[1:])), 3),
        first_step_seconds=round(step_s[0], 3) if step_s else None,
        final=metrics,
        **peer.extra_meta,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return params, summary


def identity_of(model_name: str, cfg: ModelConfig, base: dict, fingerprint: str = "") -> dict:
    """The base identity in a draft checkpoint: base_identity's fields and the drafter-side signature."""
    ident = base_identity(model_name, cfg, base, fingerprint or None)
    return dict(ident, signature=base_signature(cfg, base))


def train_peer(
    recipe: Callable[[ModelConfig, dict, Any], Peer],
    cfg: ModelConfig,
    base: dict,
    records: Sequence[dict],
    c,
    out_dir,
    model_name: str = "",
    fingerprint: str = "",
    limits: RunLimits | None = None,
    progress: bool = True,
) -> dict:
    """Train the peer `recipe(cfg, base, c)` describes (c: its run config) on the records; checkpoints,
    metrics and summary.json under out_dir; the same call resumes. -> summary | {peer.key: the params}."""
    peer = recipe(cfg, base, c)
    ident = identity_of(model_name, cfg, base, fingerprint)
    params, summary = _train_draft(peer, cfg, base, records, c, out_dir, ident, limits or RunLimits(), progress)
    return summary | {peer.key: params}


def kangaroo_peer(cfg: ModelConfig, base: dict, kc: KG.KangarooConfig) -> Peer:
    """Kangaroo's adapter, soft cross-entropy to the full model (summary key "adapter")."""
    kc.check(cfg)
    opt = KG.optimizer(kc)
    step = KG.make_step(cfg, kc, opt)
    return Peer(KG.KIND, KG.init_adapter(cfg, base, kc), opt, step, ("soft_ce", "kl", "top1"), "adapter")


def sps_peer(cfg: ModelConfig, base: dict, sc: SP.SPSConfig) -> Peer:
    """The 2-model drafter's small model, distilled with KL to the full model (summary key "draft")."""
    sc.check(cfg)
    opt = SP.optimizer(sc)
    dcfg = SP.draft_config(cfg, sc.num_layers)
    extra = dict(
        draft_model_config=dcfg.record(),
        source_layers=list(sc.source_layers(cfg)),
        draft_model_params=int(
            sum(x.size for x in jax.tree.leaves(SP.draft_model(cfg, base, SP.draft_spec(cfg, sc.num_layers))))
        ),
    )
    step = SP.make_step(cfg, sc, opt)
    return Peer(SP.KIND, SP.init_draft(cfg, base, sc), opt, step, ("kl", "soft_ce", "top1"), "draft", extra)


# train_kangaroo(cfg, base, records, kc, out_dir, model_name="", fingerprint="", limits=None, progress=True)
# -> summary | {"adapter": ...}; train_sps the same with an SPSConfig -> summary | {"draft": ...}
train_kangaroo = functools.partial(train_peer, kangaroo_peer)
train_sps = functools.partial(train_peer, sps_peer)
