"""Retraining a MoEfied model's experts (training/moefy.py made the split and the routers; splitting alone
loses too much: a SiLU-gated FFN is not sparse, so k of E slices are far from the whole FFN).

One MoE layer here is a plain dict {router [D, E], gate / up [E, D, Fe], down [E, Fe, D]}, optionally with
low-rank deltas on the experts in the asset's layout (loading/moefied.py DELTA_EINSUM: {"down_a"
[E, Fe, r], "down_b" [r, D], ...}; `effective` adds a @ b to the dense split, which stays frozen). Its
forward is the model's own (model/moe.py: top-k of the router logits, every chosen expert counted with
weight 1, the "topk_unit" router) with one change for training: a chosen expert's weight is
p / stop_gradient(p), exactly 1 forward, so the router's logits receive the gradient of the loss
through each chosen expert's contribution (p = the router's softmax probability).

Pieces used by `train.moefy --retrain` (training/moe_retrain.py runs them layer by layer):
  moe_forward     the routed MoE FFN (+ router probs, the chosen experts)
  refit_down      closed-form (ridge, optionally reduced-rank) least squares for the experts' down
                  projections under a fixed routing
  train_layer     the closed form, then optionally Adam on ||MoE(x) - t||^2 / ||t||^2 (+ a Switch-style
                  load-balance term) over every expert weight or delta and the router
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import DELTA_EINSUM
from m2r2_jax.model.moe import dense_experts

WEIGHTS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class LayerFit:
    """How one layer is fitted (training/moe_retrain.py applies it to every layer)."""

    top_k: int = 2
    rank: int = 0  # 0: new full weights; r > 0: rank-r deltas on the split (DELTA_EINSUM), the split frozen
    refit_down: bool = True  # first the closed-form down projections (rank r: their best rank-r change)
    ridge: float = 1e-2  # refit_down's ridge, relative to the Gram matrix's mean diagonal
    steps: int = 0  # then Adam steps on every expert weight (or every delta) and the router
    batch: int = 1024
    lr: float = 3e-4  # full weights; deltas use lr * `delta_lr_scale`
    delta_lr_scale: float = 10.0
    router_lr: float = 1e-3
    balance: float = 0.01  # Switch load-balance coefficient (E * sum_e f_e P_e, 1 when uniform)
    seed: int = 0

    def validate(self, experts: int) -> LayerFit:
        if not 1 <= self.top_k <= experts:
            raise M2R2Error(f"top_k={self.top_k}: expected 1 <= top_k <= experts={experts}")
        if self.rank < 0 or self.steps < 0 or self.batch < 1:
            raise M2R2Error(f"rank={self.rank}, steps={self.steps}, batch={self.batch}: expected >= 0, >= 0, >= 1")
        for k in ("lr", "router_lr", "delta_lr_scale", "ridge"):
            if not np.isfinite(getattr(self, k)) or getattr(self, k) <= 0:
                raise M2R2Error(f"{k}={getattr(self, k)}: expected a finite number > 0")
        if not np.isfinite(self.balance) or self.balance < 0:
            raise M2R2Error(f"balance={self.balance}: expected a finite number >= 0")
        return self


def effective(layer: dict) -> dict:
    """A layer with deltas -> plain {router, gate, up, down}: each expert weight plus its a @ b."""
    out = {"router": layer["router"]}
    for n in WEIGHTS:
        w = layer[n]
        if f"{n}_a" in layer:
            w = w + jnp.einsum(DELTA_EINSUM[n], layer[f"{n}_a"], layer[f"{n}_b"])
        out[n] = w
    return out


def moe_forward(layer: dict, x, k: int, straight_through: bool = True):
    """x [N, D] -> (y [N, D], router probs [N, E], chosen experts [N, k]). With `straight_through` the
    combine weights carry the router's gradient (module doc); their value is 1 either way."""
    p = effective(layer)
    logits = x @ p["router"]
    probs = jax.nn.softmax(logits, -1)
    _, ids = jax.lax.top_k(logits, k)
    w = jnp.take_along_axis(probs, ids, -1)
    w = w / jax.lax.stop_gradient(w) if straight_through else jnp.ones_like(w)
    return dense_experts(x, ids, w, p["gate"], p["up"], p["down"]), probs, ids


