"""Cache policies: a RoutingTrace -> a Schedule (see schedule.py for what a schedule means).

    ondemand       load each needed expert when its layer asks; keep nothing beyond the current layer
    lru            an LRU cache of `capacity_fraction` of all experts, loading on a miss
    gate_prefetch  lru + at layer l, prefetch gate_pred[t, l+1] (layer l+1's router on layer l's
                   input: Mixtral-offloading's speculative next-layer gate, Pre-gated MoE)
    m2r2_aot       the fast stream's predictions for every layer of the token (m2r2_pred / m2r2_probs[t,
                   l], known at step m2r2_avail[t, l], usually 0: before the token's first layer), used
                   twice, for eviction and for speculative transfers (variant="scored", the default):
                     * confidence: each expert's probability of use, P(used | the fast stream's router
                       probability for it, whether the previous token used it at that layer), is
                       learnt online from the tokens already decoded (`Calibration`): on MT-Bench an
                       expert predicted and recent is used with p 0.93, predicted only 0.65, recent only
                       0.23, and the router probability separates sure bets further (>= 1.6 x uniform:
                       ~0.96 even when not recent); what is known only after a token never informs it;
                     * eviction (residency's "scored" rule): keep value = weight x that probability (for
                       a later layer of this token) + the expert's use count decayed by `decay` per
                       token: predicted-soon and much-used experts stay, the lowest value goes; every
                       expert with a probability >= hint_floor is hinted, requested or not;
                     * speculative transfers: at layer s, for layers s+1 .. s+window, the surest
                       non-resident experts first, at most ceil(c) per layer, where c =
                       compute_per_transfer[s] (layer s's compute over one expert's transfer time; the
                       sim passes it for each link and compute source): the i-th transfer of a step is
                       issued only when its expected gain is positive,
                           p - (1 - h_i) - p_victim - margin > 0,   h_i = clamp(c - i, 0, 1),
                       h_i being the share of it that layer s's compute hides (used, it saves that much
                       of a load; unused, its unhidden rest delays the loads behind it), p_victim the
                       probability that this token still uses the expert it evicts; and only when
                       the victim's keep value is below the prefetched expert's (else DROPPED; never
                       an expert the current layer needs). With the link the bottleneck (c << 1) only
                       near-certain guesses move and the policy rests on its eviction; with compute
                       to hide (c >= 1), everything likelier than what it evicts moves.
                       The builder replays the schedule's own Residency step by step, so each decision
                       sees what a live cache would hold at that step; a step's needs are exact (its
                       router has spoken) and never guessed. compute_per_transfer=None: unbounded
                       (every transfer hidden).
                   Knobs (keyword arguments, `m2r2_aot` / build_schedule): window (default 2 layers),
                   decay 0.9, weight 16, hint_floor 0.02, margin 0, max_spec (a cap on speculative
                   transfers per layer), compute_per_transfer; tuned on MT-Bench only (8 prompts).
                   variant="window" is the earlier policy, kept for comparison: every top-width
                   prediction of a capacity-fitted window (W = min(window, (capacity - k) // width)
                   layers; window=None: as far as fits) requested in layer order, and residency's
                   "predicted" eviction (Belady-like over the token's predictions)

A policy never changes what is computed, only when weights arrive. Every policy but ondemand holds
the same `capacity_fraction` of all experts; ondemand holds the current layer's k (nothing is reused,
so more memory would not change it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload.residency import Residency
from m2r2_jax.offload.schedule import Key, Schedule, Scoring, capacity_slots
from m2r2_jax.offload.trace import RoutingTrace

POLICIES = ("ondemand", "lru", "gate_prefetch", "m2r2_aot")


def _unique(keys) -> tuple[Key, ...]:
    # a repeated id in a prediction would only refresh the entry again; keep the first (best) place
    return tuple(dict.fromkeys((int(layer), int(e)) for layer, e in keys))


def _lru_schedule(policy: str, trace: RoutingTrace, capacity_fraction: float, requests) -> Schedule:
    T, L, k = trace.needed.shape
    cap = capacity_slots(capacity_fraction, L, trace.num_experts, k)
    return Schedule(policy, trace.num_experts, trace.needed, requests, cap)


def _no_requests(trace: RoutingTrace):
    return tuple(tuple(() for _ in range(trace.num_layers)) for _ in range(trace.num_tokens))


def ondemand(trace: RoutingTrace, capacity_fraction: float | None = None) -> Schedule:
    """`capacity_fraction` is accepted for a uniform call and ignored: the baseline holds k slots."""
    return Schedule("ondemand", trace.num_experts, trace.needed, _no_requests(trace), trace.top_k, retain=False)


def lru(trace: RoutingTrace, capacity_fraction: float) -> Schedule:
    return _lru_schedule("lru", trace, capacity_fraction, _no_requests(trace))


def gate_prefetch(trace: RoutingTrace, capacity_fraction: float) -> Schedule:
    if trace.gate_pred is None:
        raise M2R2Error("gate_prefetch needs a trace with gate_pred (the next layer's router on this layer's input)")
    L = trace.num_layers
    requests = tuple(
        tuple(_unique((l + 1, e) for e in trace.gate_pred[t, l + 1]) if l + 1 < L else () for l in range(L))
        for t in range(trace.num_tokens)
    )
    return _lru_schedule("gate_prefetch", trace, capacity_fraction, requests)


def aot_window(capacity: int, top_k: int, width: int, num_layers: int, window: int | None = None) -> int:
    """m2r2_aot's look-ahead in layers: `window` (None: unbounded) capped so that the window's `width`
    predicted experts per layer fit in the cache beside the current layer's k, and by the layers ahead."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise M2R2Error(f"m2r2_aot window must be a non-negative number of layers (or None: auto), got {window!r}")
    fit = max(0, (capacity - top_k) // max(width, 1))
    return min(fit, num_layers - 1, num_layers if window is None else window)


def _aot_window(trace: RoutingTrace, cap: int, window: int | None) -> Schedule:
    """variant="window": every prediction in a capacity-fitted look-ahead window, "predicted" eviction."""
    T, L, k = trace.needed.shape
    W = aot_window(cap, k, trace.m2r2_pred.shape[2], L, window)
    requests, hints = [], []
    for t in range(T):
        asked, known = [[] for _ in range(L)], [[] for _ in range(L)]
        avail = trace.m2r2_avail[t]
        for layer in range(1, L):  # ascending: at each step, the nearest layer's experts go first
            pred = _unique((layer, e) for e in trace.m2r2_pred[t, layer])
            known[avail[layer]].extend(pred)
            step = max(int(avail[layer]), layer - W)
            if step < layer:  # at its own step a layer's needs are known exactly: no guess to fetch
                asked[step].extend(pred)
        requests.append(tuple(tuple(r) for r in asked))
        hints.append(tuple(tuple(h) for h in known))
    return Schedule(
        "m2r2_aot", trace.num_experts, trace.needed, tuple(requests), cap, evict="predicted", hints=tuple(hints)
    )


class Calibration:
    """P(an expert is used at its layer | the fast stream's router probability for it, whether the
    previous token used it there), learnt online from the tokens already decoded: counts per
    (recent, bin of prob * E) with a prior of `strength` pseudo-tokens at k * prob. Only the past is
    counted, so the estimate for token t uses tokens < t."""

    EDGES = np.array([0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0, 2.5, 3.0])  # prob * E

    def __init__(self, num_experts: int, top_k: int, strength: float = 2.0):
        self.E, self.k = num_experts, top_k
        centre = np.concatenate([[self.EDGES[0] / 2], (self.EDGES[1:] + self.EDGES[:-1]) / 2, [self.EDGES[-1] + 1]])
        prior = np.clip(centre * top_k / num_experts, 0.01, 0.99)
        self.used = np.stack([prior, prior]) * strength  # [recent, bin]
        self.seen = np.full_like(self.used, strength)

    def _bins(self, probs: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.EDGES, probs * self.E, side="right")

    def predict(self, probs: np.ndarray, recent: np.ndarray) -> np.ndarray:
        b = self._bins(probs)
        r = recent.astype(np.int64)
        return self.used[r, b] / self.seen[r, b]

    def update(self, probs: np.ndarray, recent: np.ndarray, used: np.ndarray) -> None:
        b, r = self._bins(probs), recent.astype(np.int64)
        np.add.at(self.seen, (r, b), 1.0)
        np.add.at(self.used, (r, b), used.astype(np.float64))


def _onehot(ids: np.ndarray, num_experts: int) -> np.ndarray:
    out = np.zeros(ids.shape[:-1] + (num_experts,), bool)
    np.put_along_axis(out, ids, True, -1)
    return out


def _overlaps(compute_per_transfer, num_layers: int) -> np.ndarray:
    if compute_per_transfer is None:
        return np.full(num_layers, np.inf)
    r = np.asarray(compute_per_transfer, np.float64).reshape(-1)
    if r.size not in (1, num_layers) or not (r >= 0).all():  # also refuses NaN
        raise M2R2Error(
            f"m2r2_aot compute_per_transfer must be numbers >= 0, one or one per layer ({num_layers}), got {r.tolist()}"
        )
    return np.broadcast_to(r, (num_layers,))


def _aot_scored(
    trace: RoutingTrace,
    cap: int,
    window: int | None,
    compute_per_transfer,
    scoring: Scoring,
    margin: float,
    max_spec: int | None,
    hint_floor: float,
) -> Schedule:
    """variant="scored" (see the module docstring). Replays the schedule's own Residency as it is
    built, so each step's decisions see the cache a live system would see at that step."""
    T, L, k = trace.needed.shape
    E = trace.num_experts
    W = min(AOT_LOOKAHEAD if window is None else window, L - 1)
    ratio = _overlaps(compute_per_transfer, L)
    probs = trace.m2r2_probs
    if probs is None:  # no confidence recorded: the predicted ids share the mass
        probs = _onehot(trace.m2r2_pred, E) / trace.m2r2_pred.shape[2]
    cal = Calibration(E, k)
    res = Residency(cap, True, "scored", scoring)
    used = _onehot(trace.needed, E)
    requests, hints, hint_probs = [], [], []
    prev = np.zeros((L, E), bool)
    for t in range(T):
        p = cal.predict(probs[t], prev)  # [L, E]: P(used) for this token, from what is known before it
        avail = trace.m2r2_avail[t]
        h_keys, h_probs = [[] for _ in range(L)], [[] for _ in range(L)]
        ranked = []  # (p, layer, expert), surest first: the prefetch candidates
        for layer in range(1, L):
            for e in np.flatnonzero(p[layer] >= hint_floor):
                h_keys[avail[layer]].append((layer, int(e)))
                h_probs[avail[layer]].append(float(p[layer, e]))
                ranked.append((float(p[layer, e]), layer, int(e)))
        ranked.sort(key=lambda x: (-x[0], x[1], x[2]))
        asked = []
        res.begin_token()
        for s in range(L):
            need = tuple((s, int(e)) for e in trace.needed[t, s])
            res.begin_layer(s, need)
            res.hint(h_keys[s], h_probs[s])
            cands = [(q, (layer, e)) for q, layer, e in ranked if s < layer <= s + W and avail[layer] <= s]
            budget = math.ceil(ratio[s]) if np.isfinite(ratio[s]) else len(cands)
            budget = budget if max_spec is None else min(budget, max_spec)
            step = []
            for i in range(budget):
                hidden = min(1.0, max(0.0, ratio[s] - i))  # share of the i-th transfer under layer s's compute
                victim = None if res.has_free() else res.cheapest()
                if victim is None and not res.has_free():
                    break
                best, best_ev = None, 0.0
                for q, key in cands:
                    # used: it hides `hidden` of a load; unused: its unhidden part delays the loads behind it;
                    # and the victim, if this token may still use it, may have to come back
                    ev = q - (1.0 - hidden) - margin
                    if ev <= best_ev:
                        break  # surest first: no later candidate can do better
                    if key in res:
                        continue
                    if victim is not None:
                        if victim[1] >= res.value(key):
                            continue  # it would be dropped: nothing cheaper than it to evict
                        ev -= res.hinted(victim[0])
                    if ev > best_ev:
                        best, best_ev = key, ev
                if best is None:
                    break
                res.prefetch(best)
                step.append(best)
                cands = [c for c in cands if c[1] != best]
            asked.append(tuple(step))
            for key in need:
                res.demand(key)
        requests.append(tuple(asked))
        hints.append(tuple(tuple(h) for h in h_keys))
        hint_probs.append(tuple(tuple(h) for h in h_probs))
        cal.update(probs[t], prev, used[t])
        prev = used[t]
    return Schedule(
        "m2r2_aot",
        E,
        trace.needed,
        tuple(requests),
        cap,
        evict="scored",
        hints=tuple(hints),
        hint_probs=tuple(hint_probs),
        scoring=scoring,
    )


AOT_VARIANTS = ("scored", "window")
AOT_LOOKAHEAD = 2  # variant="scored": layers ahead a speculative transfer may serve (tuned on MT-Bench)
AOT_OPTIONS = ("variant", "compute_per_transfer", "decay", "weight", "margin", "max_spec", "hint_floor")


def check_aot_options(window: int | None = None, **opts) -> None:
    """Refuse an unknown or out-of-range m2r2_aot knob (one M2R2Error line) before anything runs."""
    bad = [k for k in opts if k not in AOT_OPTIONS]
    if bad:
        raise M2R2Error(f"unknown m2r2_aot option {', '.join(bad)}: choose from {', '.join(AOT_OPTIONS)}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
        raise M2R2Error(f"m2r2_aot window must be a non-negative number of layers (or None: auto), got {window!r}")
    variant = opts.get("variant", "scored")
    if variant not in AOT_VARIANTS:
        raise M2R2Error(f"unknown m2r2_aot variant {variant!r}: choose from {', '.join(AOT_VARIANTS)}")
    for name in ("margin", "hint_floor"):
        v = opts.get(name, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise M2R2Error(f"m2r2_aot {name} must be in [0, 1], got {v!r}")
    m = opts.get("max_spec")
    if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
        raise M2R2Error(f"m2r2_aot max_spec must be a non-negative number of transfers per layer, got {m!r}")
    c = opts.get("compute_per_transfer")
    if c is not None:
        vals = list(c) if isinstance(c, (list, tuple)) else [c]
        if not vals or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 for v in vals):
            raise M2R2Error(f"m2r2_aot compute_per_transfer must be numbers >= 0 (one, or one per layer), got {c!r}")
    Scoring(opts.get("decay", 0.9), opts.get("weight", 16.0))


def aot_lookahead(
    capacity: int, top_k: int, width: int, num_layers: int, window: int | None = None, variant: str = "scored"
) -> int:
    """The look-ahead m2r2_aot runs with, in layers (what `window` becomes for this variant)."""
    if variant == "window":
        return aot_window(capacity, top_k, width, num_layers, window)
    return min(AOT_LOOKAHEAD if window is None else window, num_layers - 1)


def m2r2_aot(
    trace: RoutingTrace,
    capacity_fraction: float,
    window: int | None = None,
    *,
    variant: str = "scored",
    compute_per_transfer: float | Sequence[float] | None = None,
    decay: float = 0.9,
    weight: float = 16.0,
    margin: float = 0.0,
    max_spec: int | None = None,
    hint_floor: float = 0.02,
) -> Schedule:
    """The fast stream's predictions as a schedule (module docstring). `variant`: "scored" (default;
    window=None: AOT_LOOKAHEAD layers) or "window" (the capacity-fitted window of every prediction;
    only `window` applies to it; None: as far as the capacity allows)."""
    if trace.m2r2_pred is None:
        raise M2R2Error("m2r2_aot needs a trace with m2r2_pred and m2r2_avail (the fast stream's predictions)")
    check_aot_options(
        window,
        variant=variant,
        compute_per_transfer=compute_per_transfer,
        decay=decay,
        weight=weight,
        margin=margin,
        max_spec=max_spec,
        hint_floor=hint_floor,
    )
    T, L, k = trace.needed.shape
    cap = capacity_slots(capacity_fraction, L, trace.num_experts, k)
    if variant == "window":
        return _aot_window(trace, cap, window)
    scoring = Scoring(decay, weight)
    return _aot_scored(trace, cap, window, compute_per_transfer, scoring, margin, max_spec, hint_floor)


_BUILD = {"ondemand": ondemand, "lru": lru, "gate_prefetch": gate_prefetch, "m2r2_aot": m2r2_aot}


def build_schedule(
    policy: str, trace: RoutingTrace, capacity_fraction: float, window: int | None = None, **aot
) -> Schedule:
    """`window` and `aot` (keyword arguments): m2r2_aot's knobs (see m2r2_aot); the others ignore them."""
    if policy not in _BUILD:
        raise M2R2Error(f"unknown offload policy {policy!r}; choose from {', '.join(POLICIES)}")
    if policy == "m2r2_aot":
        check_aot_options(window, **aot)
        return m2r2_aot(trace, capacity_fraction, window, **aot)
    return _BUILD[policy](trace, capacity_fraction)


def available_policies(trace: RoutingTrace) -> tuple[str, ...]:
    """The policies this trace has the predictions for."""
    skip = {"gate_prefetch"} if trace.gate_pred is None else set()
    skip |= {"m2r2_aot"} if trace.m2r2_pred is None else set()
    return tuple(p for p in POLICIES if p not in skip)
