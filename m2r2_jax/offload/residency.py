"""Which experts occupy the cache's slots, and who may evict whom: the one place that decides, shared
by the simulator and the real `ExpertCache` so both keep the same set of experts for the same schedule.

An entry holds a slot from the moment it is admitted (its load may still be queued or in flight) until
it is evicted; admission order and hits keep an LRU order over entries. Rules:

  * Demand (the current layer needs an expert that is not in the cache): take a free slot, else evict
    the least recently used entry that the current layer does not need. Capacity >= k guarantees one
    exists. A pending load can be a victim: its transfer is cancelled (or discarded if on the wire).
  * Prefetch of an expert already in the cache: refresh it to most recently used (the predictor says
    it is needed soon) and promise it; no transfer.
  * Prefetch of an expert not in the cache: take a free slot, else evict the least recently used entry
    that is neither needed by the current layer nor promised to a later layer of this token (named
    by an earlier prefetch request of this token, for a layer not yet run). If every entry is
    protected the request is dropped: a lower-priority prediction must not undo a higher-priority
    one, and a prefetch must never take an expert the layer about to run still needs. Ties cannot
    occur: the LRU order is total.
  * A promise ends when its layer starts (from then the layer's real needs protect what it uses, and
    a wrong prediction is fair game) or when the token ends (requests never cross tokens).
  * retain=False (on-demand): at each layer start every entry is evicted, so each layer loads all its
    experts afresh (even a one-layer model's repeat of the last token's expert) and nothing is held
    beyond the layer that uses it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload.schedule import Key


class Admission(NamedTuple):
    slot: int
    victim: Key | None  # the evicted entry whose load the caller must cancel, if any


PRESENT = "present"  # prefetch of an entry already in the cache: refreshed, no transfer
DROPPED = "dropped"  # prefetch refused: every slot is protected


class Residency:
    def __init__(self, capacity: int, retain: bool = True):
        if capacity < 1:
            raise M2R2Error(f"cache capacity must be at least one slot, got {capacity}")
        self.capacity = capacity
        self.retain = retain
        self._lru: OrderedDict[Key, int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first: deterministic
        self._layer = -1
        self._needed: frozenset[Key] = frozenset()
        self._promised: set[Key] = set()

    def __contains__(self, key: Key) -> bool:
        return key in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def slot(self, key: Key) -> int:
        return self._lru[key]

    def lru_order(self) -> list[Key]:
        return list(self._lru)

    def begin_token(self) -> None:
        self._promised.clear()

    def begin_layer(self, layer: int, needed) -> list[Key]:
        """Enter a layer step; returns the entries evicted (only with retain=False)."""
        self._layer, self._needed = layer, frozenset(needed)
        self._promised = {k for k in self._promised if k[0] > layer}  # a past layer's promise is void
        if self.retain:
            return []
        gone = list(self._lru)  # released after their layer computed, even if needed again now
        for k in gone:
            self._free.append(self._lru.pop(k))
        return gone

    def prefetch(self, key: Key) -> Admission | str:
        """An Admission (load it into the slot), PRESENT or DROPPED."""
        if key in self._lru:
            self._lru.move_to_end(key)
            self._promised.add(key)
            return PRESENT
        got = self._admit(key, self._needed | self._promised)
        if got is None:
            return DROPPED
        self._promised.add(key)
        return got

    def demand(self, key: Key) -> Admission | None:
        """None when present (a hit in the bookkeeping sense; the load may still be pending)."""
        if key in self._lru:
            self._lru.move_to_end(key)
            return None
        got = self._admit(key, self._needed)
        if got is None:
            raise M2R2Error(
                f"no evictable slot for expert {key}: all {self.capacity} hold experts layer {self._layer} needs"
            )
        return got

    def _admit(self, key: Key, protected) -> Admission | None:
        victim = None
        if self._free:
            slot = self._free.pop()
        else:
            victim = next((k for k in self._lru if k not in protected), None)
            if victim is None:
                return None
            slot = self._lru.pop(victim)
            self._promised.discard(victim)
        self._lru[key] = slot
        return Admission(slot, victim)
