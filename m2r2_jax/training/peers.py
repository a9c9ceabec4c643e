"""Training and loading the early-exit peers' parts (m2r2_jax/peers): the static exit heads, SpecEE's
predictors, LayerSkip's and SkipDecode's adapters. Each trains on a self-distillation cache with the base frozen, writes
Orbax checkpoints (with the base's fingerprint) and metrics, and resumes where it runs long."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from m2r2_jax.config import ModelConfig
from m2r2_jax.data.batches import pack_examples
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers.exit_head import ExitHeadConfig, init_heads
from m2r2_jax.peers.exit_head import make_step as exit_head_step
from m2r2_jax.peers.exit_head import optimizer as exit_head_optimizer
from m2r2_jax.peers.layerskip import LayerSkipConfig, init_adapters
from m2r2_jax.peers.layerskip import make_step as layerskip_step
from m2r2_jax.peers.layerskip import optimizer as layerskip_optimizer
from m2r2_jax.peers.skipdecode import SkipDecodeConfig
from m2r2_jax.peers.skipdecode import init_adapters as skipdecode_adapters
from m2r2_jax.peers.skipdecode import make_step as skipdecode_step
from m2r2_jax.peers.skipdecode import optimizer as skipdecode_optimizer
from m2r2_jax.peers.specee import SpecEEConfig, collect, init_predictors, predict
from m2r2_jax.stats import auc
from m2r2_jax.training.checkpoint import Checkpointer, latest_step
from m2r2_jax.training.metrics import Tracker


def _read_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
    except (OSError, ValueError) as e:
        raise M2R2Error(f"cannot read {step_dir / 'meta' / 'metadata'}: {e}") from None
    if not isinstance(meta, dict):
        raise M2R2Error(f"{step_dir}: metadata is not a JSON object")
    return meta


SAVE_MINUTES = 10.0  # a checkpoint at least this often (wall clock), besides every 25 steps


def _train(kind, cfg, base, records, c, params, opt, step, names, out_dir, fingerprint, progress, until):
    """The peers' shared training loop over a distillation cache (c: a peer config with layers, steps,
    batch_size, seq_len, seed): Orbax checkpoints every 25 steps, at least every SAVE_MINUTES and at the
    end of a call, metrics (JSONL + TensorBoard), exact resume.
    step(params, opt_state, base, tokens, mask) -> (params, opt_state, *metrics named `names`).
    -> (params, summary, the last step's metrics)."""
    bad = [E for E in c.layers if not 1 <= E < cfg.num_layers]
    if bad:
        raise M2R2Error(f"exit layers must be in [1, {cfg.num_layers}), got {bad}")
    tokens, mask = pack_examples(records, c.seq_len)
    if len(tokens) < c.batch_size:
        raise M2R2Error(f"{len(tokens)} distilled examples, fewer than one batch of {c.batch_size}")
    opt_state = opt.init(params)
    out = Path(out_dir)
    ck = Checkpointer(out / "checkpoints", save_every=25, keep=2)
    meta = dict(
        kind=kind,
        base_fingerprint=fingerprint,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(c).items()},
    )
    start, spent = 0, 0.0
    last = ck.latest_step()
    if last is not None:
        params, opt_state, extra, _ = ck.restore(last, params, opt_state, {"seconds": np.float64(0)})
        start, spent = last, float(extra["seconds"])
    tr = Tracker(out, resume_step=start)
    order = np.random.RandomState(c.seed).permutation(len(tokens) * (1 + c.steps * c.batch_size // len(tokens)))
    order %= len(tokens)
    end = c.steps if until is None else min(until, c.steps)
    t0 = t_saved = time.perf_counter()
    metrics = None
    for i in tqdm(range(start, end), desc=kind, disable=not progress, initial=start, total=c.steps):
        idx = order[i * c.batch_size : (i + 1) * c.batch_size]
        params, opt_state, *ms = step(params, opt_state, base, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]))
        metrics = dict(zip(names, ms))
        tr.log(i + 1, metrics)
        now = time.perf_counter()
        force = i + 1 == end or now - t_saved >= 60.0 * SAVE_MINUTES
        if ck.save(
            i + 1, params, opt_state, {"seconds": np.float64(spent + now - t0)}, dict(meta, step=i + 1), force=force
        ):
            t_saved = now
    ck.close()
    tr.close()
    summary = dict(
        steps=end,
        minutes=round((spent + time.perf_counter() - t0) / 60, 2),
        trainable_params=int(sum(x.size for x in jax.tree.leaves(params))),
        layers=list(c.layers),
        examples=len(tokens),
    )
    return params, summary, metrics


