"""A trained exit head for static early exit: at base layer E, a residual low-rank adapter on the state
(h + (rms_norm(h) a) b, b zero-initialised) before the frozen final norm and LM head, distilled to the
full model's next-token distribution on the self-distilled answers. One head per exit layer in one
param tree (stacked [n_exits, ...]); the base stays frozen.

    ExitHeads   norm [n, embed], a [n, embed, rank], b [n, rank, embed]
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.modules import declare, ones, zeros


class ExitHeads(nn.Module):
    cfg: ModelConfig
    n: int
    rank: int

    @nn.compact
    def __call__(self, h, idx):
        """h [B, T, D] at exit layer `layers[idx]` -> the adapted state (then final norm + LM head)."""
        D_ = self.cfg.hidden_size
        norm = ones(self, "norm", (self.n, D_), (None, "norm"))
        a = declare(self, "a", (self.n, D_, self.rank), (None, "embed", "rank"), init=nn.initializers.normal(D_**-0.5))
        b = zeros(self, "b", (self.n, self.rank, D_), (None, "rank", "embed"))
        x = L.rms_norm(h, norm[idx], self.cfg.rms_norm_eps)
        return h + ((x @ a[idx]) @ b[idx]).astype(h.dtype)


def init_heads(cfg: ModelConfig, n: int, rank: int, seed: int = 0) -> dict:
    p = ExitHeads(cfg, n, rank).init(jax.random.key(seed), jnp.zeros((1, 1, cfg.hidden_size)), 0)["params"]
    return jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, p, is_leaf=lambda x: hasattr(x, "value"))


def head_logits(cfg: ModelConfig, base: dict, heads: dict, h, idx) -> jax.Array:
    n, rank = heads["a"].shape[0], heads["a"].shape[2]
    return D.logits_from_hidden(cfg, base, ExitHeads(cfg, n, rank).apply({"params": heads}, h, idx))


@dataclasses.dataclass(frozen=True)
class ExitHeadConfig:
    layers: tuple[int, ...] = (20, 24, 27, 29)  # exit after this many base layers
    rank: int = 64
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 160  # answer positions per row the loss reads
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "seq_len", "positions"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"{name} must be an integer >= 1, got {v!r}")
        if not self.layers:
            raise M2R2Error("exit heads: at least one exit layer")
        if not self.lr > 0:
            raise M2R2Error(f"lr must be > 0, got {self.lr!r}")


def optimizer(hc: ExitHeadConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, hc.lr, max(1, hc.steps // 20), hc.steps, hc.lr * 0.05)
    return optax.adamw(sched, weight_decay=0.0)


def make_step(cfg: ModelConfig, hc: ExitHeadConfig, opt):
    layers = tuple(hc.layers)

    def loss_fn(heads, base, tokens, mask):
        B, T = tokens.shape
        sel, m = S.loss_positions(mask, min(hc.positions, T))
        slow = S.slow_pass(cfg, base, tokens, select=sel)
        t = jax.nn.log_softmax(jax.lax.stop_gradient(slow.logits), -1)
        losses = []
        for i, E in enumerate(layers):
            s = jax.nn.log_softmax(head_logits(cfg, base, heads, jax.lax.stop_gradient(slow.hiddens[E]), i), -1)
            kl = jnp.sum(jnp.exp(t) * (t - s), -1)
            losses.append(jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0))
        return sum(losses), jnp.stack(losses)

    @jax.jit
    def step(heads, opt_state, base, tokens, mask):
        (loss, per), g = jax.value_and_grad(loss_fn, has_aux=True)(heads, base, tokens, mask)
        upd, opt_state = opt.update(g, opt_state, heads)
        return optax.apply_updates(heads, upd), opt_state, loss, per

    return step


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
    from tqdm import tqdm

    from m2r2_jax.data.batches import pack_examples
    from m2r2_jax.training.checkpoint import Checkpointer
    from m2r2_jax.training.metrics import Tracker

    bad = [E for E in hc.layers if not 1 <= E < cfg.num_layers]
    if bad:
        raise M2R2Error(f"exit layers must be in [1, {cfg.num_layers}), got {bad}")
    tokens, mask = pack_examples(records, hc.seq_len)
    if len(tokens) < hc.batch_size:
        raise M2R2Error(f"{len(tokens)} distilled examples, fewer than one batch of {hc.batch_size}")
    opt = optimizer(hc)
    heads = init_heads(cfg, len(hc.layers), hc.rank, hc.seed)
    opt_state = opt.init(heads)
    out = Path(out_dir)
    ck = Checkpointer(out / "checkpoints", save_every=25, keep=2)
    meta = dict(
        kind="exit_heads",
        base_fingerprint=fingerprint,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(hc).items()},
    )
    start, spent = 0, 0.0
    last = ck.latest_step()
    if last is not None:
        heads, opt_state, extra, _ = ck.restore(last, heads, opt_state, {"seconds": np.float64(0)})
        start, spent = last, float(extra["seconds"])
    step = make_step(cfg, hc, opt)
    tr = Tracker(out, resume_step=start)
    order = np.random.RandomState(hc.seed).permutation(len(tokens) * (1 + hc.steps * hc.batch_size // len(tokens)))
    order %= len(tokens)
    t0 = time.perf_counter()
    per = None
    end = hc.steps if until is None else min(until, hc.steps)
    for i in tqdm(range(start, end), desc="exit heads", disable=not progress, initial=start, total=hc.steps):
        idx = order[i * hc.batch_size : (i + 1) * hc.batch_size]
        heads, opt_state, loss, per = step(heads, opt_state, base, jnp.asarray(tokens[idx]), jnp.asarray(mask[idx]))
        tr.log(i + 1, {"loss": loss, "kl": per})
        el = spent + time.perf_counter() - t0
        ck.save(i + 1, heads, opt_state, {"seconds": np.float64(el)}, dict(meta, step=i + 1), force=i + 1 == end)
    ck.close()
    tr.close()
    minutes = (spent + time.perf_counter() - t0) / 60
    summary = dict(
        steps=end,
        minutes=round(minutes, 2),
        trainable_params=int(sum(x.size for x in jax.tree.leaves(heads))),
        layers=list(hc.layers),
        final_kl=None if per is None else [float(x) for x in np.asarray(per)],
        examples=len(tokens),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary | {"heads": heads}


def load_exit_heads(out_dir, cfg: ModelConfig, fingerprint: str = "") -> tuple[dict, tuple[int, ...]]:
    """The trained heads of `train_exit_heads` (its latest checkpoint) and their exit layers."""
    from m2r2_jax.cli import read_json
    from m2r2_jax.training.checkpoint import Checkpointer, latest_step

    out = Path(out_dir)
    last = latest_step(out / "checkpoints")
    if last is None:
        raise M2R2Error(f"no exit-head checkpoint under {out / 'checkpoints'}")
    meta = read_json(out / "checkpoints" / str(last) / "meta" / "metadata")
    if not isinstance(meta, dict) or meta.get("kind") != "exit_heads" or not isinstance(meta.get("config"), dict):
        raise M2R2Error(f"{out}: not an exit-head checkpoint")
    if fingerprint and meta.get("base_fingerprint") and meta["base_fingerprint"] != fingerprint:
        raise M2R2Error(f"{out}: exit heads trained on another base model (fingerprint differs)")
    hc = ExitHeadConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()})
    abstract = init_heads(cfg, len(hc.layers), hc.rank)
    ck = Checkpointer(out / "checkpoints", async_save=False)
    heads, _, _, _ = ck.restore(last, abstract, optimizer(hc).init(abstract), {"seconds": np.float64(0)})
    ck.close()
    return heads, hc.layers
