"""LayerSkip-style early exit on a frozen base (Elhoushi et al. 2024, adapted): LoRA adapters (rank r)
on the base layers below the deepest exit layer, trained so that the shared final norm + LM head read
the full model's next token off layer E (an early-exit KL loss at each exit layer E) while the adapted
model's own last layer stays close to the original (a full-depth KL term). LayerSkip fine-tunes the
whole model with layer dropout and a curriculum; here only the adapters train (the base stays frozen),
and decoding runs the adapted weights merged (`merged_base`) with the static exit at E.

Params: the M2R2 tree's `fast` list layout (per base layer 0 .. n-1: adapters a [in, rank], b [rank,
out] on q k v o gate up down; no gains), so `stream.merge_fast_layer` folds them in.
"""

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

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2


@dataclasses.dataclass(frozen=True)
class LayerSkipConfig:
    layers: tuple[int, ...] = (20, 24, 27, 29)  # exit layers (after this many base layers)
    rank: int = 16
    full_weight: float = 1.0  # the full-depth KL term
    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 160
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "seq_len", "positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"{name} must be an integer >= 1, got {v!r}")
        if not self.layers:
            raise M2R2Error("layerskip: at least one exit layer")
        if not (self.lr > 0 and self.full_weight >= 0):
            raise M2R2Error("layerskip: lr must be > 0 and full_weight >= 0")

    def adapter_config(self) -> M2R2Config:
        return M2R2Config(rate=1, num_fast_layers=max(self.layers), rank=self.rank, gain=False, layer_map="prefix")


def init_adapters(cfg: ModelConfig, lc: LayerSkipConfig) -> list:
    return init_m2r2(cfg, lc.adapter_config().validate(cfg.num_layers), jax.random.key(lc.seed))["fast"]


def merged_base(base: dict, adapters: list) -> dict:
    """The base with the adapters folded into layers 0 .. len(adapters)-1."""
    layers = list(base["layers"])
    for j, ad in enumerate(adapters):
        layers[j] = S.merge_fast_layer(layers[j], ad)
    return dict(base, layers=layers)


def optimizer(lc: LayerSkipConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, lc.lr, max(1, lc.steps // 20), lc.steps, lc.lr * 0.05)
    return optax.adamw(sched, weight_decay=0.0)


def make_step(cfg: ModelConfig, lc: LayerSkipConfig, opt):
    def kl(t, logits, m):
        s = jax.nn.log_softmax(logits, -1)
        return jnp.sum(jnp.sum(jnp.exp(t) * (t - s), -1) * m) / jnp.maximum(jnp.sum(m), 1.0)

    def loss_fn(ads, base, tokens, mask):
        sel, m = S.loss_positions(mask, min(lc.positions, tokens.shape[1]))
        t = jax.nn.log_softmax(jax.lax.stop_gradient(S.slow_pass(cfg, base, tokens, select=sel).logits), -1)
        mb = merged_base(base, ads)
        slow = S.slow_pass(cfg, mb, tokens, select=sel)
        per = [kl(t, S.draft_logits(cfg, mb, slow.hiddens[E], None), m) for E in lc.layers]
        full = kl(t, slow.logits, m)
        return sum(per) + lc.full_weight * full, (jnp.stack(per), full)

    @jax.jit
    def step(ads, opt_state, base, tokens, mask):
        (loss, (per, full)), g = jax.value_and_grad(loss_fn, has_aux=True)(ads, base, tokens, mask)
        upd, opt_state = opt.update(g, opt_state, ads)
        return optax.apply_updates(ads, upd), opt_state, loss, per, full

    return step


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
    """Train the adapters; Orbax checkpoints every 25 steps and at the end of a call, metrics (JSONL +
    TensorBoard), exact resume (the schedule is defined on lc.steps; `until` stops a call early)."""
    from tqdm import tqdm

    from m2r2_jax.data.batches import pack_examples
    from m2r2_jax.training.checkpoint import Checkpointer
    from m2r2_jax.training.metrics import Tracker

    bad = [E for E in lc.layers if not 1 <= E < cfg.num_layers]
    if bad:
        raise M2R2Error(f"exit layers must be in [1, {cfg.num_layers}), got {bad}")
    tokens, mask = pack_examples(records, lc.seq_len)
    if len(tokens) < lc.batch_size:
        raise M2R2Error(f"{len(tokens)} distilled examples, fewer than one batch of {lc.batch_size}")
    opt = optimizer(lc)
    ads = init_adapters(cfg, lc)
    opt_state = opt.init(ads)
    out = Path(out_dir)
    ck = Checkpointer(out / "checkpoints", save_every=25, keep=2)
    meta = dict(
        kind="layerskip",
        base_fingerprint=fingerprint,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(lc).items()},
    )
    start, spent = 0, 0.0
    last = ck.latest_step()
    if last is not None:
        ads, opt_state, extra, _ = ck.restore(last, ads, opt_state, {"seconds": np.float64(0)})
        start, spent = last, float(extra["seconds"])
    step = make_step(cfg, lc, opt)
    tr = Tracker(out, resume_step=start)
    order = np.random.RandomState(lc.seed).permutation(len(tokens) * (1 + lc.steps * lc.batch_size // len(tokens)))
    order %= len(tokens)
    end = lc.steps if until is None else min(until, lc.steps)
    t0 = time.perf_counter()
    for i in tqdm(range(start, end), desc="layerskip", disable=not progress, initial=start, total=lc.steps):
        idx = order[i * lc.batch_size : (i + 1) * lc.batch_size]
        ads, opt_state, loss, per, full = step(ads, opt_state, base, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]))
        tr.log(i + 1, {"loss": loss, "kl_exit": per, "kl_full": full})
        el = spent + time.perf_counter() - t0
        ck.save(i + 1, ads, opt_state, {"seconds": np.float64(el)}, dict(meta, step=i + 1), force=i + 1 == end)
    ck.close()
    tr.close()
    summary = dict(
        steps=end,
        minutes=round((spent + time.perf_counter() - t0) / 60, 2),
        trainable_params=int(sum(x.size for x in jax.tree.leaves(ads))),
        layers=list(lc.layers),
        examples=len(tokens),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary | {"adapters": ads}


def load_layerskip(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[list, LayerSkipConfig]:
    from m2r2_jax.cli import read_json
    from m2r2_jax.training.checkpoint import Checkpointer, latest_step

    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no LayerSkip checkpoint under {out / 'checkpoints'}")
    meta = read_json(out / "checkpoints" / str(last) / "meta" / "metadata")
    if not isinstance(meta, dict) or meta.get("kind") != "layerskip" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not a LayerSkip checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: LayerSkip adapters trained on another base model (fingerprint differs)")
    lc = LayerSkipConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = init_adapters(cfg, lc)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    ads, _, _, _ = ck.restore(last, abstract, optimizer(lc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return ads, lc