def balance_loss(probs, ids, experts: int):
    """Switch Transformer's load balance: E * sum_e (share of routed slots on e) * (mean prob of e)."""
    f = jnp.mean(jax.nn.one_hot(ids, experts).sum(1), 0) / ids.shape[-1]
    return experts * jnp.sum(f * jnp.mean(probs, 0))


def rel_err(y, t):
    return jnp.sum((y - t) ** 2) / jnp.maximum(jnp.sum(t**2), 1e-12)


# ----------------------------------------------------------------------------- closed form


@functools.partial(jax.jit, static_argnames="k")
def _down_stats(p, x, t, k):
    """Gram matrix and right-hand side of the down projections' least squares on one chunk."""
    logits = x @ p["router"]
    _, ids = jax.lax.top_k(logits, k)
    E, _, Fe = p["gate"].shape
    mask = jnp.zeros((x.shape[0], E), x.dtype).at[jnp.arange(x.shape[0])[:, None], ids].set(1.0)
    h = jax.nn.silu(jnp.einsum("nd,edf->nef", x, p["gate"])) * jnp.einsum("nd,edf->nef", x, p["up"])
    phi = (h * mask[:, :, None]).reshape(x.shape[0], E * Fe)
    return phi.T @ phi, phi.T @ t


def refit_down(layer: dict, x, t, k: int, ridge: float = 1e-2, rank: int = 0, chunk: int = 4096):
    """The down projections minimising sum_n ||sum_{e chosen} h_e(x_n) down_e - t_n||^2 with the routing
    and gate / up held fixed: a linear least squares in all experts' rows at once (the features of token
    n are its chosen experts' activations, zero elsewhere), solved from the normal equations with a
    ridge of `ridge` times the Gram matrix's mean diagonal that pulls toward the current weights.
    rank 0 -> the new down [E, Fe, D]; rank r -> the best rank-r change instead (reduced-rank
    regression: the change's fitted values projected onto their top r output directions), as the
    asset's delta factors (down_a [E, Fe, r], down_b [r, D])."""
    p = {n: jnp.asarray(layer[n]) for n in ("router", "gate", "up")}
    E, Fe, D = np.shape(layer["down"])
    G = np.zeros((E * Fe, E * Fe))
    R = np.zeros((E * Fe, D))
    for i in range(0, len(x), chunk):
        g, r = _down_stats(p, jnp.asarray(x[i : i + chunk]), jnp.asarray(t[i : i + chunk]), k)
        G += np.asarray(g, np.float64)
        R += np.asarray(r, np.float64)
    lam = ridge * max(float(np.mean(np.diag(G))), 1e-12)
    w0 = np.asarray(layer["down"], np.float64).reshape(E * Fe, D)
    delta = np.linalg.solve(G + lam * np.eye(E * Fe), R - G @ w0)  # the change; its ridge pulls it to 0
    if not rank:
        return (w0 + delta).reshape(E, Fe, D).astype(np.float32)
    if not 1 <= rank <= D:
        raise M2R2Error(f"rank={rank}: expected 1 <= rank <= {D}")
    _, vecs = np.linalg.eigh(delta.T @ G @ delta)  # covariance of the change's fitted values [D, D]
    v = vecs[:, ::-1][:, :rank]  # its top-r output directions
    return (delta @ v).reshape(E, Fe, rank).astype(np.float32), v.T.astype(np.float32)


# ----------------------------------------------------------------------------- gradient training


def init_deltas(layer: dict, rank: int, seed: int = 0) -> dict:
    """Rank-r deltas for every expert weight in the asset's layout (DELTA_EINSUM): the shared factor
    small random, the per-expert one zero (the delta starts at zero)."""
    rng = np.random.default_rng(seed)
    E, D, Fe = np.shape(layer["gate"])
    out = {}
    for n in ("gate", "up"):
        out[f"{n}_a"] = (rng.standard_normal((D, rank)) / np.sqrt(D)).astype(np.float32)
        out[f"{n}_b"] = np.zeros((E, rank, Fe), np.float32)
    out["down_a"] = np.zeros((E, Fe, rank), np.float32)
    out["down_b"] = (rng.standard_normal((rank, D)) / np.sqrt(rank)).astype(np.float32)
    return out


