"""Replay a Schedule against a model of one transfer channel and measured compute times. Deterministic.

Time model (all in seconds inside, reported in ms):
  * One channel moves one expert at a time: a transfer takes `latency_s + expert_bytes / bandwidth`.
    It is never preempted once started.
  * Two queues feed it. Prefetches wait in request order (FIFO). A demand miss jumps ahead of every
    queued prefetch (it stalls the model; a prefetch can wait); a needed expert whose prefetch is still
    queued is moved to the demand queue, not loaded twice. When the channel frees at the very instant a
    step issues requests, the step's demand goes first.
  * Step (t, l) starts at the clock `now`: its hints (predictions that rank victims) are learnt, its
    prefetch requests are queued at `now`, then its needs are checked. Layer l computes for
    `layer_ms[l]` from the moment its last expert lands (stall = that moment - now, 0 if all were
    resident). After the last layer, `token_ms` of non-MoE work (embeddings, LM head, sampling, and a
    fast stream that runs before the token's first layer: the caller adds it for the policy it serves).
  * Residency (who evicts whom) is residency.Residency, shared with the real cache. An evicted entry's
    queued transfer is cancelled; one already on the wire completes and its bytes count.
  * The cache starts empty (cold). Prefetches still queued after the last token are moved and counted
    in bytes_moved, not in the time, as the measured mode does (it drains its queue before closing).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload.metrics import OffloadMetrics
from m2r2_jax.offload.policies import available_policies, build_schedule
from m2r2_jax.offload.residency import DROPPED, Admission
from m2r2_jax.offload.schedule import Schedule, prefetched_needs
from m2r2_jax.offload.trace import RoutingTrace


@dataclasses.dataclass(frozen=True)
class Link:
    name: str
    bandwidth_bytes_per_s: float
    latency_s: float

    def transfer_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


# Nominal figures, not measurements of this machine: replace them with your own where you can.
LINKS = {
    # PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes, 128b/130b = 31.5 GB/s per direction; pinned host->device
    # cudaMemcpy reaches ~80% of that (NVIDIA bandwidthTest on A100 PCIe-4 hosts: 24-26 GB/s).
    # ~10 us per copy for launch + DMA setup.
    "pcie4": Link("pcie4", 25e9, 10e-6),
    # PCIe 5.0: 32 GT/s -> 63 GB/s per direction; ~50 GB/s pinned host->device on H100 PCIe-5 hosts.
    "pcie5": Link("pcie5", 50e9, 10e-6),
    # NVMe -> RAM, large sequential reads at the drives' rated speeds: PCIe 3.0 x4 (~3.5 GB/s, e.g.
    # Samsung 970 EVO Plus) and PCIe 4.0 x4 (~7 GB/s, e.g. Samsung 990 PRO); ~100 us per I/O.
    "nvme3": Link("nvme3", 3.5e9, 100e-6),
    "nvme4": Link("nvme4", 7e9, 100e-6),
}


def expert_nbytes(hidden: int, intermediate: int, bytes_per_param: float) -> int:
    """One SwiGLU expert: gate + up [hidden, intermediate], down [intermediate, hidden]."""
    return int(3 * hidden * intermediate * bytes_per_param)


class _Transfer:
    __slots__ = ("key", "queued_at", "start", "done")

    def __init__(self, key, queued_at):
        self.key, self.queued_at, self.start, self.done = key, queued_at, None, None


class _Channel:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.free_at = 0.0
        self.demand: deque[_Transfer] = deque()
        self.prefetch: deque[_Transfer] = deque()
        self.started = 0

    def _head_start(self) -> float | None:
        q = self.demand or self.prefetch
        return max(self.free_at, q[0].queued_at) if q else None

    def _start_head(self) -> None:
        x = (self.demand or self.prefetch).popleft()
        x.start = max(self.free_at, x.queued_at)
        x.done = self.free_at = x.start + self.seconds
        self.started += 1

    def advance(self, now: float) -> None:
        """Start every queued transfer that begins strictly before `now` (at `now` a new demand wins)."""
        while (s := self._head_start()) is not None and s < now:
            self._start_head()

    def finish(self, x: _Transfer) -> float:
        while x.done is None:  # x is in the demand queue: only demands ahead of it start first
            self._start_head()
        return x.done

    def drain(self) -> None:
        while self.demand or self.prefetch:
            self._start_head()

    def cancel(self, x: _Transfer) -> None:
        if x.start is None:
            (self.demand if x in self.demand else self.prefetch).remove(x)

    def promote(self, x: _Transfer) -> None:
        if x.start is None and x in self.prefetch:
            self.prefetch.remove(x)
            self.demand.append(x)


def _per_layer(layer_ms, L: int) -> tuple[float, ...]:
    ms = (float(layer_ms),) * L if isinstance(layer_ms, (int, float)) else tuple(float(x) for x in layer_ms)
    if len(ms) != L or min(ms) < 0:
        raise M2R2Error(f"layer_ms: expected one non-negative time or {L} (one per MoE layer), got {layer_ms!r}")
    return ms


def simulate(
    schedule: Schedule, link: Link, expert_bytes: int, layer_ms: float | Sequence[float], token_ms: float = 0.0
) -> OffloadMetrics:
    T, L, k = schedule.needed.shape
    layer_s = [x / 1e3 for x in _per_layer(layer_ms, L)]
    if expert_bytes <= 0 or link.bandwidth_bytes_per_s <= 0 or link.latency_s < 0 or token_ms < 0:
        raise M2R2Error(f"simulate: need expert_bytes > 0, bandwidth > 0, latency >= 0, token_ms >= 0 ({link})")
    ch = _Channel(link.transfer_s(expert_bytes))
    res = schedule.residency()
    xfer: dict = {}  # key -> its _Transfer, for every entry in `res`
    clock = stall = 0.0
    hits = dropped = 0

    def load(got: Admission, key, now: float, queue: deque) -> None:
        if got.victim is not None:
            ch.cancel(xfer.pop(got.victim))
        xfer[key] = _Transfer(key, now)
        queue.append(xfer[key])

    for t in range(T):
        res.begin_token()
        for l in range(L):
            now = clock
            ch.advance(now)
            need = schedule.need(t, l)
            for key in res.begin_layer(l, need):
                ch.cancel(xfer.pop(key))
            if schedule.hints is not None:
                res.hint(*schedule.hint_at(t, l))
            for key in schedule.requests[t][l]:
                got = res.prefetch(key)
                if isinstance(got, Admission):
                    load(got, key, now, ch.prefetch)
                else:
                    dropped += got == DROPPED
            for key in need:
                got = res.demand(key)
                if got is not None:
                    load(got, key, now, ch.demand)
                elif xfer[key].done is not None and xfer[key].done <= now:
                    hits += 1
                else:
                    ch.promote(xfer[key])
            ready = max([now] + [ch.finish(xfer[key]) for key in need])
            stall += ready - now
            clock = ready + layer_s[l]
        clock += token_ms / 1e3
    ch.drain()  # prefetches still queued move their bytes after the last token (not in the time)
    return OffloadMetrics(
        policy=schedule.policy,
        mode="simulated",
        tokens=T,
        needs=T * L * k,
        hits=hits,
        prefetched=prefetched_needs(schedule),
        loads=ch.started,
        bytes_moved=ch.started * expert_bytes,
        dropped_prefetches=dropped,
        stall_ms=stall * 1e3,
        total_ms=clock * 1e3,
    )


def simulate_policies(
    trace: RoutingTrace,
    capacity_fraction: float,
    link: Link,
    expert_bytes: int,
    layer_ms: float | Sequence[float],
    token_ms: float = 0.0,
    policies: Sequence[str] | None = None,
    window: int | None = None,
    **aot,
) -> dict[str, OffloadMetrics]:
    """Every policy the trace supports (or `policies`) on the same link; pair with metrics.speedups.
    `window`, `aot`: m2r2_aot's knobs (policies.m2r2_aot)."""
    names = available_policies(trace) if policies is None else policies
    return {
        p: simulate(build_schedule(p, trace, capacity_fraction, window, **aot), link, expert_bytes, layer_ms, token_ms)
        for p in names
    }
