"""MoEfication of a dense SwiGLU model (the idea of Zhang et al. 2022, "MoEfication: Transformer
Feed-forward Layers are Mixtures of Experts"): each layer's FFN neurons are split into E equal experts
and a router per layer learns which experts carry a token's activation; the result is the small asset
of loading/moefied.py (a neuron permutation and a router per layer; the base weights are never written).

`build` runs, on the base's own distilled answers (training prompts only):
  1. collect   every layer's MLP input x at the positions that predict answer tokens (teacher-forced)
  2. cluster   per layer, the neurons' |act| profiles over `cluster_tokens` tokens (act = silu(x gate) *
               (x up)): spherical balanced k-means (`balanced_kmeans`)
  3. targets   per token, each expert's share of the FFN output: its |act| mass ("act_mass") or the
               L2 norm of its down-projected output ("out_norm")
  4. routers   a linear router [D, E] per layer (all layers in one vmapped optax loop), cross-entropy
               against the target shares, so the softmax ranks experts by what they contribute
  5. evaluate  on held-out records: recall of the true top-k experts, |act| mass the router's top-k
               captures, and the relative FFN output error of the routed MoE against the dense FFN
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
import optax
from tqdm.auto import tqdm

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import expert_weights

TARGETS = ("act_mass", "out_norm")


@dataclasses.dataclass(frozen=True)
class MoefyConfig:
    experts: int = 8
    top_k: int = 2  # the asset's default experts per token (the routers do not depend on it)
    tokens: int = 16384  # answer-token positions collected, held-out ones included
    held_out: int = 2048  # the last of them (whole records): recall / error, never fitted
    cluster_tokens: int = 4096  # training tokens whose activation profiles are clustered
    cluster_iters: int = 12
    target: str = "out_norm"
    steps: int = 400  # converged by ~200 on SmolLM2 (held-out recall flat from 200 to 1500 steps)
    batch: int = 2048
    lr: float = 3e-3
    shards: int = 2  # the distill cache's first shards, the only ones read
    batch_seqs: int = 8  # sequences per collection forward
    seed: int = 0

    def validate(self, cfg: ModelConfig) -> MoefyConfig:
        F = cfg.intermediate_size
        if self.experts < 2 or F % self.experts:
            raise M2R2Error(f"--experts {self.experts}: expected >= 2 dividing the {F} FFN neurons")
        if not 1 <= self.top_k <= self.experts:
            raise M2R2Error(f"--top-k {self.top_k}: expected 1 <= top_k <= experts={self.experts}")
        if self.target not in TARGETS:
            raise M2R2Error(f"target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if not 0 < self.held_out < self.tokens or not 0 < self.cluster_tokens <= self.tokens - self.held_out:
            raise M2R2Error(
                f"tokens={self.tokens}, held_out={self.held_out}, cluster_tokens={self.cluster_tokens}: "
                "expected 0 < held_out < tokens and 0 < cluster_tokens <= tokens - held_out"
            )
        for k in ("steps", "batch", "cluster_iters", "shards", "batch_seqs"):
            if getattr(self, k) < 1:
                raise M2R2Error(f"{k}={getattr(self, k)}: expected >= 1")
        return self


# ----------------------------------------------------------------------------- 1. collect


def distilled_records(distill_dir, shards: int, seed: int = 0) -> list[dict]:
    """The records of the cache's first `shards` shards, shuffled (the cache is sorted by prompt length)."""
    from m2r2_jax.training.distill import load_distill_cache, read_manifest

    man = read_manifest(distill_dir)
    if man is None:
        raise M2R2Error(f"no distill cache at {distill_dir}")
    n = sum(s["rows"] for s in man.get("shards", [])[:shards])
    ds = load_distill_cache(distill_dir).select(range(n))
    rows = [{"prompt_ids": r["prompt_ids"], "answer_ids": r["answer_ids"]} for r in ds if r["answer_ids"]]
    return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]


