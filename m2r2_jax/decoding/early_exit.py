"""Dynamic compute: per-token early exit in one jitted `lax.while_loop` (static shapes, batch >= 1).

Each decode step takes the last token `tok` (slot `pos`) and an exit method decides, per row, whether
the next token comes early (an *exit*) or from the full model. The methods are static objects (the
loop's exit-policy seam):

  M2R2Exit    the fast stream runs fast layer by fast layer; after each, the ARLA router's probability
              "this token is resolved here" is compared with the threshold; an exited token comes from
              the LM head (full vocabulary) on the fast state, otherwise the full slow stream runs.
  StaticExit  every token leaves the base at layer E (the threshold is E) through the LM head.
  CalmExit    CALM's softmax-response confidence: at check layers the margin between the top two
              probabilities (over the draft vocabulary, the frequent tokens) is compared with the
              threshold; a confident token leaves there through the full LM head.
  SpecEEExit  the fast stream's top-k candidates scored at check layers by trained predictors.
  SkipDecodeExit  one depth per step for the whole batch, falling along the generation: the token
              skips the *lower* layers (enters at N - depth), so no K/V is ever owed.

The threshold is a jit argument: one executable per method serves a whole sweep.

An exited token owes K/V to the layers it skipped, which later tokens read. `kv` picks how:

  propagate  (CALM's state propagation) the skipped layers' K/V are projected from the exit state (for
             M2R2: slow layer j's from the fast state aligned with h_s^j, h_f^m with t(m) <= j; the
             embedding for the first layers), and stay;
  deferred   the same K/V stand in until the next token that goes the full depth: that token's forward
             then runs the exited tokens' layers exactly, in one block with it (at most `max_pending`
             tokens wait; a token that would exceed it goes the full depth), so the cache ends up as the
             full model would have written it. M2R2 only (its full path always starts at layer 0).

With a batch, an executed layer costs every row: a step stops early (a `lax.cond`) only when every
active row has exited, and the statistics charge each row what the batch ran. Each row's result does
not depend on the others (a row's cache is only written by its own decisions): batch output equals
the rows decoded one by one (tested).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.compiled import CompileCache
from m2r2_jax.decoding.generate import bucket, pad_prompts, prefill, round_cache, stop_tuple
from m2r2_jax.decoding.sampling import SamplingConfig, select
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.modules import FastLayer
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import tree_draft_attention
from m2r2_jax.model.modules import Attention, DecoderLayer, ExitPolicy

KV_MODES = ("propagate", "deferred")


# ----------------------------------------------------------------------------- cost model


@dataclasses.dataclass(frozen=True)
class Costs:
    """Multiply-accumulates of the weight matmuls for one token (attention over the context is left out:
    it is the same for every method at a position)."""

    layer: float  # one decoder layer (q, k, v, o, gate, up, down)
    head: float  # the LM head, full vocabulary
    kv: float  # one layer's K/V projection (state propagation)

    @classmethod
    def of(cls, cfg: ModelConfig) -> Costs:
        D_, q, kv, F = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
        return cls(float(D_ * (q + 2 * kv) + q * D_ + 3 * D_ * F), float(D_ * cfg.vocab_size), float(D_ * 2 * kv))

    def ar(self, cfg: ModelConfig) -> float:
        return cfg.num_layers * self.layer + self.head


# ----------------------------------------------------------------------------- loop state


@struct.dataclass
class ExitStats:
    tokens: jax.Array  # [B] tokens decided by the loop (the first, from prefill, not counted)
    exits: jax.Array  # [B] ... of which exited early
    layers: jax.Array  # [B] f32 decoder layers run (fast or slow), summed over tokens
    macs: jax.Array  # [B] f32 weight multiply-accumulates, summed over tokens
    forced: jax.Array  # [B] tokens sent the full depth because `max_pending` tokens were waiting


@struct.dataclass
class ExitState:
    i: jax.Array  # int32 scalar: tokens emitted so far
    tok: jax.Array  # [B] the last emitted token, not yet in the cache
    cache: object  # KVCache
    out: jax.Array  # [B, max_new]
    done: jax.Array  # [B]
    key: jax.Array
    pending: jax.Array  # [B] exited tokens whose K/V are still propagated (deferred)
    recent: jax.Array  # [B, max_pending] the last tokens before `tok` (deferred)
    stats: ExitStats


@struct.dataclass
class StepOut:
    logits: jax.Array  # [B, V] f32: the next token's logits (at the exit, or of the full model)
    cache: object
    exited: jax.Array  # [B] bool
    layers: jax.Array  # [B] f32 layers run this step
    macs: jax.Array  # [B] f32
    kv_src: list | None  # per slow layer j, the [B, 1, D] state its K/V are propagated from (exited rows)
    kv_lo: jax.Array  # [B] int32: layers below this already hold the exited token's exact K/V


# ----------------------------------------------------------------------------- shared pieces


def _read_slots(cache_layer: jax.Array, start: jax.Array, T: int) -> jax.Array:
    """[B, KV, S, hd] -> the T slots from start[b] of each row, [B, KV, T, hd]."""
    return jax.vmap(lambda c, s: lax.dynamic_slice_in_dim(c, s, T, axis=1))(cache_layer, start)


def propagate_kv(cfg: ModelConfig, base: dict, cache, pos, src: Sequence, rows, lo) -> D.KVCache:
    """Write slot pos[b] of every layer j >= lo[b] for `rows` [B] with the K/V projected from src[j]
    ([B, 1, D], through layer j's own norm and K/V weights, RoPE at pos); other rows keep the slot."""
    cos, sin = L.rope_cos_sin(cfg, pos[:, None])
    ks, vs = list(cache.k), list(cache.v)
    for j in range(cfg.num_layers):
        lp = base["layers"][j]
        x = L.rms_norm(src[j], lp["attn_norm"], cfg.rms_norm_eps)
        k, v = Attention(cfg).apply({"params": lp["attn"]}, x, cos, sin, method="project_kv")
        sel = (rows & (j >= lo))[:, None, None, None]
        k = jnp.where(sel, k.astype(ks[j].dtype), _read_slots(ks[j], pos, 1))
        v = jnp.where(sel, v.astype(vs[j].dtype), _read_slots(vs[j], pos, 1))
        ks[j], vs[j] = L.write_cache(ks[j], k, pos), L.write_cache(vs[j], v, pos)
    return D.KVCache(ks, vs)


def _keep_rows(cache_new, cache_old, start, T: int, keep) -> D.KVCache:
    """Rows `keep` [B] get back their T slots from start[b] as they were in cache_old."""

    def one(new, old):
        blk = jnp.where(keep[:, None, None, None], _read_slots(old, start, T), _read_slots(new, start, T))
        return L.write_cache(new, blk, start)

    return D.KVCache(
        [one(n, o) for n, o in zip(cache_new.k, cache_old.k)], [one(n, o) for n, o in zip(cache_new.v, cache_old.v)]
    )


# ----------------------------------------------------------------------------- methods


class ExitMethod:
    """The loop's seam for an exit method (the base-model methods express their per-layer rule as the
    decoder's `ExitPolicy`). `prepare(base, ...)` -> its jit argument, built once;
    `step(mp, base, cache, tok, pos, thr, active, force_full, full, i)` -> StepOut, where i (int32 scalar,
    shared by the batch) is the number of tokens emitted so far: the step decides token i + 1. `full(cache, rows)` ->
    (logits [B, V], cache) is the loop's full model on `tok` for the rows [B] that need it (in deferred
    mode it also recomputes the waiting tokens), for methods whose full path starts at layer 0."""

    name: str = ""
    kv_modes: tuple[str, ...] = ("propagate",)

    def prepare(self, base, *sources):
        return None

    def step(self, mp, base, cache, tok, pos, thr, active, force_full, full: Callable, i) -> StepOut:
        raise NotImplementedError


def _stages(n: int, body: Callable, carry, stop: Callable):
    """Run body(i, carry) for i = 0..n-1; after each, skip the rest (a `lax.cond`) when stop(carry).
    body must keep the carry's structure. -> (carry, units run as an int32 scalar)."""

    def rec(i, c):
        c = body(i, c)
        if i == n - 1:
            return c, jnp.int32(n)
        return lax.cond(stop(c), lambda c: (c, jnp.int32(i + 1)), lambda c: rec(i + 1, c), c)

    return rec(0, carry)


@dataclasses.dataclass(frozen=True, eq=True)
class M2R2Exit(ExitMethod):
    """Exit by the ARLA router on the fast stream (module doc). `min_layer`: the first fast layer
    (1-based) where a token may exit."""

    cfg: ModelConfig
    mc: M2R2Config
    min_layer: int = 1
    backend: Backend = XLA
    name: str = "m2r2"
    kv_modes = KV_MODES

    def __post_init__(self):
        n = self.mc.n_fast(self.cfg.num_layers)
        if not 1 <= self.min_layer <= n:
            raise M2R2Error(f"m2r2 exit: min_layer={self.min_layer} must be in [1, {n}]")
        if self.mc.branch:
            raise M2R2Error(
                "m2r2 exit with branch > 0 is not implemented (the slow stream would run the first b layers)"
            )

    def prepare(self, base, m2r2):
        """{"layers": the fast layers with their adapters merged, "router": the ARLA router's params}."""
        cfg, mc = self.cfg, self.mc
        idx = mc.base_layers(cfg.num_layers)
        layers = jax.jit(lambda b, m: [S.merge_fast_layer(b["layers"][j], m["fast"][l]) for l, j in enumerate(idx)])(
            base, m2r2
        )
        return {"layers": layers, "router": m2r2["router"]}

    def kv_sources(self, hs: list) -> list:
        """Slow layer j's K/V source among [h^0, h_f^1, ..., h_f^L]: h_f^m with the largest t(m) <= j."""
        t = [0] + self.mc.targets_of(self.cfg.num_layers)
        return [hs[max(m for m in range(len(t)) if t[m] <= j)] for j in range(self.cfg.num_layers)]

    def step(self, mp, base, cache, tok, pos, thr, active, force_full, full, i):
        cfg, mc, be = self.cfg, self.mc, self.backend
        cost = Costs.of(cfg)
        B, n = tok.shape[0], mc.n_fast(cfg.num_layers)
        idx = mc.base_layers(cfg.num_layers)
        h0 = D.embed(cfg, base, tok[:, None])
        cos, sin = L.rope_cos_sin(cfg, pos[:, None])
        none = jnp.zeros((B, cfg.num_kv_heads, 1, cfg.head_dim), cfg.jnp_dtype)
        no_anc = np.zeros((1, 1), bool)
        layer = FastLayer(cfg, mc, merged=True)

        def body(l, c):
            h, hs, exited = c
            att = tree_draft_attention(cfg, be, cache.k[idx[l]], cache.v[idx[l]], pos, none, none, no_anc)
            h_new, _ = layer.apply({"params": {}}, mp["layers"][l], h, cos, sin, att)
            h = jnp.where(exited[:, None, None], h, h_new)  # an exited row keeps its exit state
            hs = hs[:l] + [h] + hs[l + 1 :]
            if l + 1 >= self.min_layer:
                p = jax.nn.sigmoid(S.arla_router(cfg, mc, mp["router"], hs[: l + 1], h0)[:, 0, l])
                exited = exited | ((p >= thr) & active & ~force_full)
            return h, hs, exited

        init = (h0, [h0] * n, jnp.zeros((B,), bool))
        (h, hs, exited), ran = _stages(n, body, init, lambda c: jnp.all(c[2] | ~active))
        # layers a stop skipped hold h0 in `hs`: an exited row's later states are its exit state
        hs = [jnp.where((l < ran), x, h) for l, x in enumerate(hs)]
        need_full = jnp.any(~exited & active)
        any_exit = jnp.any(exited & active)
        V = cfg.vocab_size
        exit_logits = lax.cond(
            any_exit, lambda: D.logits_from_hidden(cfg, base, h)[:, 0], lambda: jnp.zeros((B, V), jnp.float32)
        )
        full_logits, cache = lax.cond(
            need_full, lambda c: full(c, ~exited & active), lambda c: (jnp.zeros((B, V), jnp.float32), c), cache
        )
        layers = ran.astype(jnp.float32) + jnp.where(need_full, cfg.num_layers, 0)
        macs = ran * cost.layer + jnp.where(need_full, cfg.num_layers * cost.layer + cost.head, 0.0)
        macs = macs + jnp.where(any_exit, cost.head, 0.0)
        return StepOut(
            logits=jnp.where(exited[:, None], exit_logits, full_logits),
            cache=cache,
            exited=exited,
            layers=jnp.broadcast_to(layers, (B,)),
            macs=jnp.broadcast_to(macs, (B,)),
            kv_src=self.kv_sources([h0] + hs),
            kv_lo=jnp.zeros((B,), jnp.int32),
        )


def _slow_walk(cfg, base, backend, cache, tok, pos, policy: ExitPolicy, active, force_full):
    """The base, layer by layer, from the embedding, under an `ExitPolicy` (model/modules.py, the
    decoder's exit seam): after layer i (0-based) in `policy.exit_layers`, rows where
    `policy.decide(i, h)` exit (state frozen from there; the layers that still run for the batch give
    the exited rows K/V from their frozen state: CALM's propagation). Stops once every active row has
    exited. The cache is only read inside the stages (each layer attends over the cached prefix and
    the token's own K/V); the K/V of the layers that ran are written after them, so no stage carries
    the cache. -> (h [B, 1, D], cache, exited, exit_at [B] layers each row ran, layers the batch ran)."""
    B, N = tok.shape[0], cfg.num_layers
    h0 = D.embed(cfg, base, tok[:, None])
    cos, sin = L.rope_cos_sin(cfg, pos[:, None])
    none = jnp.zeros((B, cfg.num_kv_heads, 1, cfg.head_dim), cfg.jnp_dtype)
    no_anc = np.zeros((1, 1), bool)
    bounds = [0] + sorted({i + 1 for i in policy.exit_layers if 0 <= i < N - 1}) + [N]
    stages = list(zip(bounds[:-1], bounds[1:]))

    def body(s, c):
        h, kvs, exited, exit_at = c
        lo, hi = stages[s]
        kvs = list(kvs)
        for i in range(lo, hi):
            att = tree_draft_attention(cfg, backend, cache.k[i], cache.v[i], pos, none, none, no_anc)
            h_new, kvs[i] = DecoderLayer(cfg, index=i).apply({"params": base["layers"][i]}, h, cos, sin, att)
            h = jnp.where(exited[:, None, None], h, h_new)
        if hi < N:
            now = policy.decide(hi - 1, h) & active & ~exited & ~force_full
            exit_at = jnp.where(now, hi, exit_at)
            exited = exited | now
        return h, kvs, exited, exit_at

    init = (h0, [(none, none)] * N, jnp.zeros((B,), bool), jnp.full((B,), N, jnp.int32))
    (h, kvs, exited, exit_at), ran = _stages(len(stages), body, init, lambda c: jnp.all(c[2] | ~active))
    ran_layers = jnp.asarray([hi for _, hi in stages], jnp.int32)[ran - 1]
    ks, vs = list(cache.k), list(cache.v)
    for i, (k, v) in enumerate(kvs):
        keep = i >= ran_layers
        ks[i] = L.write_cache(ks[i], jnp.where(keep, _read_slots(ks[i], pos, 1), k.astype(ks[i].dtype)), pos)
        vs[i] = L.write_cache(vs[i], jnp.where(keep, _read_slots(vs[i], pos, 1), v.astype(vs[i].dtype)), pos)
    return h, D.KVCache(ks, vs), exited, exit_at, ran_layers


class _Policy(ExitPolicy):
    """An `ExitPolicy` built inside a trace: exits after layers `exit_layers` (0-based) where rule(i, h)."""

    def __init__(self, exit_layers: tuple[int, ...], rule: Callable):
        self.exit_layers, self.rule = exit_layers, rule

    def decide(self, layer, h):
        return self.rule(layer, h)


def _slow_step(
    method,
    cfg,
    base,
    cache,
    tok,
    pos,
    policy,
    active,
    force_full,
    extra_macs,
    exit_logits=None,
    exit_cost=None,
    extra_layers=0,
):
    """`exit_logits(h)` -> [B, 1, V]: the exited rows' logits (default: the frozen final norm + LM head),
    costing `exit_cost` MACs a token; the full head runs only when some active row did not exit."""
    cost = Costs.of(cfg)
    B = tok.shape[0]
    h, cache, exited, _, ran = _slow_walk(cfg, base, method.backend, cache, tok, pos, policy, active, force_full)
    full = lambda: D.logits_from_hidden(cfg, base, h)[:, 0]  # noqa: E731
    if exit_logits is None:
        logits, head = full(), cost.head
    else:
        need = jnp.any(~exited & active)
        logits = lax.cond(
            need, lambda: jnp.where(exited[:, None], exit_logits(h)[:, 0], full()), lambda: exit_logits(h)[:, 0]
        )
        head = jnp.where(need, cost.head, 0.0) + jnp.where(jnp.any(exited & active), exit_cost, 0.0)
    macs = ran * cost.layer + head + extra_macs(ran)
    return StepOut(
        logits=logits,
        cache=cache,
        exited=exited,
        layers=jnp.broadcast_to(ran.astype(jnp.float32) + extra_layers, (B,)),
        macs=jnp.broadcast_to(jnp.asarray(macs, jnp.float32), (B,)),
        kv_src=[h] * cfg.num_layers,
        kv_lo=jnp.broadcast_to(ran, (B,)),  # the layers the batch ran hold the exited rows' K/V already
    )


@dataclasses.dataclass(frozen=True, eq=True)
class StaticExit(ExitMethod):
    """Every token leaves the base after layer E = round(threshold) (1 <= E <= N; N = the full model),
    through the frozen LM head (the untrained baseline), or with `trained`, through the exit head
    trained for E (peers/exit_head.py; prepare(base, heads, layers); E must be one of `layers`)."""

    cfg: ModelConfig
    backend: Backend = XLA
    trained: bool = False
    name: str = "static"

    def prepare(self, base, heads=None, layers=()):
        if not self.trained:
            return None
        return {"heads": heads, "layers": jnp.asarray(layers, jnp.int32)}

    def step(self, mp, base, cache, tok, pos, thr, active, force_full, full, i):
        cfg = self.cfg
        E = jnp.round(thr).astype(jnp.int32)
        policy = _Policy(tuple(range(cfg.num_layers - 1)), lambda i, h: jnp.broadcast_to(i + 1 >= E, h.shape[:1]))
        head = None
        if self.trained:
            from m2r2_jax.peers.exit_head import head_logits

            idx = jnp.argmax(mp["layers"] == E)
            head = lambda h: head_logits(cfg, base, mp["heads"], h, idx)  # noqa: E731
            exit_cost = Costs.of(cfg).head + 2.0 * cfg.hidden_size * mp["heads"]["a"].shape[2]
        else:
            exit_cost = None
        return _slow_step(
            self, cfg, base, cache, tok, pos, policy, active, force_full, lambda ran: 0.0, head, exit_cost
        )


@dataclasses.dataclass(frozen=True, eq=True)
class CalmExit(ExitMethod):
    """CALM (Schuster et al. 2022) with the softmax-response confidence: after each layer in `checks`, the
    margin p1 - p2 of the top two probabilities of the LM head on the state, over the draft vocabulary
    (the most frequent tokens: a full-vocabulary head at every check would cost more than it saves at
    SmolLM2's 49k vocabulary), compared with the threshold."""

    cfg: ModelConfig
    checks: tuple[int, ...] = ()
    backend: Backend = XLA
    name: str = "calm"

    def __post_init__(self):
        bad = [c for c in self.checks if not 1 <= c < self.cfg.num_layers]
        if bad or not self.checks:
            raise M2R2Error(f"calm exit: check layers must be in [1, {self.cfg.num_layers}), got {list(self.checks)}")

    def prepare(self, base, draft_ids):
        return {
            "final_norm": base["final_norm"],
            "head": S.draft_head(self.cfg, base, jnp.asarray(draft_ids, jnp.int32)),
        }

    def step(self, mp, base, cache, tok, pos, thr, active, force_full, full, i):
        cfg = self.cfg

        def decide(i, h):
            p = jax.nn.softmax(S.draft_head_logits(cfg, mp, h)[:, 0], -1)
            top2 = lax.top_k(p, 2)[0]
            return (top2[:, 0] - top2[:, 1]) >= thr

        vd = float(mp["head"].shape[0] * cfg.hidden_size)
        checks = jnp.asarray(sorted(self.checks))
        policy = _Policy(tuple(c - 1 for c in self.checks), decide)
        return _slow_step(
            self, cfg, base, cache, tok, pos, policy, active, force_full, lambda ran: vd * jnp.sum(checks <= ran)
        )


@dataclasses.dataclass(frozen=True, eq=True)
class SpecEEExit(ExitMethod):
    """SpecEE (peers/specee.py): the M2R2 fast stream proposes the top-`k` candidates of the next token
    (its draft vocabulary); the base runs layer by layer and after each layer in `layers` a trained
    predictor reads the candidates' logits at that layer; at sigmoid >= threshold the token exits as the
    layer's best candidate (sampling: among the candidates). prepare(base, m2r2, draft_ids, predictors)."""

    cfg: ModelConfig
    mc: M2R2Config
    layers: tuple[int, ...] = ()
    k: int = 4
    backend: Backend = XLA
    name: str = "specee"

    def __post_init__(self):
        bad = [c for c in self.layers if not 1 <= c < self.cfg.num_layers]
        if bad or not self.layers:
            raise M2R2Error(f"specee: check layers must be in [1, {self.cfg.num_layers}), got {list(self.layers)}")

    def prepare(self, base, m2r2, draft_ids, predictors):
        ids = jnp.asarray(draft_ids, jnp.int32)
        return {
            "layers": M2R2Exit(self.cfg, self.mc).prepare(base, m2r2)["layers"],
            "final_norm": base["final_norm"],
            "head": S.draft_head(self.cfg, base, ids),
            "draft_ids": ids,
            "pred": predictors,
        }

    def step(self, mp, base, cache, tok, pos, thr, active, force_full, full, i):
        from m2r2_jax.peers.specee import candidate_features, head_rows, predict

        cfg, mc, be = self.cfg, self.mc, self.backend
        B, n = tok.shape[0], mc.n_fast(cfg.num_layers)
        idx = mc.base_layers(cfg.num_layers)
        cos, sin = L.rope_cos_sin(cfg, pos[:, None])
        none = jnp.zeros((B, cfg.num_kv_heads, 1, cfg.head_dim), cfg.jnp_dtype)
        no_anc = np.zeros((1, 1), bool)
        h = D.embed(cfg, base, tok[:, None])
        for l in range(n):  # the candidates: the fast stream's top-k
            att = tree_draft_attention(cfg, be, cache.k[idx[l]], cache.v[idx[l]], pos, none, none, no_anc)
            h, _ = FastLayer(cfg, mc, merged=True).apply({"params": {}}, mp["layers"][l], h, cos, sin, att)
        _, top = lax.top_k(S.draft_head_logits(cfg, mp, h)[:, 0], self.k)
        cands = jnp.take(mp["draft_ids"], top)  # [B, K]
        rows = head_rows(cfg, base, cands)  # [B, K, D]
        layers = tuple(sorted(self.layers))

        def rule(i, h):
            _, f = candidate_features(cfg, base["final_norm"], rows, h[:, 0])
            return jax.nn.sigmoid(predict(mp["pred"], f, layers.index(i + 1))) >= thr

        def exit_logits(h):
            z, _ = candidate_features(cfg, base["final_norm"], rows, h[:, 0])
            lg = jnp.full((B, cfg.vocab_size), -1e30, jnp.float32)
            return jax.vmap(lambda r, c, v: r.at[c].set(v))(lg, cands, z)[:, None]

        cost = Costs.of(cfg)
        fixed = n * cost.layer + float(mp["head"].shape[0] * cfg.hidden_size)
        per_check = float(self.k * cfg.hidden_size)
        checks = jnp.asarray(layers)
        return _slow_step(
            self,
            cfg,
            base,
            cache,
            tok,
            pos,
            _Policy(tuple(c - 1 for c in layers), rule),
            active,
            force_full,
            lambda ran: fixed + per_check * jnp.sum(checks <= ran),
            exit_logits,
            per_check,
            extra_layers=float(n),
        )


@dataclasses.dataclass(frozen=True, eq=True)
class SkipDecodeExit(ExitMethod):
    """SkipDecode (peers/skipdecode.py): the step's token runs the top depth(i) layers of the base
    (the same for every row: i is the batch's step), entering from its embedding; the threshold is
    d_min. Nothing is owed to the layers it skipped (later tokens skip them too). Run it on the
    SkipDecode-adapted weights (the loop's `base` = `layerskip.merged_base(base, adapters)`)."""

    cfg: ModelConfig
    span: int = 64
    backend: Backend = XLA
    name: str = "skipdecode"

    def __post_init__(self):
        if isinstance(self.span, bool) or not isinstance(self.span, int) or self.span < 1:
            raise M2R2Error(f"skipdecode: span must be an integer >= 1, got {self.span!r}")

    def step(self, mp, base, cache, tok, pos, thr, active, force_full, full, i):
        from m2r2_jax.peers.skipdecode import depth_at

        cfg, be = self.cfg, self.backend
        B, N = tok.shape[0], cfg.num_layers
        depth = depth_at(N, thr, self.span, i)
        entry = N - depth
        h = D.embed(cfg, base, tok[:, None])
        cos, sin = L.rope_cos_sin(cfg, pos[:, None])
        none = jnp.zeros((B, cfg.num_kv_heads, 1, cfg.head_dim), cfg.jnp_dtype)
        no_anc = np.zeros((1, 1), bool)
        ks, vs = list(cache.k), list(cache.v)
        for j in range(N):

            def run(h, j=j):
                att = tree_draft_attention(cfg, be, cache.k[j], cache.v[j], pos, none, none, no_anc)
                return DecoderLayer(cfg, index=j).apply({"params": base["layers"][j]}, h, cos, sin, att)

            h, (k, v) = lax.cond(j >= entry, run, lambda h: (h, (none, none)), h)
            skip = j < entry
            ks[j] = L.write_cache(ks[j], jnp.where(skip, _read_slots(ks[j], pos, 1), k.astype(ks[j].dtype)), pos)
            vs[j] = L.write_cache(vs[j], jnp.where(skip, _read_slots(vs[j], pos, 1), v.astype(vs[j].dtype)), pos)
        cost = Costs.of(cfg)
        return StepOut(
            logits=D.logits_from_hidden(cfg, base, h)[:, 0],
            cache=D.KVCache(ks, vs),
            exited=jnp.broadcast_to(depth < N, (B,)) & active,
            layers=jnp.broadcast_to(depth.astype(jnp.float32), (B,)),
            macs=jnp.broadcast_to(depth * cost.layer + cost.head, (B,)),
            kv_src=None,
            kv_lo=jnp.full((B,), N, jnp.int32),
        )


# ----------------------------------------------------------------------------- the loop


def dynamic_fn(
    cfg: ModelConfig,
    method: ExitMethod,
    kv: str,
    max_pending: int,
    greedy: bool,
    max_new: int,
    cache_len: int,
    backend: Backend = XLA,
):
    """-> run(base, mp, tokens, lengths, stop_ids, thr, key, temperature, top_k, top_p)
    -> (out [B, max_new], ExitStats)."""
    if kv not in method.kv_modes:
        raise M2R2Error(f"exit method {method.name!r} supports kv={'|'.join(method.kv_modes)}, not {kv!r}")
    P = max_pending if kv == "deferred" else 0

    def run(base, mp, tokens, lengths, stop_ids, thr, key, temperature, top_k, top_p):
        B = tokens.shape[0]
        cache = D.init_cache(cfg, B, cache_len)
        logits, cache = prefill(cfg, base, tokens, lengths, cache, backend=backend)
        key, sub = jax.random.split(key)
        first = select(logits, sub, greedy, temperature, top_k, top_p)
        zf, zi = jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.int32)
        st0 = ExitState(
            i=jnp.int32(1),
            tok=first,
            cache=cache,
            out=jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first),
            done=jnp.isin(first, stop_ids),
            key=key,
            pending=zi,
            recent=jnp.zeros((B, max(P, 1)), jnp.int32),
            stats=ExitStats(zi, zi, zf, zf, zi),
        )

        def body(st: ExitState) -> ExitState:
            active = ~st.done
            pos = lengths + st.i - 1  # slot of st.tok
            force = (st.pending >= P) & (kv == "deferred")

            def full_plain(cache, rows):
                lg, cache = D.forward(cfg, base, st.tok[:, None], cache, pos, backend=backend)
                return lg[:, 0], cache

            def full_deferred(cache, rows):
                def flush(cache):
                    start = pos - st.pending
                    k = jnp.arange(P + 1)[None]
                    src = jnp.clip(P - st.pending[:, None] + k, 0, P - 1)
                    block = jnp.where(
                        k < st.pending[:, None],
                        jnp.take_along_axis(st.recent, src, 1),
                        jnp.where(k == st.pending[:, None], st.tok[:, None], 0),
                    )
                    h, new, _ = D.forward_hidden(cfg, base, block, cache, start, backend=backend)
                    # rows that exit this step keep their waiting tokens' slots as they were
                    new = _keep_rows(new, cache, start, P + 1, ~rows)
                    h = jnp.take_along_axis(h, st.pending[:, None, None], 1)
                    return D.logits_from_hidden(cfg, base, h)[:, 0], new

                return lax.cond(jnp.any(st.pending > 0), flush, lambda c: full_plain(c, rows), cache)

            out = method.step(
                mp,
                base,
                st.cache,
                st.tok,
                pos,
                thr,
                active,
                force,
                full_deferred if kv == "deferred" else full_plain,
                st.i,
            )
            exited = out.exited & active
            cache = out.cache
            if out.kv_src is not None:
                cache = lax.cond(
                    jnp.any(exited),
                    lambda c: propagate_kv(cfg, base, c, pos, out.kv_src, exited, out.kv_lo),
                    lambda c: c,
                    cache,
                )
            n_prop = jnp.where(exited, cfg.num_layers - jnp.minimum(out.kv_lo, cfg.num_layers), 0)
            cost = Costs.of(cfg)
            flushed = jnp.where(~exited & (kv == "deferred"), st.pending, 0)
            key, sub = jax.random.split(st.key)
            nxt = select(out.logits, sub, greedy, temperature, top_k, top_p)
            nxt = jnp.where(st.done, stop_ids[0], nxt)
            outb = lax.dynamic_update_slice(st.out, nxt[:, None], (0, st.i))
            a = active.astype(jnp.int32)
            stats = ExitStats(
                tokens=st.stats.tokens + a,
                exits=st.stats.exits + (exited & active),
                layers=st.stats.layers + jnp.where(active, out.layers, 0.0),
                macs=st.stats.macs
                + jnp.where(active, out.macs + n_prop * cost.kv + flushed * cfg.num_layers * cost.layer, 0.0),
                forced=st.stats.forced + (force & active),
            )
            recent = st.recent
            if P:
                recent = jnp.concatenate([st.recent[:, 1:], st.tok[:, None]], 1)
            return ExitState(
                i=st.i + 1,
                tok=nxt,
                cache=cache,
                out=outb,
                done=st.done | jnp.isin(nxt, stop_ids),
                key=key,
                pending=jnp.where(exited, st.pending + 1, 0) if P else st.pending,
                recent=recent,
                stats=stats,
            )

        st = lax.while_loop(lambda s: (s.i < max_new) & ~jnp.all(s.done), body, st0)
        return st.out, st.stats

    return run