def train_exit_heads(
    cfg,
    base,
    records: Sequence[dict],
    hc: ExitHeadConfig,
    out_dir,
    fingerprint: str = "",
    progress: bool = True,
    until: int | None = None,
) -> dict:
    """Train the heads; checkpoints (Orbax) and metrics (JSONL + TensorBoard) under out_dir; resumes
    from its latest checkpoint (the schedule is defined on hc.steps; `until` stops this call early, as
    an interruption would). -> summary {steps, minutes, trainable_params, final KL per head}."""
    opt = exit_head_optimizer(hc)
    heads, summary, ms = _train(
        "exit_heads",
        cfg,
        base,
        records,
        hc,
        init_heads(cfg, len(hc.layers), hc.rank, hc.seed),
        opt,
        exit_head_step(cfg, hc, opt),
        ("loss", "kl"),
        out_dir,
        fingerprint,
        progress,
        until,
    )
    summary["final_kl"] = None if ms is None else [float(x) for x in np.asarray(ms["kl"])]
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary | {"heads": heads}


def load_exit_heads(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[dict, tuple[int, ...]]:
    """The trained heads of `train_exit_heads` (its latest checkpoint) and their exit layers."""
    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no exit-head checkpoint under {out / 'checkpoints'}")
    meta = _read_meta(out / "checkpoints" / str(last))
    if not isinstance(meta, dict) or meta.get("kind") != "exit_heads" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not an exit-head checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: exit heads trained on another base model (fingerprint differs)")
    hc = ExitHeadConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = init_heads(cfg, len(hc.layers), hc.rank)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    heads, _, _, _ = ck.restore(last, abstract, exit_head_optimizer(hc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return heads, hc.layers


def train_specee(
    cfg, mc, base, m2r2, draft_ids, records: Sequence[dict], sc: SpecEEConfig, out_dir, fingerprint: str = ""
):
    """Collect features on the distilled answers, train the per-layer predictors (BCE, full-batch
    epochs), save them (Orbax) with a summary: per layer AUC on a held-out tenth, minutes, params."""

    bad = [E for E in sc.layers if not 1 <= E < cfg.num_layers]
    if bad:
        raise M2R2Error(f"specee check layers must be in [1, {cfg.num_layers}), got {bad}")
    t0 = time.perf_counter()
    tokens, mask = pack_examples(list(records)[: sc.examples], sc.seq_len)
    feats, labels, reach = collect(cfg, mc, base, m2r2, draft_ids, tokens, mask, sc)
    n, P = labels.shape
    rs = np.random.RandomState(sc.seed)
    perm = rs.permutation(P)
    hold = perm[: P // 10]
    train = perm[P // 10 :]
    pred = init_predictors(n, sc.k, sc.hidden, sc.seed)
    opt = optax.adam(sc.lr)
    st = opt.init(pred)

    def loss(p, f, y):
        lg = jax.vmap(lambda fi, i: predict(p, fi, i))(f, jnp.arange(n))
        return jnp.mean(optax.sigmoid_binary_cross_entropy(lg, y))

    @jax.jit
    def step(p, st, f, y):
        v, g = jax.value_and_grad(loss)(p, f, y)
        u, st = opt.update(g, st, p)
        return optax.apply_updates(p, u), st, v

    f_tr, y_tr = jnp.asarray(feats[:, train]), jnp.asarray(labels[:, train])
    for _ in range(sc.epochs * 10):
        pred, st, v = step(pred, st, f_tr, y_tr)
    scores = np.asarray(jax.vmap(lambda fi, i: predict(pred, fi, i))(jnp.asarray(feats[:, hold]), jnp.arange(n)))
    out = Path(out_dir)
    ck = Checkpointer(out / "checkpoints", save_every=1, keep=1, async_save=False)
    meta = dict(
        kind="specee",
        base_fingerprint=fingerprint,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sc).items()},
    )
    ck.save(1, pred, st, {"seconds": np.float64(time.perf_counter() - t0)}, dict(meta, step=1), force=True)
    ck.close()
    summary = dict(
        minutes=round((time.perf_counter() - t0) / 60, 2),
        trainable_params=int(sum(x.size for x in jax.tree.leaves(pred))),
        positions=int(P),
        candidate_recall=float(reach.mean()),
        layers=list(sc.layers),
        label_rate=[float(x) for x in labels.mean(1)],
        heldout_auc=[auc(scores[i], labels[i, hold]) for i in range(n)],
        final_bce=float(v),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary | {"predictors": pred}


def load_specee(out_dir, fingerprint: str = "") -> tuple[dict, SpecEEConfig]:
    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no SpecEE predictor checkpoint under {out / 'checkpoints'}")
    meta = _read_meta(out / "checkpoints" / str(last))
    if not isinstance(meta, dict) or meta.get("kind") != "specee" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not a SpecEE predictor checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: SpecEE predictors trained on another base model (fingerprint differs)")
    sc = SpecEEConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = init_predictors(len(sc.layers), sc.k, sc.hidden)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    pred, _, _, _ = ck.restore(last, abstract, optax.adam(sc.lr).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return pred, sc


def train_layerskip(
    cfg,
    base,
    records: Sequence[dict],
    lc: LayerSkipConfig,
    out_dir,
    fingerprint: str = "",
    progress: bool = True,
    until: int | None = None,
) -> dict:
    """Train the adapters; Orbax checkpoints every 25 steps, at least every SAVE_MINUTES and at the end of
    a call, metrics (JSONL + TensorBoard), exact resume (the schedule is defined on lc.steps; `until` stops
    a call early)."""
    opt = layerskip_optimizer(lc)
    ads, summary, _ = _train(
        "layerskip",
        cfg,
        base,
        records,
        lc,
        init_adapters(cfg, lc),
        opt,
        layerskip_step(cfg, lc, opt),
        ("loss", "kl_exit", "kl_full"),
        out_dir,
        fingerprint,
        progress,
        until,
    )
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary | {"adapters": ads}


def load_layerskip(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[list, LayerSkipConfig]:
    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no LayerSkip checkpoint under {out / 'checkpoints'}")
    meta = _read_meta(out / "checkpoints" / str(last))
    if not isinstance(meta, dict) or meta.get("kind") != "layerskip" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not a LayerSkip checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: LayerSkip adapters trained on another base model (fingerprint differs)")
    lc = LayerSkipConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = init_adapters(cfg, lc)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    ads, _, _, _ = ck.restore(last, abstract, layerskip_optimizer(lc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return ads, lc


def train_skipdecode(
    cfg,
    base,
    records: Sequence[dict],
    sc: SkipDecodeConfig,
    out_dir,
    fingerprint: str = "",
    progress: bool = True,
    until: int | None = None,
) -> dict:
    """Train SkipDecode's adapters for its schedule (peers/skipdecode.py); checkpoints, metrics and
    resume as `train_layerskip`."""
    opt = skipdecode_optimizer(sc)
    ads, summary, ms = _train(
        "skipdecode",
        cfg,
        base,
        records,
        sc,
        skipdecode_adapters(cfg, sc),
        opt,
        skipdecode_step(cfg, sc, opt),
        ("kl",),
        out_dir,
        fingerprint,
        progress,
        until,
    )
    summary["final_kl"] = None if ms is None else float(ms["kl"])
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary | {"adapters": ads}


def load_skipdecode(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[list, SkipDecodeConfig]:
    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no SkipDecode checkpoint under {out / 'checkpoints'}")
    meta = _read_meta(out / "checkpoints" / str(last))
    if meta.get("kind") != "skipdecode" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not a SkipDecode checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: SkipDecode adapters trained on another base model (fingerprint differs)")
    sc = SkipDecodeConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = skipdecode_adapters(cfg, sc)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    ads, _, _, _ = ck.restore(last, abstract, skipdecode_optimizer(sc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return ads, sc
