"""A sparse MoE from a dense model, layer by layer: split, route and retrain each layer's experts on the
inputs the MoE model itself produces (`retrain`; the pieces: training/moefy.py for the split and the
router, training/moe_experts.py for the expert fit).

The residual stream of the distilled sequences (prompt + answer, every real position) is carried
through the model one layer at a time, starting from the embeddings. At layer l:
  1. run the dense layer on the MoE stream: its FFN input x, the dense FFN's output y, the residual
     after attention a (so the dense layer's output is a + y)
  2. split the FFN into E experts by co-activation on x (moefy.balanced_kmeans), refined for top-k
     routing (moefy.refine_partition), and fit a router to the experts' output shares
     (moefy.train_routers)
  3. fit the experts to a target t on x (moe_experts.train_layer: the closed-form down projections,
     full or their best rank-r change; optionally Adam steps on the experts and the router after it):
       "dense_ffn"  t = y: the dense FFN on the MoE model's own inputs
       "residual"   t = h_dense[l+1] - a: what the layer must add for the MoE stream to rejoin the dense
                    model's stream, so a layer also corrects what the layers before it got wrong
  4. round the fit to the asset's storage dtype and advance the stream with it: h[l+1] = a + MoE_l(x)
Every finished layer is an Orbax checkpoint (DIR/layers, step l + 1, float32); a rerun resumes after
the last one (the stream is recomputed through the finished layers). Held-out records (whole sequences)
give each layer's relative error before and after the fit; they are never fitted.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from m2r2_jax.config import ModelConfig, replace
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import STORE_DTYPES, WEIGHTS, apply_experts, expert_weights
from m2r2_jax.training import moe_experts as X
from m2r2_jax.training import moefy as M

TARGETS = ("dense_ffn", "residual")


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    experts: int = 16
    top_k: int = 4
    records: int = 256  # distilled records carried through the model (the first of the shuffled shards)
    held_out: int = 32  # the last of them: per-layer held-out error, never fitted
    tokens_per_layer: int = 65536  # training positions drawn per layer, at most (prompt and answer positions)
    target: str = "residual"
    rank: int = 128  # 0: full down projections; r > 0: rank-r deltas on the split (moe_experts.LayerFit)
    store_dtype: str = "float16"  # how the asset stores the expert tensors (the stream uses that)
    cluster_tokens: int = 8192
    cluster_iters: int = 12
    partition_iters: int = 10  # moefy.refine_partition after the co-activation clusters (0: off)
    router_steps: int = 300
    ridge: float = 1e-2
    steps: int = 0  # Adam steps per layer after the closed-form down projections
    batch: int = 1024
    lr: float = 3e-4
    router_lr: float = 1e-3
    balance: float = 0.01
    shards: int = 2
    batch_seqs: int = 16
    seed: int = 0

    def validate(self, cfg: ModelConfig) -> RetrainConfig:
        F = cfg.intermediate_size
        if self.experts < 2 or F % self.experts:
            raise M2R2Error(f"--experts {self.experts}: expected >= 2 dividing the {F} FFN neurons")
        if cfg.residual_multiplier != 1.0 or cfg.mlp_type != "dense":
            raise M2R2Error("MoE retraining needs a dense model with plain residual updates")
        if self.rank > cfg.hidden_size:
            raise M2R2Error(f"--rank {self.rank}: expected <= the hidden size {cfg.hidden_size}")
        return self.check()

    def check(self) -> RetrainConfig:
        """The checks that need no model."""
        if not 1 <= self.top_k <= self.experts:
            raise M2R2Error(f"--top-k {self.top_k}: expected 1 <= top_k <= experts={self.experts}")
        if self.target not in TARGETS:
            raise M2R2Error(f"--target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.store_dtype not in STORE_DTYPES:
            raise M2R2Error(f"--store-dtype {self.store_dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
        if not 0 < self.held_out < self.records:
            raise M2R2Error(f"held_out={self.held_out}, records={self.records}: expected 0 < held_out < records")
        for k in ("tokens_per_layer", "cluster_tokens", "cluster_iters", "router_steps", "batch", "shards"):
            if getattr(self, k) < 1:
                raise M2R2Error(f"{k}={getattr(self, k)}: expected >= 1")
        if self.partition_iters < 0 or self.steps < 0 or self.rank < 0:
            raise M2R2Error(
                f"partition_iters / steps / rank: expected >= 0, "
                f"got {self.partition_iters} / {self.steps} / {self.rank}"
            )
        if self.cluster_tokens > self.tokens_per_layer:
            raise M2R2Error(f"cluster_tokens={self.cluster_tokens} > tokens_per_layer={self.tokens_per_layer}")
        self.layer_fit().validate(self.experts)
        return self

    def layer_fit(self) -> X.LayerFit:
        return X.LayerFit(
            top_k=self.top_k,
            rank=self.rank,
            ridge=self.ridge,
            steps=self.steps,
            batch=self.batch,
            lr=self.lr,
            router_lr=self.router_lr,
            balance=self.balance,
            seed=self.seed,
        )


# ----------------------------------------------------------------------------- the stream


def bucket_batches(records, batch_seqs: int, max_len: int) -> list[dict]:
    """Records -> batches of similar length: {tokens [B, T] int32, real [B, T] bool}, T a multiple of 64
    (few shapes, few compiles); the last batch is padded with empty rows (real all False)."""
    from m2r2_jax.data.batches import pack_examples

    order = sorted(range(len(records)), key=lambda i: len(records[i]["prompt_ids"]) + len(records[i]["answer_ids"]))
    out = []
    for b in range(0, len(order), batch_seqs):
        chunk = [records[i] for i in order[b : b + batch_seqs]]
        longest = max(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in chunk)
        T = min(-(-longest // 64) * 64, max_len)
        toks, mask = pack_examples(chunk, T, loss_on_prompt=True)
        pad = batch_seqs - len(chunk)
        toks = np.concatenate([toks, np.zeros((pad, T), np.int32)])
        real = np.concatenate([mask, np.zeros((pad, T), np.float32)]) > 0
        out.append({"tokens": toks, "real": real})
    return out


def _one_layer(cfg: ModelConfig, params: dict, layer: int) -> tuple[ModelConfig, dict]:
    """A one-layer model holding `layer` (the embedding and head kept: the module declares them)."""
    return replace(cfg, num_layers=1), {**params, "layers": [params["layers"][layer]]}


@functools.partial(jax.jit, static_argnames="cfg1")
def _dense_parts(cfg1, params1, tokens, h):
    """One dense layer on h [B, T, D] -> (FFN input x, FFN output y, residual after attention a)."""
    from m2r2_jax.model import decoder as D
    from m2r2_jax.model.mlp import DenseMLP

    seen = []

    def grab(f, args, kwargs, ctx):
        out = f(*args, **kwargs)
        if ctx.method_name == "__call__" and isinstance(ctx.module, DenseMLP) and ctx.module.name == "mlp":
            seen.append((args[0], out))
        return out

    B, T = tokens.shape
    one = D.init_cache(cfg1, B, T)
    with nn.intercept_methods(grab):
        out, _, _ = D.forward_hidden(cfg1, params1, tokens, one, jnp.zeros((B,), jnp.int32), h=h)
    x, y = seen[0]
    return x, y, out - y


@functools.partial(jax.jit, static_argnames="k")
def _moe_out(layer, x, k):
    B, T, Dm = x.shape
    y, _, _ = X.moe_forward(layer, x.reshape(-1, Dm), k, straight_through=False)
    return y.reshape(B, T, Dm)


def stored_form(layer: dict, dtype: str) -> dict:
    """A fitted layer as the asset will hold it: expert tensors (full weights or deltas) rounded to the
    storage dtype and back (the router stays float32)."""
    from m2r2_jax.loading.moefied import np_store_dtype

    return {
        n: v if n == "router" else np.asarray(v, np.float32).astype(np_store_dtype(dtype)).astype(np.float32)
        for n, v in layer.items()
    }


def moe_layer(split: dict, stored: dict) -> dict:
    """The split {gate, up, down} + a stored layer (router and full weights or deltas) -> {router, gate,
    up, down} (numpy float32), as loading/moefied.py builds it."""
    return {"router": np.asarray(stored["router"], np.float32), **apply_experts(split, stored)}


class Stream:
    """The residual streams of the bucketed sequences: the MoE model's (and, for the "residual" target,
    the dense model's), advanced one layer at a time."""

    def __init__(self, cfg, params, batches, dense_too: bool):
        from m2r2_jax.model import decoder as D

        emb = jax.jit(lambda p, t: D.embed(cfg, p, t))
        self.cfg, self.params, self.batches = cfg, params, batches
        self.h = [np.asarray(emb(params, jnp.asarray(b["tokens"]))) for b in batches]
        self.h_dense = [h.copy() for h in self.h] if dense_too else None

    def parts(self, layer: int, progress: bool = False):
        """-> per batch (x, y, a) of the dense layer on the MoE stream, and the dense stream's next h."""
        cfg1, p1 = _one_layer(self.cfg, self.params, layer)
        parts, nxt = [], []
        for i, b in enumerate(tqdm(self.batches, desc=f"layer {layer}", leave=False, disable=not progress)):
            tok = jnp.asarray(b["tokens"])
            parts.append(tuple(np.asarray(v) for v in _dense_parts(cfg1, p1, tok, jnp.asarray(self.h[i]))))
            if self.h_dense is not None:
                x, y, a = _dense_parts(cfg1, p1, tok, jnp.asarray(self.h_dense[i]))
                nxt.append(np.asarray(a + y))
        return parts, nxt

    def deviation(self, which) -> float:
        """||h - h_dense|| / ||h_dense|| over the real positions of the batches in `which`."""
        num = den = 0.0
        for i in which:
            r = self.batches[i]["real"]
            num += float(np.sum((self.h[i][r] - self.h_dense[i][r]) ** 2))
            den += float(np.sum(self.h_dense[i][r] ** 2))
        return float(np.sqrt(num / max(den, 1e-12)))

    def state(self) -> dict:
        return {"h": list(self.h), **({"h_dense": list(self.h_dense)} if self.h_dense is not None else {})}

    def load(self, state: dict) -> None:
        h = [np.asarray(v, np.float32) for v in state["h"]]
        hd = [np.asarray(v, np.float32) for v in state["h_dense"]] if self.h_dense is not None else None
        if [v.shape for v in h] != [v.shape for v in self.h] or (hd is not None and len(hd) != len(h)):
            raise M2R2Error("the saved stream does not fit these batches: delete DIR/stream and rerun")
        self.h, self.h_dense = h, hd

    def advance(self, parts, moe: dict, k: int, nxt) -> None:
        lay = jax.tree.map(jnp.asarray, moe)
        for i, (x, _, a) in enumerate(parts):
            self.h[i] = a + np.asarray(_moe_out(lay, jnp.asarray(x), k))
        if self.h_dense is not None:
            self.h_dense = nxt