@dataclasses.dataclass
class ExitResult:
    new_ids: list[list[int]]
    decode_seconds: float
    compile_seconds: float
    tokens: list[int]  # per row: tokens decided by the loop
    exits: list[int]
    layers: list[float]
    macs: list[float]
    forced: list[int]


class DynamicDecoder:
    """Compiled early-exit executables for one model config, method and K/V strategy, per shape bucket."""

    def __init__(
        self, cfg: ModelConfig, method: ExitMethod, kv: str = "propagate", max_pending: int = 4, backend: Backend = XLA
    ):
        if kv not in KV_MODES:
            raise M2R2Error(f"kv must be one of {', '.join(KV_MODES)}, got {kv!r}")
        if kv not in method.kv_modes:
            raise M2R2Error(f"exit method {method.name!r} supports kv={'|'.join(method.kv_modes)}, not {kv!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise M2R2Error(f"max_pending must be an integer >= 1, got {max_pending!r}")
        self.cfg, self.method, self.kv, self.max_pending, self.backend = cfg, method, kv, max_pending, backend
        self.cache = CompileCache()

    def plan(self, lens: Sequence[int], max_new: int) -> tuple[int, int]:
        if min(lens) < 1:
            raise M2R2Error("empty prompt: at least one token is required")
        longest = max(lens)
        P = bucket(longest)
        need = longest + max_new + self.max_pending + 1
        if need > self.cfg.max_position_embeddings:
            raise M2R2Error(
                f"prompt of {longest} tokens + {max_new} new tokens exceeds the model's context of "
                f"{self.cfg.max_position_embeddings} positions"
            )
        S_ = round_cache(max(need, P))
        self.cfg.check_cache_len(S_)
        return max(P, longest), S_

    def generate(
        self,
        base,
        mp,
        prompts: Sequence[Sequence[int]],
        threshold: float,
        max_new_tokens: int = 128,
        sampling: SamplingConfig | None = None,
        stop_ids=None,
    ) -> ExitResult:
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise M2R2Error("no prompts given")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise M2R2Error(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        B, lens = len(prompts), [len(p) for p in prompts]
        P, S_ = self.plan(lens, max_new_tokens)
        s = sampling or SamplingConfig()
        args = (
            base,
            mp,
            jnp.asarray(pad_prompts(prompts, P)),
            jnp.asarray(lens, jnp.int32),
            jnp.asarray(stop_tuple(self.cfg, stop_ids), jnp.int32),
            jnp.float32(threshold),
            jax.random.key(s.seed),
            jnp.float32(s.temperature),
            jnp.int32(s.top_k),
            jnp.float32(s.top_p),
        )
        key = (B, P, S_, max_new_tokens, s.greedy, jax.tree.structure((base, mp)))
        exe, compile_s = self.cache.get(
            key,
            lambda: dynamic_fn(
                self.cfg, self.method, self.kv, self.max_pending, s.greedy, max_new_tokens, S_, self.backend
            ),
            args,
        )
        t0 = time.perf_counter()
        out, stats = exe(*args)
        out = np.asarray(jax.block_until_ready(out))
        dt = time.perf_counter() - t0
        stop = set(stop_tuple(self.cfg, stop_ids))
        new_ids = []
        for row in out.tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
            new_ids.append(row[:cut])
        st = jax.tree.map(lambda x: np.asarray(x).tolist(), stats)
        return ExitResult(new_ids, dt, compile_s, st.tokens, st.exits, st.layers, st.macs, st.forced)
