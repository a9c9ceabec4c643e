"""Training and loading the early-exit peers' parts (m2r2_jax/peers): the static exit heads, SpecEE's
predictors, LayerSkip's and SkipDecode's adapters, each on a self-distillation cache with the base frozen.

The exit heads and the LayerSkip / SkipDecode adapters train through the trained peers' one loop
(`train_early_exit` over `spec_peers.train_peer`: Orbax checkpoints with the base's fingerprint and the
budget fields, metrics, exact resume, `--minutes`); SpecEE's predictors are a fixed small job
(`train_specee`: feature collection, then full-batch epochs). The loaders read what these write."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.data.batches import pack_examples
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers import exit_head as EH
from m2r2_jax.peers import layerskip as LS
from m2r2_jax.peers import skipdecode as SD
from m2r2_jax.peers.budget import parse_minutes
from m2r2_jax.peers.specee import SpecEEConfig, collect, init_predictors, predict
from m2r2_jax.stats import auc
from m2r2_jax.training.checkpoint import Checkpointer, latest_step
from m2r2_jax.training.spec_peers import Peer, RunLimits, train_peer

# kind: (its metrics, the summary key its trained tree is returned under)
EARLY_EXIT = {
    "exit_heads": (("loss", "kl"), "heads"),  # kl: one per exit layer (logged kl/0, kl/1, ...)
    "layerskip": (("loss", "kl_exit", "kl_full"), "adapters"),  # kl_exit: one per exit layer
    "skipdecode": (("kl",), "adapters"),
}


def early_exit_peer(kind: str, fingerprint: str = "") -> Callable[[ModelConfig, dict, object], Peer]:
    """The `spec_peers.train_peer` recipe of an early-exit peer (kind: exit_heads | layerskip |
    skipdecode; its run config an ExitHeadConfig / LayerSkipConfig / SkipDecodeConfig). Its checkpoints
    are what load_exit_heads / load_layerskip / load_skipdecode read (kind, config, base_fingerprint;
    params, opt_state, extra seconds)."""
    if kind not in EARLY_EXIT:
        raise M2R2Error(f"unknown early-exit peer {kind!r} (one of {', '.join(EARLY_EXIT)})")
    metrics, key = EARLY_EXIT[kind]

    def recipe(cfg: ModelConfig, base: dict, c) -> Peer:
        bad = [E for E in c.layers if not 1 <= E < cfg.num_layers]
        if bad:
            raise M2R2Error(f"exit layers must be in [1, {cfg.num_layers}), got {bad}")
        mod = {"exit_heads": EH, "layerskip": LS, "skipdecode": SD}[kind]
        opt = mod.optimizer(c)
        if kind == "exit_heads":
            params = EH.init_heads(cfg, len(c.layers), c.rank, c.seed)
        else:
            params = mod.init_adapters(cfg, c)
        return Peer(kind, params, opt, mod.make_step(cfg, c, opt), metrics, key, dict(base_fingerprint=fingerprint))

    return recipe


def train_early_exit(
    kind: str,
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
    """Train an early-exit peer (see early_exit_peer) through the trained peers' one loop: checkpoints,
    metrics and summary.json under out_dir; the same call resumes exactly (`limits.until` stops a call
    early, as an interruption would; `limits.budget_minutes` ends the run on wall clock). -> summary
    (steps, stopped, minutes, trainable_params, budget_minutes, final metrics, layers, ...) | {"heads"
    (exit_heads) or "adapters": the trained tree}."""
    s = train_peer(
        early_exit_peer(kind, fingerprint), cfg, base, records, c, out_dir, model_name, fingerprint, limits, progress
    )
    return s | {"layers": list(c.layers)}


def _read_meta(step_dir: Path) -> dict:
    try:
        meta = json.loads((step_dir / "meta" / "metadata").read_text())
    except (OSError, ValueError) as e:
        raise M2R2Error(f"cannot read {step_dir / 'meta' / 'metadata'}: {e}") from None
    if not isinstance(meta, dict):
        raise M2R2Error(f"{step_dir}: metadata is not a JSON object")
    return meta


def load_exit_heads(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[dict, tuple[int, ...]]:
    """The trained heads of `train_early_exit("exit_heads", ...)` (its latest checkpoint) and their exit layers."""
    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no exit-head checkpoint under {out / 'checkpoints'}")
    meta = _read_meta(out / "checkpoints" / str(last))
    if not isinstance(meta, dict) or meta.get("kind") != "exit_heads" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not an exit-head checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: exit heads trained on another base model (fingerprint differs)")
    hc = EH.ExitHeadConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = EH.init_heads(cfg, len(hc.layers), hc.rank)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    heads, _, _, _ = ck.restore(last, abstract, EH.optimizer(hc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return heads, hc.layers


def train_specee(
    cfg,
    mc,
    base,
    m2r2,
    draft_ids,
    records: Sequence[dict],
    sc: SpecEEConfig,
    out_dir,
    fingerprint: str = "",
    budget_minutes: float | None = None,
):
    """Collect features on the distilled answers, train the per-layer predictors (BCE, full-batch
    epochs), save them (Orbax) with a summary: per layer AUC on a held-out tenth, minutes, params.
    `budget_minutes` (`--minutes`) is recorded with the other budget fields in the checkpoint's meta, not
    enforced (a fixed small job: steps_run = epochs x 10)."""
    budget_minutes = parse_minutes(budget_minutes)
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
    trainable, el = int(sum(x.size for x in jax.tree.leaves(pred))), time.perf_counter() - t0
    meta = dict(
        kind="specee",
        base_fingerprint=fingerprint,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(sc).items()},
        step=1,
        steps_run=sc.epochs * 10,
        train_minutes=round(el / 60, 3),
        trainable_params=trainable,
        budget_minutes=budget_minutes,
    )
    ck.save(1, pred, st, {"seconds": np.float64(el)}, meta, force=True)
    ck.close()
    summary = dict(
        minutes=round((time.perf_counter() - t0) / 60, 2),
        steps=sc.epochs * 10,
        trainable_params=trainable,
        budget_minutes=budget_minutes,
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


def load_layerskip(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[list, LS.LayerSkipConfig]:
    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no LayerSkip checkpoint under {out / 'checkpoints'}")
    meta = _read_meta(out / "checkpoints" / str(last))
    if not isinstance(meta, dict) or meta.get("kind") != "layerskip" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not a LayerSkip checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: LayerSkip adapters trained on another base model (fingerprint differs)")
    lc = LS.LayerSkipConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = LS.init_adapters(cfg, lc)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    ads, _, _, _ = ck.restore(last, abstract, LS.optimizer(lc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return ads, lc


def load_skipdecode(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[list, SD.SkipDecodeConfig]:
    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no SkipDecode checkpoint under {out / 'checkpoints'}")
    meta = _read_meta(out / "checkpoints" / str(last))
    if meta.get("kind") != "skipdecode" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not a SkipDecode checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: SkipDecode adapters trained on another base model (fingerprint differs)")
    sc = SD.SkipDecodeConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = SD.init_adapters(cfg, sc)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    ads, _, _, _ = ck.restore(last, abstract, SD.optimizer(sc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return ads, sc