def _flat(parts, targets, batches, which):
    """Real positions of the batches in `which`: x [N, D], t [N, D]."""
    xs, ts = [], []
    for i in which:
        r = batches[i]["real"]
        xs.append(parts[i][0][r])
        ts.append(targets[i][r])
    return np.concatenate(xs), np.concatenate(ts)


# ----------------------------------------------------------------------------- one layer


def split_and_route(x, gate, up, down, c: RetrainConfig, layer: int):
    """Step 2: the split of one layer (co-activation clusters refined for top-k routing) and its router
    fitted to the experts' output shares."""
    E = c.experts
    xc = x[: c.cluster_tokens]
    assign = M.balanced_kmeans(M.neuron_profiles(xc, gate, up), E, c.cluster_iters, c.seed + layer)
    if c.partition_iters:
        assign = M.refine_partition(M.contribution_mass(xc, gate, up, down), assign, E, c.top_k, c.partition_iters)
    perm = M.assignment_perm(assign, E)
    g, u, d = (jnp.asarray(v) for v in expert_weights(gate, up, down, perm, E))
    _, norm = M.expert_scores(x, g, u, d)
    router, _ = M.train_routers(
        x[None], M.shares(norm)[None].astype(np.float32), c.router_steps, 2048, 3e-3, c.seed, progress=False
    )
    return perm, {"router": router[0], "gate": np.asarray(g), "up": np.asarray(u), "down": np.asarray(d)}


