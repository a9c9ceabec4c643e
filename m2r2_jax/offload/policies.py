"""Cache policies: a RoutingTrace -> a Schedule (see schedule.py for what a schedule means).

    ondemand       load each needed expert when its layer asks; keep nothing beyond the current layer
    lru            an LRU cache of `capacity_fraction` of all experts, loading on a miss
    gate_prefetch  lru + at layer l, prefetch gate_pred[t, l+1] (layer l+1's router on layer l's
                   input: Mixtral-offloading's speculative next-layer gate, Pre-gated MoE)
    m2r2_aot       lru + prefetch m2r2_pred[t, l] at step m2r2_avail[t, l], as soon as the fast stream
                   has made it: usually several layers ahead. Requests made at the same step are
                   ordered nearest layer first, then in the prediction's own (score) order

A policy never changes what is computed, only when weights arrive.
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


def m2r2_aot(trace: RoutingTrace, capacity_fraction: float) -> Schedule:
    if trace.m2r2_pred is None:
        raise M2R2Error("m2r2_aot needs a trace with m2r2_pred and m2r2_avail (the fast stream's predictions)")
    L = trace.num_layers
    requests = []
    for t in range(trace.num_tokens):
        at = [[] for _ in range(L)]
        for layer in range(L):  # ascending: at each step, the nearest layer's experts go first
            at[trace.m2r2_avail[t, layer]].extend((layer, e) for e in trace.m2r2_pred[t, layer])
        requests.append(tuple(_unique(r) for r in at))
    return _lru_schedule("m2r2_aot", trace, capacity_fraction, tuple(requests))


_BUILD = {"ondemand": ondemand, "lru": lru, "gate_prefetch": gate_prefetch, "m2r2_aot": m2r2_aot}


def build_schedule(policy: str, trace: RoutingTrace, capacity_fraction: float) -> Schedule:
    if policy not in _BUILD:
        raise M2R2Error(f"unknown offload policy {policy!r}; choose from {', '.join(POLICIES)}")
    return _BUILD[policy](trace, capacity_fraction)


def available_policies(trace: RoutingTrace) -> tuple[str, ...]:
    """The policies this trace has the predictions for."""
    skip = {"gate_prefetch"} if trace.gate_pred is None else set()
    skip |= {"m2r2_aot"} if trace.m2r2_pred is None else set()
    return tuple(p for p in POLICIES if p not in skip)
