"""What a cache policy produces from a trace: the experts each step needs and the prefetch requests
each step issues. The simulator and the real engine both replay exactly this; neither knows the
policy's name.

A step is (token t, MoE layer l); steps run in order t = 0.., l = 0..L-1. At each step, in this order:

  1. `requests[t][l]`: a priority-ordered tuple of (layer, expert) to prefetch, each with
     l <= layer < L (requests never cross tokens: a prediction is about the token being decoded);
  2. `needed[t, l]`: the k experts layer l computes with; the layer's compute starts once all k
     are resident.

`capacity` is the number of expert slots, global across layers (total experts = L * E): it is
`capacity_slots(fraction, L, E, k)`, the fraction of all experts that fits in fast memory, floored,
and never below k (a layer must be able to hold its own experts). `retain=False` releases every
expert after the layer that used it (the on-demand baseline: each need is a load).

`evict` is residency.Residency's victim rule: "lru", "predicted" (Belady-like over the token's
predictions) or "scored" (a keep value of hinted probability and decayed use count, `scoring`). With
"predicted" or "scored", `hints[t][l]` are the (layer, expert) predictions for later layers of token t
that become known at step l (before that step's requests): they rank the victims whether or not they
are ever requested, so a window of requests can stay short without the cache forgetting what lies
beyond it. With "scored", `hint_probs[t][l]` (aligned with hints[t][l]) are their probabilities of
use (None: 1 each).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from m2r2_jax.errors import M2R2Error

Key = tuple[int, int]  # (MoE layer, expert id)


@dataclasses.dataclass(frozen=True)
class Scoring:
    """evict="scored" (residency.py): keep value = weight * (hinted probability of use later in this
    token) + the decayed use count (x `decay` per token, + 1 per use)."""

    decay: float = 0.9
    weight: float = 4.0

    def __post_init__(self):
        for name, v, hi in (("decay", self.decay, 1.0), ("weight", self.weight, 1e6)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= hi:
                raise M2R2Error(f"scoring {name} must be a number in [0, {hi:g}], got {v!r}")


def capacity_slots(fraction: float, num_layers: int, num_experts: int, top_k: int) -> int:
    """Slots for `fraction` of all L * E experts (floored: the fraction is a memory budget)."""
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:  # also refuses NaN
        raise M2R2Error(f"capacity fraction must be in (0, 1], got {fraction!r}")
    total = num_layers * num_experts
    slots = math.floor(fraction * total + 1e-9)  # 0.29 * 100 is 28.999...: count it as 29
    if slots < top_k:
        raise M2R2Error(
            f"capacity fraction {fraction} holds {slots} of {total} experts, fewer than the top-{top_k} "
            "one layer needs at once"
        )
    return slots


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    policy: str
    num_experts: int
    needed: np.ndarray  # int [T, L, k], as RoutingTrace.needed
    requests: tuple[tuple[tuple[Key, ...], ...], ...]  # [T][L] -> ((layer, expert), ...), best first
    capacity: int  # slots, global across layers
    retain: bool = True
    evict: str = "lru"  # residency.EVICTIONS
    hints: tuple[tuple[tuple[Key, ...], ...], ...] | None = None  # [T][L], evict="predicted" / "scored"
    hint_probs: tuple[tuple[tuple[float, ...], ...], ...] | None = None  # [T][L], aligned with hints ("scored")
    scoring: Scoring | None = None  # evict="scored" only (and required there)

    def __post_init__(self):
        if not isinstance(self.needed, np.ndarray) or self.needed.ndim != 3 or self.needed.dtype.kind not in "iu":
            raise M2R2Error(f"schedule {self.policy}: needed must be an int array [T, L, k] (RoutingTrace.needed)")
        T, L, k = self.needed.shape
        if not k <= self.capacity <= L * self.num_experts:
            raise M2R2Error(f"schedule {self.policy}: capacity {self.capacity} outside [{k}, {L * self.num_experts}]")
        if self.evict not in ("lru", "predicted", "scored"):
            raise M2R2Error(f"schedule {self.policy}: unknown eviction rule {self.evict!r} (lru, predicted, scored)")
        if self.hints is not None and self.evict == "lru":
            raise M2R2Error(f"schedule {self.policy}: hints rank victims only with evict='predicted' or 'scored'")
        if (self.scoring is not None) != (self.evict == "scored"):
            raise M2R2Error(f"schedule {self.policy}: a scoring goes with evict='scored' and only with it")
        if self.hint_probs is not None:
            if self.evict != "scored" or self.hints is None:
                raise M2R2Error(f"schedule {self.policy}: hint_probs go with hints and evict='scored'")
            if len(self.hint_probs) != len(self.hints) or any(
                len(p) != len(h) or any(len(a) != len(b) for a, b in zip(p, h))
                for p, h in zip(self.hint_probs, self.hints)
            ):
                raise M2R2Error(f"schedule {self.policy}: hint_probs must align with hints, one per (layer, expert)")
            flat = [x for per in self.hint_probs for step in per for x in step]
            if flat and not (min(flat) >= 0.0 and max(flat) <= 1.0):  # also refuses NaN
                raise M2R2Error(f"schedule {self.policy}: hint_probs must be probabilities in [0, 1]")
        named = [("request", self.requests)] + ([("hint", self.hints)] if self.hints is not None else [])
        for what, table in named:
            if len(table) != T or any(len(r) != L for r in table):
                raise M2R2Error(f"schedule {self.policy}: {what}s must be [T={T}][L={L}] tuples")
            for t, per_token in enumerate(table):
                for l, reqs in enumerate(per_token):
                    for layer, expert in reqs:
                        if not (l <= layer < L and 0 <= expert < self.num_experts):
                            raise M2R2Error(
                                f"schedule {self.policy}: {what} ({layer}, {expert}) at token {t} step {l} must "
                                f"name a layer in [{l}, {L}) and an expert in [0, {self.num_experts})"
                            )

    @property
    def num_tokens(self) -> int:
        return self.needed.shape[0]

    @property
    def num_layers(self) -> int:
        return self.needed.shape[1]

    @property
    def top_k(self) -> int:
        return self.needed.shape[2]

    def need(self, t: int, l: int) -> tuple[Key, ...]:
        return tuple((l, int(e)) for e in self.needed[t, l])

    def hint_at(self, t: int, l: int) -> tuple[tuple[Key, ...], tuple[float, ...] | None]:
        """The step's hints and their probabilities (None: no probabilities given)."""
        if self.hints is None:
            return (), None
        return self.hints[t][l], None if self.hint_probs is None else self.hint_probs[t][l]

    def residency(self):
        """A fresh residency.Residency for this schedule (the simulator's and the real cache's)."""
        from m2r2_jax.offload.residency import Residency

        return Residency(self.capacity, self.retain, self.evict, self.scoring)


def prefetched_needs(schedule: Schedule) -> int:
    """How many of the T * L * k needs had their (layer, expert) named by a prefetch request earlier
    in the same token (at a step <= the layer: requests never name a past layer, so any request of the
    token counts). Prefetch recall = this / needs. It measures the predictor through the schedule,
    whether or not the transfer finished in time (that is the hit rate)."""
    n = 0
    for t, per_token in enumerate(schedule.requests):
        asked = {key for reqs in per_token for key in reqs}
        n += sum(key in asked for l in range(schedule.num_layers) for key in schedule.need(t, l))
    return n