def fit_layer(stream: Stream, layer: int, c: RetrainConfig, train_idx, held_idx, progress: bool):
    """Steps 1-4 for one layer -> (perm [F], the fitted layer (float32: router + the tensors the asset
    stores), metrics). The stream advances with the fitted layer rounded to the storage dtype."""
    t0 = time.perf_counter()
    parts, nxt = stream.parts(layer, progress)
    if c.target == "residual":
        targets = [n - a for n, (_, _, a) in zip(nxt, parts)]
    else:
        targets = [y for _, y, _ in parts]
    x, t = _flat(parts, targets, stream.batches, train_idx)
    xh, th = _flat(parts, targets, stream.batches, held_idx)
    _, yh = _flat(parts, [y for _, y, _ in parts], stream.batches, held_idx)
    rng = np.random.default_rng(c.seed + layer)
    pick = rng.permutation(len(x))[: c.tokens_per_layer]
    x, t = x[pick], t[pick]
    m = stream.params["layers"][layer]["mlp"]
    gate, up, down = (np.asarray(m[n], np.float32) for n in WEIGHTS)
    perm, split = split_and_route(x, gate, up, down, c, layer)
    before = X.evaluate(split, xh, th, c.top_k)["rel_err"]
    fitted, _ = X.train_layer(split, x, t, c.layer_fit())
    moe = moe_layer(split, stored_form(fitted, c.store_dtype))
    ev = X.evaluate(moe, xh, th, c.top_k)
    metrics = {
        "held_out_rel_err_split": before,
        "held_out_rel_err": ev["rel_err"],
        "held_out_rel_err_vs_dense_ffn": X.evaluate(moe, xh, yh, c.top_k)["rel_err"],
        "train_rel_err": X.evaluate(moe, x[:4096], t[:4096], c.top_k)["rel_err"],
        "max_expert_load": float(ev["load"].max()),
        "min_expert_load": float(ev["load"].min()),
        "seconds": time.perf_counter() - t0,
    }
    stream.advance(parts, moe, c.top_k, nxt)
    if stream.h_dense is not None:  # how far the MoE stream is from the dense one after this layer
        metrics["held_out_stream_rel_err"] = stream.deviation(held_idx)
    return perm, fitted, metrics