@functools.partial(jax.jit, static_argnames="cfg")
def _mlp_inputs(cfg: ModelConfig, params, tokens):
    """tokens [B, T] -> every layer's MLP input [L, B, T, D], captured by intercepting the MLP calls."""
    from m2r2_jax.model import decoder as D
    from m2r2_jax.model.mlp import DenseMLP

    seen = []

    def grab(f, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, DenseMLP) and ctx.module.name == "mlp":
            seen.append(args[0])
        return f(*args, **kwargs)

    B, T = tokens.shape
    with nn.intercept_methods(grab):
        D.forward_hidden(cfg, params, tokens, D.init_cache(cfg, B, T), jnp.zeros((B,), jnp.int32))
    return jnp.stack(seen)


def collect_mlp_inputs(cfg, params, records, n_tokens: int, batch_seqs: int = 8, progress: bool = True):
    """-> (x [L, n_tokens, D] float32 at the positions predicting answer tokens, the record index of each
    token [n_tokens]), in record order: the tokens of a record are contiguous (the last one may be cut)."""
    from m2r2_jax.data.batches import pack_examples

    xs, owner, n = [], [], 0
    bar = tqdm(total=n_tokens, unit="tok", desc="collect", disable=not progress)
    for b in range(0, len(records), batch_seqs):
        chunk = records[b : b + batch_seqs]
        longest = max(len(r["prompt_ids"]) + len(r["answer_ids"]) for r in chunk)
        T = min(-(-longest // 64) * 64, cfg.max_position_embeddings)  # few buckets, few compiles
        toks, mask = pack_examples(chunk + [chunk[-1]] * (batch_seqs - len(chunk)), T)
        sel = np.zeros_like(mask, bool)
        sel[:, :-1] = mask[:, 1:] > 0  # position t predicts token t + 1
        sel[len(chunk) :] = False
        x = np.asarray(_mlp_inputs(cfg, params, jnp.asarray(toks)), np.float32)  # [L, B, T, D]
        rows, cols = np.nonzero(sel)
        xs.append(x[:, rows, cols])
        owner.append(b + rows)
        n += len(rows)
        bar.update(len(rows))
        if n >= n_tokens:
            break
    bar.close()
    x, owner = np.concatenate(xs, 1)[:, :n_tokens], np.concatenate(owner)[:n_tokens]
    if x.shape[1] < n_tokens:
        raise M2R2Error(f"only {x.shape[1]} distilled answer tokens, fewer than {n_tokens}: use more shards")
    return x, owner


# ----------------------------------------------------------------------------- 2. cluster


@jax.jit
def _act(x, gate, up):
    return jax.nn.silu(x @ gate) * (x @ up)


def neuron_profiles(x, gate, up) -> np.ndarray:
    """Per neuron its |act| over the tokens [F, N], each token first scaled to mean 1 (so a few
    high-norm tokens do not decide the clustering), then each neuron's row to unit length (co-activation
    pattern, not magnitude: the router picks by magnitude, per token)."""
    a = np.abs(np.asarray(_act(jnp.asarray(x), jnp.asarray(gate), jnp.asarray(up))))  # [N, F]
    a = a / (a.mean(1, keepdims=True) + 1e-9)
    p = a.T
    return p / (np.linalg.norm(p, axis=1, keepdims=True) + 1e-9)


def balanced_assign(score: np.ndarray) -> np.ndarray:
    """score [F, E] (higher = better) -> the assignment [F] maximising the total score with exactly F/E
    neurons per expert: a min-cost matching of the neurons to E x F/E slots (each expert's column
    repeated F/E times), solved exactly by scipy's linear_sum_assignment (0.2 s at F=1536)."""
    from scipy.optimize import linear_sum_assignment

    F, E = score.shape
    rows, slots = linear_sum_assignment(-np.repeat(score, F // E, axis=1))
    out = np.empty(F, np.int64)
    out[rows] = slots // (F // E)
    return out


def balanced_kmeans(profiles: np.ndarray, experts: int, iters: int = 12, seed: int = 0) -> np.ndarray:
    """Spherical balanced k-means of unit rows [F, M] into `experts` clusters of exactly F/E rows.

    Balanced because the [expert, ...] layout needs equal experts; spherical (cosine) because the rows
    are co-activation patterns. Seeded by k-means++ over cosine distance, then alternating the exact
    balanced assignment (`balanced_assign`) with centroid = normalised mean, until nothing moves."""
    rng = np.random.default_rng(seed)
    F = profiles.shape[0]
    cent = [profiles[rng.integers(F)]]
    for _ in range(1, experts):
        d = np.maximum(1.0 - np.max(profiles @ np.stack(cent).T, 1), 0.0)
        cent.append(profiles[rng.choice(F, p=d / d.sum())])
    cent = np.stack(cent)
    assign = None
    for _ in range(iters):
        new = balanced_assign(profiles @ cent.T)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        cent = np.stack([profiles[assign == e].mean(0) for e in range(experts)])
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-9
    return assign


def contribution_mass(x, gate, up, down) -> np.ndarray:
    """Per token its neurons' share of the FFN output [N, F]: |act_j| * ||down_j||, summing to 1 per
    token (every token counts the same)."""
    a = np.abs(np.asarray(_act(jnp.asarray(x), jnp.asarray(gate), jnp.asarray(up)))) * np.linalg.norm(down, axis=1)
    return a / (a.sum(1, keepdims=True) + 1e-12)


def refine_partition(mass: np.ndarray, assign: np.ndarray, experts: int, top_k: int, iters: int = 10) -> np.ndarray:
    """Improve a balanced partition for top-k routing: alternately (1) each token picks the k experts
    holding most of its contribution mass (`contribution_mass`), (2) each neuron moves to the expert in
    whose picks it carries most mass, under the equal-size constraint (`balanced_assign`), until
    nothing moves. Co-activation clusters are a good start but not what routing needs: measured on
    SmolLM2 layers 14 / 26 (8 experts, top-2), the best 2 experts' FFN error falls from 0.74 / 0.66
    with the clusters to 0.68 / 0.61 (a static 25% of the neurons: 0.70 / 0.67; the best 25% of the
    neurons per token, no experts: 0.31 / 0.21)."""
    for _ in range(iters):
        em = np.stack([mass[:, assign == e].sum(1) for e in range(experts)], 1)  # [N, E]
        pick = np.zeros_like(em)
        np.put_along_axis(pick, np.argpartition(-em, top_k - 1, axis=1)[:, :top_k], 1.0, 1)
        new = balanced_assign((pick.T @ mass).T)  # [F, E]: neuron j's mass captured in expert e
        if np.array_equal(new, assign):
            break
        assign = new
    return assign


def assignment_perm(assign: np.ndarray, experts: int) -> np.ndarray:
    """cluster id per neuron [F] -> the permutation [F]: expert 0's neurons (ascending), then expert 1's, ..."""
    counts = np.bincount(assign, minlength=experts)
    if len(set(counts.tolist())) != 1:
        raise M2R2Error(f"unbalanced expert assignment: sizes {counts.tolist()}")
    return np.argsort(assign, kind="stable").astype(np.int32)


# ----------------------------------------------------------------------------- 3. targets


@jax.jit
def _expert_stats(x, g, u, d):
    """x [N, D]; experts g / u [E, D, Fe], d [E, Fe, D] -> (|act| mass [N, E], outputs [N, E, D])."""
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, g)) * jnp.einsum("nd,edf->nef", x, u)
    return jnp.sum(jnp.abs(h), -1), jnp.einsum("nef,efd->ned", h, d)


def expert_scores(x, g, u, d, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """-> (|act| mass [N, E], output norm [N, E]) per token and expert."""
    mass, norm = [], []
    for i in range(0, len(x), chunk):
        m, y = _expert_stats(jnp.asarray(x[i : i + chunk]), g, u, d)
        mass.append(np.asarray(m))
        norm.append(np.asarray(jnp.linalg.norm(y, axis=-1)))
    return np.concatenate(mass), np.concatenate(norm)


def shares(scores: np.ndarray) -> np.ndarray:
    return scores / (scores.sum(-1, keepdims=True) + 1e-9)


# ----------------------------------------------------------------------------- 4. routers


def router_loss(w, x, t):
    """Cross-entropy of softmax(x w) against the target shares t; x [N, D], t [N, E]."""
    return -jnp.mean(jnp.sum(t * jax.nn.log_softmax(x @ w, -1), -1))


@functools.cache
def _router_opt(steps: int, lr: float):
    return optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _router_step(steps: int, lr: float, w, state, xb, tb):
    """One Adam step of every layer's router (module-level: compiled once per shape, not per call)."""
    (_, losses), g = jax.value_and_grad(lambda w: (jnp.sum(ls := jax.vmap(router_loss)(w, xb, tb)), ls), has_aux=True)(
        w
    )
    upd, state = _router_opt(steps, lr).update(g, state, w)
    return optax.apply_updates(w, upd), state, losses


@jax.jit
def _take(a, i):
    return jnp.take(a, i, axis=1)


def train_routers(x, t, steps: int, batch: int, lr: float, seed: int = 0, log=None, progress: bool = True):
    """x [L, N, D], t [L, N, E] -> routers [L, D, E] (one per layer, trained together: vmapped loss),
    the per-step mean loss. `log(step, metrics)` receives the loss per layer every 50 steps."""
    L, N, D = x.shape
    w = jnp.zeros((L, D, t.shape[-1]), jnp.float32)  # zero: every expert equally likely at the start
    state = _router_opt(steps, lr).init(w)
    xs, ts = jnp.asarray(x), jnp.asarray(t)
    rng = np.random.default_rng(seed)
    history = []
    for s in tqdm(range(steps), desc="routers", disable=not progress):
        idx = jnp.asarray(rng.integers(0, N, min(batch, N)))
        w, state, losses = _router_step(steps, lr, w, state, _take(xs, idx), _take(ts, idx))
        if s % 50 == 0 or s == steps - 1:
            lo = np.asarray(losses)
            history.append((s, float(lo.mean())))
            if log is not None:
                log(s, {"loss": lo.mean(), "loss_layer": lo})
    return np.asarray(w), history


# ----------------------------------------------------------------------------- 5. evaluate


def _topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    idx = np.argpartition(-scores, k - 1, axis=-1)[..., :k]
    m = np.zeros(scores.shape, bool)
    np.put_along_axis(m, idx, True, -1)
    return m


def layer_metrics(x, g, u, d, router, k: int) -> dict:
    """Held-out metrics of one layer at top-k: the router's recall of the top-k by each target, the
    |act| mass it captures (and the oracle's), and the FFN output error ||y - y_k|| / ||y|| (router
    and the best-k-by-output-norm oracle)."""
    mass, norm = expert_scores(x, g, u, d)
    pick = _topk_mask(np.asarray(x) @ router, k)
    out = {}
    for name, s in (("act_mass", mass), ("out_norm", norm)):
        out[f"recall_{name}"] = float((pick & _topk_mask(s, k)).sum() / pick.sum())
    sm = shares(mass)
    out["mass_captured"] = float((sm * pick).sum(-1).mean())
    out["mass_captured_oracle"] = float((sm * _topk_mask(mass, k)).sum(-1).mean())
    for name, m in (("router", pick), ("oracle", _topk_mask(norm, k))):
        num = den = 0.0
        for i in range(0, len(x), 2048):
            _, y = _expert_stats(jnp.asarray(x[i : i + 2048]), g, u, d)
            full = jnp.sum(y, 1)
            num += float(jnp.sum((full - jnp.einsum("ned,ne->nd", y, m[i : i + 2048])) ** 2))
            den += float(jnp.sum(full**2))
        out[f"ffn_rel_err_{name}"] = float(np.sqrt(num / den))
    return out


# ----------------------------------------------------------------------------- the whole build


def split_held_out(owner: np.ndarray, held_out: int) -> int:
    """The number of training tokens: the held-out ones are whole records at the end."""
    return int(np.searchsorted(owner, owner[-held_out]))


def fit(cfg: ModelConfig, params, x, n_train: int, c: MoefyConfig, log=None, progress: bool = True):
    """Steps 2-5 on collected inputs x [L, N, D] (the first n_train tokens train, the rest are held out).
    -> (perm [L, F] int32, routers [L, D, E], per-layer held-out metrics, the router loss history)."""
    if n_train < c.cluster_tokens:
        raise M2R2Error(f"{n_train} training tokens before the held-out records: fewer than cluster_tokens")
    E = c.experts
    perms, targets = [], []
    for i in tqdm(range(cfg.num_layers), desc="cluster", disable=not progress):
        m = params["layers"][i]["mlp"]
        gate, up, down = (np.asarray(m[n], np.float32) for n in ("gate", "up", "down"))
        assign = balanced_kmeans(neuron_profiles(x[i, : c.cluster_tokens], gate, up), E, c.cluster_iters, c.seed + i)
        perms.append(assignment_perm(assign, E))
        g, u, d = (jnp.asarray(a) for a in expert_weights(gate, up, down, perms[-1], E))
        mass, norm = expert_scores(x[i, :n_train], g, u, d)
        targets.append(shares(mass if c.target == "act_mass" else norm).astype(np.float32))
    routers, history = train_routers(
        x[:, :n_train], np.stack(targets), c.steps, c.batch, c.lr, c.seed, log=log, progress=progress
    )
    del targets
    layers = []
    for i in range(cfg.num_layers):
        m = params["layers"][i]["mlp"]
        g, u, d = (jnp.asarray(a) for a in expert_weights(m["gate"], m["up"], m["down"], perms[i], E))
        layers.append({"layer": i, **layer_metrics(x[i, n_train:], g, u, d, routers[i], c.top_k)})
    return np.stack(perms), routers, layers, history


def build(cfg: ModelConfig, params, records, c: MoefyConfig, out_dir, base: dict, progress: bool = True) -> dict:
    """Steps 1-5 (module doc); writes `out_dir`/asset (loading/moefied.py), metrics.jsonl and
    summary.json. `base`: {"model", "fingerprint", "config"}, the identity the asset is tied to."""
    from m2r2_jax.loading.moefied import save_moe_asset
    from m2r2_jax.training.metrics import Tracker

    c = c.validate(cfg)
    out = Path(out_dir)
    t0 = time.perf_counter()
    tr = Tracker(out)
    x, owner = collect_mlp_inputs(cfg, params, records, c.tokens, c.batch_seqs, progress)
    n_train = split_held_out(owner, c.held_out)
    t_collect = time.perf_counter() - t0
    perms, routers, layers, history = fit(cfg, params, x, n_train, c, tr.log, progress)
    mean = {key: float(np.mean([r[key] for r in layers])) for key in layers[0] if key != "layer"}
    tr.log(c.steps, {f"held_out/{key}": v for key, v in mean.items()})
    tr.close()
    summary = {
        "config": dataclasses.asdict(c),
        "base": base,
        "tokens": {"train": n_train, "held_out": int(len(owner) - n_train), "clustered": c.cluster_tokens},
        "records": int(owner[-1] + 1),
        "ffn_fraction_per_token": c.top_k / c.experts,
        "final_loss": history[-1][1],
        "held_out_mean": mean,
        "layers": layers,
        "seconds": {"collect": round(t_collect, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    meta = {"base": base, "experts": c.experts, "top_k": c.top_k, "dense_layers": [], "build": dataclasses.asdict(c)}
    save_moe_asset(out / "asset", perms, routers, {**meta, "held_out_mean": mean})
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
