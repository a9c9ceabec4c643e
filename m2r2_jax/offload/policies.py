"""Cache policies: a RoutingTrace -> a Schedule (see schedule.py for what a schedule means).

    ondemand       load each needed expert when its layer asks; keep nothing beyond the current layer
    lru            an LRU cache of `capacity_fraction` of all experts, loading on a miss
    gate_prefetch  lru + at layer l, prefetch gate_pred[t, l+1] (layer l+1's router on layer l's
                   input: Mixtral-offloading's speculative next-layer gate, Pre-gated MoE)
    m2r2_aot       the fast stream's predictions m2r2_pred[t, l] (known at step m2r2_avail[t, l], usually
                   0: before the token's first layer), capacity-aware:
                     * a look-ahead window of W layers: at step s the predictions for layers s+1 .. s+W
                       have been requested, layer s+W's issued as layer s starts (in layer order, each
                       layer's in the prediction's score order), never before they are known and never
                       for the current layer (its router has spoken: its needs are exact);
                     * W = min(window, (capacity - k) // width): the window's predicted experts and the
                       current layer's k fit in the cache together (window=None: as far as they fit);
                     * eviction is residency's "predicted" rule (Belady-like over all the token's
                       predictions, hinted when known, inside the window or not): what no prediction
                       names goes first, then what is predicted furthest ahead; a prefetch never
                       evicts an expert predicted nearer than its own, nor one the current layer needs

A policy never changes what is computed, only when weights arrive. Every policy but ondemand holds
the same `capacity_fraction` of all experts; ondemand holds the current layer's k (nothing is reused,
so more memory would not change it).
"""

from __future__ import annotations

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload.schedule import Key, Schedule, capacity_slots
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


def m2r2_aot(trace: RoutingTrace, capacity_fraction: float, window: int | None = None) -> Schedule:
    if trace.m2r2_pred is None:
        raise M2R2Error("m2r2_aot needs a trace with m2r2_pred and m2r2_avail (the fast stream's predictions)")
    T, L, k = trace.needed.shape
    cap = capacity_slots(capacity_fraction, L, trace.num_experts, k)
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


_BUILD = {"ondemand": ondemand, "lru": lru, "gate_prefetch": gate_prefetch, "m2r2_aot": m2r2_aot}


def build_schedule(policy: str, trace: RoutingTrace, capacity_fraction: float, window: int | None = None) -> Schedule:
    """`window`: m2r2_aot's look-ahead in layers (None: as far as the capacity allows); others ignore it."""
    if policy not in _BUILD:
        raise M2R2Error(f"unknown offload policy {policy!r}; choose from {', '.join(POLICIES)}")
    if policy == "m2r2_aot":
        return m2r2_aot(trace, capacity_fraction, window)
    return _BUILD[policy](trace, capacity_fraction)


def available_policies(trace: RoutingTrace) -> tuple[str, ...]:
    """The policies this trace has the predictions for."""
    skip = {"gate_prefetch"} if trace.gate_pred is None else set()
    skip |= {"m2r2_aot"} if trace.m2r2_pred is None else set()
    return tuple(p for p in POLICIES if p not in skip)