# ----------------------------------------------------------------------------- the whole run


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def _config_record(c: RetrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(c)))


def retrain(
    cfg, params, records, c: RetrainConfig, out_dir, base: dict, progress: bool = True, max_minutes: float | None = None
) -> dict:
    """Every layer in order (module doc), resumable; writes DIR/asset (format m2r2-moefied/2, experts in
    c.store_dtype; also DIR/asset_float32 when that is narrower: the same fit unrounded, to measure what
    the rounding costs), DIR/metrics.jsonl (per layer, step = layer + 1) and DIR/summary.json.
    `max_minutes`: stop after the first layer that ends past it (the next call resumes there); no asset
    is written until every layer is done. -> the summary ({"finished": False, ...} when stopped early)."""
    from m2r2_jax.loading.moefied import save_moe_asset
    from m2r2_jax.orbax_paths import ckpt_path
    from m2r2_jax.training.metrics import Tracker

    c = c.validate(cfg)
    if len(records) < c.records:
        raise M2R2Error(f"{len(records)} distilled records, fewer than records={c.records}")
    out = Path(out_dir)
    ocp = _ocp()
    mngr = ocp.CheckpointManager(ckpt_path(out / "layers"), options=ocp.CheckpointManagerOptions(create=True))
    record = {"config": _config_record(c), "base_fingerprint": base.get("fingerprint")}
    done = sorted(mngr.all_steps())
    perms, layers, per_layer = [], [], []
    for s in done:
        meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if {k: meta.get(k) for k in record} != record:
            raise M2R2Error(f"{out / 'layers'} holds layers of another run (config or base differs): use a new --out")
        item = mngr.restore(s, args=ocp.args.Composite(layer=ocp.args.StandardRestore())).layer
        perms.append(np.asarray(item.pop("perm")))
        layers.append({n: np.asarray(v) for n, v in item.items()})
        per_layer.append(meta["metrics"])
    if done != list(range(1, len(done) + 1)):
        raise M2R2Error(f"{out / 'layers'}: finished layers {done} are not 1..n")
    recs = records[: c.records]
    batches = bucket_batches(recs[: -c.held_out], c.batch_seqs, cfg.max_position_embeddings)
    n_train = len(batches)
    batches += bucket_batches(recs[-c.held_out :], c.batch_seqs, cfg.max_position_embeddings)
    train_idx, held_idx = range(n_train), range(n_train, len(batches))
    stream = Stream(cfg, params, batches, dense_too=c.target == "residual")
    smngr = ocp.CheckpointManager(
        ckpt_path(out / "stream"), options=ocp.CheckpointManagerOptions(create=True, max_to_keep=1)
    )
    if layers and smngr.latest_step() == len(layers):  # saved by the call that stopped here
        stream.load(smngr.restore(len(layers), args=ocp.args.Composite(s=ocp.args.StandardRestore())).s)
        layers_to_run = []
    else:
        layers_to_run = layers
    for i, lay in enumerate(layers_to_run):  # resume: the stream through the finished layers
        parts, nxt = stream.parts(i)
        m = params["layers"][i]["mlp"]
        split = dict(zip(WEIGHTS, expert_weights(m["gate"], m["up"], m["down"], perms[i], c.experts)))
        stream.advance(parts, moe_layer(split, stored_form(lay, c.store_dtype)), c.top_k, nxt)
    tr = Tracker(out, resume_step=len(done))
    t0 = time.perf_counter()
    for i in tqdm(range(len(done), cfg.num_layers), desc="layers", disable=not progress, initial=len(done)):
        perm, stored, metrics = fit_layer(stream, i, c, train_idx, held_idx, progress)
        tr.log(i + 1, metrics)
        mngr.save(
            i + 1,
            args=ocp.args.Composite(
                layer=ocp.args.StandardSave({"perm": perm, **stored}),
                meta=ocp.args.JsonSave({**record, "metrics": metrics}),
            ),
        )
        mngr.wait_until_finished()
        perms.append(perm)
        layers.append(stored)
        per_layer.append(metrics)
        if max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes and i + 1 < cfg.num_layers:
            # the stream after the finished layers, so the next call need not recompute them
            smngr.save(len(layers), args=ocp.args.Composite(s=ocp.args.StandardSave(stream.state())))
            smngr.wait_until_finished()
            break
    mngr.close()
    smngr.close()
    tr.close()
    if len(layers) < cfg.num_layers:
        return {
            "finished": False,
            "layers_done": len(layers),
            "minutes_this_call": round((time.perf_counter() - t0) / 60, 1),
        }
    names = [n for n in layers[0] if n != "router"]
    experts = {n: np.stack([lay[n] for lay in layers]) for n in names}
    mean = {k: float(np.mean([m[k] for m in per_layer if k in m])) for k in per_layer[-1]}
    summary = {
        "finished": True,
        "config": _config_record(c),
        "base": base,
        "records": {"train": c.records - c.held_out, "held_out": c.held_out},
        "ffn_fraction_per_token": c.top_k / c.experts,
        "held_out_mean": mean,
        "held_out_stream_rel_err_last_layer": per_layer[-1].get("held_out_stream_rel_err"),
        "layers": per_layer,
        "minutes": round(sum(m["seconds"] for m in per_layer) / 60, 1),
        "minutes_this_call": round((time.perf_counter() - t0) / 60, 1),
    }
    meta = {
        "base": base,
        "experts": c.experts,
        "top_k": c.top_k,
        "dense_layers": [],
        "build": {"retrain": _config_record(c)},
        "held_out_mean": mean,
    }
    routers = np.stack([lay["router"] for lay in layers])
    save_moe_asset(out / "asset", np.stack(perms), routers, meta, experts, c.store_dtype)
    if c.store_dtype != "float32":
        save_moe_asset(out / "asset_float32", np.stack(perms), routers, meta, experts, "float32")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