def _loss(train, frozen, x, t, k, balance, experts):
    y, probs, ids = moe_forward({**frozen, **train}, x, k)
    err = rel_err(y, t)
    lb = balance_loss(probs, ids, experts)
    return err + balance * lb, (err, lb)


@functools.partial(jax.jit, static_argnames="k")
def _forward(layer, x, k):
    return moe_forward(layer, x, k, straight_through=False)


def evaluate(layer: dict, x, t, k: int, chunk: int = 4096) -> dict:
    """-> {rel_err, load: the share of routed slots per expert [E]} on (x, t)."""
    num = den = 0.0
    E = np.shape(layer["router"])[-1]
    load = np.zeros(E)
    for i in range(0, len(x), chunk):
        xb, tb = jnp.asarray(x[i : i + chunk]), np.asarray(t[i : i + chunk])
        y, _, ids = _forward(layer, xb, k)
        num += float(np.sum((np.asarray(y) - tb) ** 2))
        den += float(np.sum(tb**2))
        load += np.bincount(np.asarray(ids).reshape(-1), minlength=E)
    return {"rel_err": float(np.sqrt(num / max(den, 1e-12))), "load": load / load.sum()}


@functools.cache
def _optimizer(c: LayerFit, names: tuple[str, ...]):
    """Adam with cosine decay: the router at router_lr, the experts (or their deltas) at lr."""
    lr_w = c.lr * (c.delta_lr_scale if c.rank else 1.0)
    sched = {
        "router": optax.cosine_decay_schedule(c.router_lr, max(c.steps, 1), 0.1),
        "w": optax.cosine_decay_schedule(lr_w, max(c.steps, 1), 0.1),
    }
    labels = {n: "router" if n == "router" else "w" for n in names}
    return optax.multi_transform({g: optax.adam(s) for g, s in sched.items()}, labels)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _step(c: LayerFit, experts: int, train, state, frozen, xb, tb):
    """One Adam step (module-level and keyed on the static settings: compiled once per shape, not per layer)."""
    opt = _optimizer(c, tuple(sorted(train)))
    (_, (err, lb)), g = jax.value_and_grad(_loss, has_aux=True)(train, frozen, xb, tb, c.top_k, c.balance, experts)
    upd, state = opt.update(g, state, train)
    return optax.apply_updates(train, upd), state, err, lb


def train_layer(layer: dict, x, t, c: LayerFit) -> tuple[dict, list]:
    """Fit one layer to the targets t [N, D] on inputs x [N, D] (numpy, float32): the closed-form down
    projections (`refit_down`), then `c.steps` Adam steps on everything the layer stores. `layer` is
    the split {router, gate, up, down} (numpy). -> (the router and the tensors that changed, as the
    asset stores them: full weights (rank 0) or deltas (rank r), numpy; history [(step, squared
    rel_err, balance)] every 25 steps). `effective({**layer, **fitted})` is the fitted layer."""
    E = np.shape(layer["router"])[-1]
    c = c.validate(E)
    layer = {n: np.asarray(v, np.float32) for n, v in layer.items()}
    out = {"router": layer["router"]}
    if c.refit_down:
        fit = refit_down(layer, x, t, c.top_k, c.ridge, c.rank)
        out.update({"down": fit} if not c.rank else dict(zip(("down_a", "down_b"), fit)))
    if not c.steps:
        return out, []
    if c.rank:
        train = {**init_deltas(layer, c.rank, c.seed), **out}
        frozen = {n: layer[n] for n in WEIGHTS}
    else:
        train, frozen = {**layer, **out}, {}
    train = jax.tree.map(jnp.asarray, train)
    frozen = jax.tree.map(jnp.asarray, frozen)
    state = _optimizer(c, tuple(sorted(train))).init(train)
    rng = np.random.default_rng(c.seed)
    history = []
    for s in range(c.steps):
        idx = rng.integers(0, len(x), min(c.batch, len(x)))
        train, state, err, lb = _step(c, E, train, state, frozen, jnp.asarray(x[idx]), jnp.asarray(t[idx]))
        if s % 25 == 0 or s == c.steps - 1:
            history.append((s, float(err), float(lb)))
    return {n: np.asarray(v) for n, v in train.items()}, history
