"""The measured mode: replay a Schedule on this machine with real reads (ExpertStore, cold) into a real
cache (ExpertCache) around real compute supplied by the caller.

For each token, for each MoE layer l, in the simulator's order: protect layer l's experts (and with
retain=False release every earlier one), learn the step's hints, issue the step's prefetch requests,
`get` each needed expert (the wait is the stall), then `compute_fn(l, {expert: {"gate", "up", "down"}})`
in the trace's expert order.
After the last layer, `token_fn(t)` if given (the non-MoE per-token work). The outputs are whatever
compute_fn returns, kept per step: a policy changes when weights arrive, never what they are, so the
outputs must be identical under every policy (the tests check it bit for bit).

The measured per-layer compute times and per-token time come back too, to feed `simulate` so a
simulated link can be judged on this machine's compute.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload.cache import ExpertCache
from m2r2_jax.offload.metrics import OffloadMetrics
from m2r2_jax.offload.schedule import Schedule, prefetched_needs
from m2r2_jax.offload.store import ExpertStore


@dataclasses.dataclass(frozen=True, eq=False)
class RealRun:
    metrics: OffloadMetrics
    outputs: list[list[Any]]  # [T][L]: compute_fn's return at each step
    layer_ms: tuple[float, ...]  # mean measured compute_fn time per MoE layer
    token_ms: float  # mean measured token_fn time (0 without one)


def run_real(
    schedule: Schedule,
    store: ExpertStore,
    compute_fn: Callable[[int, dict[int, dict]], Any],
    token_fn: Callable[[int], Any] | None = None,
    cold: bool = True,
) -> RealRun:
    T, L, k = schedule.needed.shape
    lay = store.layout
    if (lay.num_layers, lay.num_experts) != (L, schedule.num_experts):
        raise M2R2Error(
            f"run_real: the store holds {lay.num_layers} layers x {lay.num_experts} experts, "
            f"the schedule needs {L} x {schedule.num_experts}"
        )
    outputs: list[list[Any]] = []
    compute_s = [0.0] * L
    token_s = 0.0
    with ExpertCache(
        store, schedule.capacity, schedule.retain, cold=cold, evict=schedule.evict, scoring=schedule.scoring
    ) as cache:
        t_start = time.perf_counter()
        for t in range(T):
            cache.begin_token()
            row = []
            for l in range(L):
                experts = [int(e) for e in schedule.needed[t, l]]
                cache.begin_layer(l, experts)
                if schedule.hints is not None:
                    cache.hint(*schedule.hint_at(t, l))
                for layer, expert in schedule.requests[t][l]:
                    cache.prefetch(layer, expert)
                weights = {e: cache.get(l, e) for e in experts}
                c0 = time.perf_counter()
                row.append(compute_fn(l, weights))
                compute_s[l] += time.perf_counter() - c0
            outputs.append(row)
            if token_fn is not None:
                c0 = time.perf_counter()
                token_fn(t)
                token_s += time.perf_counter() - c0
        total_s = time.perf_counter() - t_start
        cache.wait_idle()  # late prefetches still move their bytes (the simulator counts them too)
    metrics = OffloadMetrics(
        policy=schedule.policy,
        mode="measured",
        tokens=T,
        needs=T * L * k,
        hits=cache.hits,
        prefetched=prefetched_needs(schedule),
        loads=cache.started,
        bytes_moved=cache.bytes_moved,
        dropped_prefetches=cache.dropped,
        stall_ms=cache.stall_s * 1e3,
        total_ms=total_s * 1e3,
    )
    return RealRun(metrics, outputs, tuple(s / T * 1e3 for s in compute_s), token_s / T * 1e3)
