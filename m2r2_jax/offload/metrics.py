"""The numbers a policy is judged by, the same for a simulated and a measured run.

hit rate         needs whose expert was resident (its transfer finished) when the layer asked for
                 it, over all T * L * k needs. An expert still on the wire or queued is a miss,
                 even though the wait may be shorter than a full load
prefetch recall  needs whose (layer, expert) a prefetch request of the same token named before the
                 layer ran, over all needs (schedule.prefetched_needs): the predictor's coverage
bytes moved      transfers * bytes per transfer, counting prefetches that finish after the last
                 token; an evicted entry's queued transfer is cancelled and moves nothing, one
                 already on the wire still counts
stall            time a layer waited for its experts after it was ready to run
tokens/s         tokens / total time (compute + stalls); speed-up = tokens/s over ondemand's
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from m2r2_jax.errors import M2R2Error


@dataclasses.dataclass(frozen=True)
class OffloadMetrics:
    policy: str
    mode: str  # "simulated" | "measured"
    tokens: int
    needs: int
    hits: int
    prefetched: int
    loads: int  # transfers started (demand + prefetch)
    bytes_moved: int
    dropped_prefetches: int  # requests refused because every slot was protected
    stall_ms: float  # total over the run
    total_ms: float

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needs

    @property
    def prefetch_recall(self) -> float:
        return self.prefetched / self.needs

    @property
    def stall_ms_per_token(self) -> float:
        return self.stall_ms / self.tokens

    @property
    def ms_per_token(self) -> float:
        return self.total_ms / self.tokens

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.tokens / self.total_ms

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for p in ("hit_rate", "prefetch_recall", "stall_ms_per_token", "ms_per_token", "tokens_per_s"):
            d[p] = getattr(self, p)
        return d


def speedups(results: Mapping[str, OffloadMetrics], baseline: str = "ondemand") -> dict[str, float]:
    """tokens/s of each policy over the baseline's (same trace, same link)."""
    if baseline not in results:
        raise M2R2Error(f"speed-up needs the {baseline!r} run among the results ({', '.join(results)})")
    base = results[baseline].tokens_per_s
    return {name: m.tokens_per_s / base for name, m in results.items()}
