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
  * A promise ends when its layer starts (from then the layer's real needs protect what it uses) or
    when the token ends (requests never cross tokens).
  * A wrong guess is released when its layer starts: an entry a prefetch admitted for layer j that
    layer j does not need leaves the cache as j starts (its queued transfer is cancelled, a finished
    one freed), in every prefetching policy alike. Otherwise, behind a slow link, guesses that are
    already wrong would keep their slots and still queue for the wire ahead of the next useful
    prefetches. (An expert the cache held before the guess named it is not a guess: it stays.)
  * retain=False (on-demand): at each layer start every entry is evicted, so each layer loads all its
    experts afresh (even a one-layer model's repeat of the last token's expert) and nothing is held
    beyond the layer that uses it.

evict="predicted" (m2r2_aot) replaces the LRU victim and the promises with a Belady-like order over
what the token's predictions say (`hint`: the (layer, expert) pairs predicted for this token, known
before their layers run, requested or not; a prefetch request is a prediction too). With the current
layer l, an entry is
    needed     by layer l: never a victim;
    predicted  for a later layer j > l of this token: used in j - l layers, if the prediction holds;
    neither    not predicted to be used again in this token (a past layer's expert, an unnamed one).
A victim is the least recently used `neither` entry; failing that, the `predicted` entry of the
furthest layer (the least recently used among that layer's). A prefetch for layer j may only take a
`neither` entry or a `predicted` one of a layer beyond j (it would be needed after j): otherwise it is
DROPPED. A demand may take any `predicted` entry. Predictions are for the token being decoded: they
end with it, and a past layer's prediction is void once the layer starts.

evict="scored" (m2r2_aot's default) ranks every entry by a keep value that weighs both signals, the
prediction for this token and the recent use (`Scoring`):
    value = weight * p   +   u
where p is the probability, hinted for this token, that the entry's later layer uses it (0 for the
current or a past layer, or when no hint names it), and u the entry's decayed use count: every token
multiplies it by `decay`, every use adds 1 (so an expert used by the last few tokens keeps a high u,
one used once long ago a low one). The victim is the lowest value among the entries the current
layer does not need (the least recently used of equals). A prefetch may only take an entry of lower
value than its own (weight * its hinted p + its u): otherwise it is DROPPED, so a less certain guess
never displaces a surer one or a much used expert. A demand may take any entry the layer does not
need. The use counts persist across tokens (they are the cache's history), the hinted p end with the
token.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload.schedule import Key, Scoring


class Admission(NamedTuple):
    slot: int
    victim: Key | None  # the evicted entry whose load the caller must cancel, if any


PRESENT = "present"  # prefetch of an entry already in the cache: refreshed, no transfer
DROPPED = "dropped"  # prefetch refused: every slot is protected


EVICTIONS = ("lru", "predicted", "scored")


class Residency:
    def __init__(self, capacity: int, retain: bool = True, evict: str = "lru", scoring: Scoring | None = None):
        if capacity < 1:
            raise M2R2Error(f"cache capacity must be at least one slot, got {capacity}")
        if evict not in EVICTIONS:
            raise M2R2Error(f"unknown eviction rule {evict!r}: choose from {', '.join(EVICTIONS)}")
        if (scoring is not None) != (evict == "scored"):
            raise M2R2Error("a Scoring goes with evict='scored' and only with it")
        self.capacity = capacity
        self.retain = retain
        self.evict = evict
        self.scoring = scoring
        self._uses: dict[Key, float] = {}  # evict="scored": decayed use counts (kept across tokens)
        self._used_now: set[Key] = set()  # used by the current token (counted once)
        self._p: dict[Key, float] = {}  # evict="scored": this token's hinted probabilities, later layers
        self._lru: OrderedDict[Key, int] = OrderedDict()  # key -> slot, least recently used first
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out slot 0 first: deterministic
        self._layer = -1
        self._needed: frozenset[Key] = frozenset()
        self._promised: set[Key] = set()
        self._predicted: set[Key] = set()  # evict="predicted": this token's predictions for later layers
        self._guesses: set[Key] = set()  # admitted by a prefetch, not demanded since

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
        self._predicted.clear()
        self._p.clear()
        self._used_now.clear()
        if self.scoring is not None:
            d = self.scoring.decay
            self._uses = {k: u * d for k, u in self._uses.items() if u * d > 1e-9}
        self._layer = -1

    def begin_layer(self, layer: int, needed) -> list[Key]:
        """Enter a layer step; returns the entries released (the caller cancels or frees their loads):
        with retain=False every entry, else the wrong guesses for this layer."""
        self._layer, self._needed = layer, frozenset(needed)
        self._promised = {k for k in self._promised if k[0] > layer}  # a past layer's promise is void
        self._predicted = {k for k in self._predicted if k[0] > layer}
        if self.retain:
            gone = sorted(k for k in self._guesses if k[0] <= layer and k not in self._needed)
        else:
            gone = list(self._lru)  # released after their layer computed, even if needed again now
        for k in gone:
            self._free.append(self._lru.pop(k))
            self._guesses.discard(k)
        return gone

    def hint(self, keys, probs=None) -> None:
        """(layer, expert) pairs predicted for this token (only later layers count): evict="predicted"
        ranks victims by them; evict="scored" by `probs` (aligned with keys; None: 1 each), a repeated
        pair keeping its highest. No effect with evict="lru"."""
        keys = list(keys)
        if self.evict == "scored":
            probs = [1.0] * len(keys) if probs is None else list(probs)
            if len(probs) != len(keys):
                raise M2R2Error(f"hint: {len(keys)} keys but {len(probs)} probabilities")
            for k, p in zip(keys, probs):
                if k[0] > self._layer and p > self._p.get(k, -1.0):
                    self._p[k] = float(p)
        else:
            self._predicted.update(k for k in keys if k[0] > self._layer)

    def hinted(self, key: Key) -> float:
        """evict="scored": the probability hinted for this token that the entry's later layer uses it (0
        for the current or a past layer, or with no hint)."""
        return self._p.get(key, 0.0) if key[0] > self._layer else 0.0

    def value(self, key: Key) -> float:
        """evict="scored": the entry's keep value now (see the module docstring)."""
        return self.scoring.weight * self.hinted(key) + self._uses.get(key, 0.0)

    def has_free(self) -> bool:
        return bool(self._free)

    def cheapest(self) -> tuple[Key, float] | None:
        """evict="scored": the entry a demand would evict now and its value (None: all are needed). A
        prefetch evicts it too when its own value is higher, else it is DROPPED."""
        k = self._victim(frozenset(), self._layer)
        return None if k is None else (k, self.value(k))

    def peek(self, key: Key) -> Admission | str:
        """What `prefetch(key)` would do now (PRESENT, DROPPED, or the slot and victim), changing nothing."""
        if key in self._lru:
            return PRESENT
        if self._free:
            return Admission(self._free[-1], None)
        victim = self._victim(self._needed | self._promised, horizon=key[0], key=key)
        return DROPPED if victim is None else Admission(self._lru[victim], victim)

    def prefetch(self, key: Key) -> Admission | str:
        """An Admission (load it into the slot), PRESENT or DROPPED."""
        if self.evict == "predicted" and key[0] > self._layer:
            self._predicted.add(key)
        if key in self._lru:
            self._lru.move_to_end(key)
            self._promised.add(key)
            return PRESENT
        got = self._admit(key, self._needed | self._promised, horizon=key[0], key_prefetched=key)
        if got is None:
            return DROPPED
        self._promised.add(key)
        self._guesses.add(key)
        return got

    def demand(self, key: Key) -> Admission | None:
        """None when present (a hit in the bookkeeping sense; the load may still be pending)."""
        self._guesses.discard(key)
        if self.scoring is not None and key not in self._used_now:
            self._used_now.add(key)
            self._uses[key] = self._uses.get(key, 0.0) + 1.0
        if key in self._lru:
            self._lru.move_to_end(key)
            return None
        got = self._admit(key, self._needed, horizon=self._layer)
        if got is None:
            raise M2R2Error(
                f"no evictable slot for expert {key}: all {self.capacity} hold experts layer {self._layer} needs"
            )
        return got

    def _victim(self, protected, horizon: int, key: Key | None = None) -> Key | None:
        """`key`: the prefetched expert (None for a demand)."""
        if self.evict == "lru":
            return next((k for k in self._lru if k not in protected), None)
        if self.evict == "scored":
            best, low = None, self.value(key) if key is not None else float("inf")
            for k in self._lru:  # least recently used first: the first of equal values wins
                if k not in self._needed and (v := self.value(k)) < low:
                    best, low = k, v
            return best
        # Belady-like: an entry no prediction of this token names, least recently used first; else the
        # one predicted for the furthest layer beyond `horizon` (max keeps the first, i.e. the LRU, of ties)
        pred = self._predicted
        victim = next((k for k in self._lru if k not in self._needed and k not in pred), None)
        if victim is None:
            later = [k for k in self._lru if k in pred and k[0] > horizon and k not in self._needed]
            victim = max(later, key=lambda k: k[0], default=None)
        return victim

    def _admit(self, key: Key, protected, horizon: int, key_prefetched: Key | None = None) -> Admission | None:
        victim = None
        if self._free:
            slot = self._free.pop()
        else:
            victim = self._victim(protected, horizon, key_prefetched)
            if victim is None:
                return None
            slot = self._lru.pop(victim)
            self._promised.discard(victim)
            self._guesses.discard(victim)
        self._lru[key] = slot
        return Admission(slot, victim)
