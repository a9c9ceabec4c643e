"""Ahead-of-time expert loading for MoE models, independent of any model: M2R2's fast stream predicts
later layers' experts early, so their weights can be moved into fast memory while earlier layers
compute (paper, sec. on MoE; peers: Mixtral-offloading's LRU + next-layer gate, Pre-gated MoE).

    trace.py      RoutingTrace: the experts each token used per MoE layer, and the predictions
    schedule.py   Schedule: per step, the experts needed and the prefetch requests (the format)
    policies.py   ondemand / lru / gate_prefetch / m2r2_aot: trace -> schedule (m2r2_aot's design there)
    residency.py  who holds a slot and who may evict whom (shared by both modes)
    simulate.py   replay on a modelled link (PCIe 4/5, NVMe presets) with measured compute times
    metrics.py    hit rate, prefetch recall, bytes moved, stall ms/token, tokens/s, speed-up
    store.py      ExpertStore: all experts in one file, read back cold (page cache dropped)
    cache.py      ExpertCache: fixed slots in RAM, LRU, one background loader thread
    engine.py     run_real: replay with real reads and caller-supplied compute, measured
"""

from m2r2_jax.offload.cache import ExpertCache
from m2r2_jax.offload.engine import RealRun, run_real
from m2r2_jax.offload.metrics import OffloadMetrics, speedups
from m2r2_jax.offload.policies import (
    AOT_OPTIONS,
    POLICIES,
    aot_lookahead,
    aot_window,
    available_policies,
    build_schedule,
    check_aot_options,
    gate_prefetch,
    lru,
    m2r2_aot,
    ondemand,
)
from m2r2_jax.offload.residency import Residency
from m2r2_jax.offload.schedule import Schedule, Scoring, capacity_slots, prefetched_needs
from m2r2_jax.offload.simulate import LINKS, Link, expert_nbytes, simulate, simulate_policies
from m2r2_jax.offload.store import ExpertLayout, ExpertStore, measure_cold_warm
from m2r2_jax.offload.trace import RoutingTrace

__all__ = [
    "AOT_OPTIONS",
    "LINKS",
    "POLICIES",
    "ExpertCache",
    "ExpertLayout",
    "ExpertStore",
    "Link",
    "OffloadMetrics",
    "RealRun",
    "Residency",
    "RoutingTrace",
    "Schedule",
    "Scoring",
    "aot_lookahead",
    "aot_window",
    "available_policies",
    "build_schedule",
    "capacity_slots",
    "check_aot_options",
    "expert_nbytes",
    "gate_prefetch",
    "lru",
    "m2r2_aot",
    "measure_cold_warm",
    "ondemand",
    "prefetched_needs",
    "run_real",
    "simulate",
    "simulate_policies",
    "speedups",
]
