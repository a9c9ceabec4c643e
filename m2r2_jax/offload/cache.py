"""A fixed-capacity expert cache in RAM in front of an ExpertStore, filled by one background loader.

    with ExpertCache(store, capacity) as cache:
        cache.begin_token()
        cache.begin_layer(l, experts_of_l)   # protects them; releases wrong guesses for l (retain=False: all)
        cache.hint([(l2, e), ...], probs)    # evict="predicted" / "scored": predictions that rank victims
        cache.prefetch(l2, e)                # returns at once; the loader thread reads it
        w = cache.get(l, e)                  # blocks until resident (the wait is the stall)

Slots are preallocated numpy rows (touched once up front so no load pays page faults); which expert
sits in which slot, and who evicts whom, is residency.Residency, the same bookkeeping the simulator
uses, so for a given schedule both hold the same experts. The bookkeeping changes only in the calls
above, never in the loader, so it is deterministic; only whether a load has landed by the time it is
needed (the hit rate, the stalls) depends on timing.

The loader is the one transfer channel: a single thread, demand loads ahead of queued prefetches, one
read at a time. One `_Load` (with an Event) per admitted entry is what makes a racing prefetch and
demand share a single read: `get` of a key whose load is queued moves that load to the demand queue
and waits on its Event. An evicted entry's queued load is cancelled; one already reading finishes
into its slot before the loader starts the slot's next load (one thread, in order), so a new owner
is never overwritten. The file reads (os.preadv) release the GIL, so they overlap the caller's
numpy compute.

Driven by ONE caller thread: the arrays `get` returns are views into a slot, valid until a later
call of this cache evicts that expert (never during the current layer: its experts are protected).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

import numpy as np

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload.residency import DROPPED, Admission, Residency
from m2r2_jax.offload.schedule import Key, Scoring
from m2r2_jax.offload.store import ExpertStore


class _Load:
    __slots__ = ("key", "slot", "state", "cancelled", "event", "error")

    def __init__(self, key: Key, slot: int):
        self.key, self.slot = key, slot
        self.state = "queued"  # -> "reading" -> "done"
        self.cancelled = False
        self.event = threading.Event()
        self.error: BaseException | None = None


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        capacity: int,
        retain: bool = True,
        cold: bool = True,
        evict: str = "lru",
        scoring: Scoring | None = None,
    ):
        self._store, self._cold = store, cold
        self._res = Residency(capacity, retain, evict, scoring)
        self._buf = np.empty((capacity, store.layout.stride // 4), np.float32)
        self._buf.fill(0.0)  # commit the pages now, not during the first loads
        self._cv = threading.Condition()
        self._demand: deque[_Load] = deque()
        self._prefetch: deque[_Load] = deque()
        self._loads: dict[Key, _Load] = {}  # the load that fills each entry of self._res
        self._closed = False
        self._reading = False  # the loader is inside a read
        self.hits = self.misses = self.dropped = self.started = 0
        self.stall_s = 0.0
        self.load_counts: Counter[Key] = Counter()  # reads started per expert
        self._thread = threading.Thread(target=self._loader, name="expert-loader", daemon=True)
        self._thread.start()

    # ---- the caller's side -------------------------------------------------------------------------

    def begin_token(self) -> None:
        with self._cv:
            self._res.begin_token()

    def begin_layer(self, layer: int, experts) -> None:
        with self._cv:
            self._check_open()
            for key in self._res.begin_layer(layer, [(layer, int(e)) for e in experts]):
                self._cancel(key)

    def hint(self, keys, probs=None) -> None:
        """Predicted (layer, expert) pairs of this token (and, evict="scored", their probabilities of
        use) that rank victims; no load."""
        with self._cv:
            self._res.hint([(int(layer), int(e)) for layer, e in keys], probs)

    def prefetch(self, layer: int, expert: int) -> str:
        """'queued', 'present' (refreshed) or 'dropped' (every slot protected)."""
        key = (int(layer), int(expert))
        with self._cv:
            self._check_open()
            got = self._res.prefetch(key)
            if isinstance(got, Admission):
                self._queue(key, got, self._prefetch)
                return "queued"
            self.dropped += got == DROPPED
            return got

    def get(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """The expert's gate / up / down, waiting for its load if needed (the stall)."""
        key = (int(layer), int(expert))
        with self._cv:
            self._check_open()
            got = self._res.demand(key)
            if got is None:
                ld = self._loads[key]
                hit = ld.event.is_set()
                if ld.state == "queued" and ld in self._prefetch:  # jump ahead of the other prefetches
                    self._prefetch.remove(ld)
                    self._demand.append(ld)
            else:
                ld, hit = self._queue(key, got, self._demand), False
            self.hits += hit
            self.misses += not hit
        if not hit:
            t0 = time.perf_counter()
            ld.event.wait()
            self.stall_s += time.perf_counter() - t0
        if ld.error is not None:
            raise M2R2Error(f"loading expert {key} from {self._store.path}: {ld.error}")
        if ld.cancelled:
            raise M2R2Error(f"expert {key}: the cache was closed while waiting for it")
        return self._store.layout.views(self._buf[ld.slot])

    def wait_idle(self) -> None:
        """Wait until every queued load has been read (the queue drained, the loader idle)."""
        with self._cv:
            while (self._demand or self._prefetch or self._reading) and not self._closed:
                self._cv.wait()

    def close(self) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            for ld in (*self._demand, *self._prefetch):
                ld.cancelled = True
                ld.event.set()
            self._demand.clear()
            self._prefetch.clear()
            self._cv.notify_all()
        self._thread.join()

    def __enter__(self) -> ExpertCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def bytes_moved(self) -> int:
        return self.started * self._store.layout.stride

    # ---- internals (callers hold self._cv) ---------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise M2R2Error("expert cache is closed")

    def _queue(self, key: Key, got: Admission, queue: deque) -> _Load:
        if got.victim is not None:
            self._cancel(got.victim)
        ld = self._loads[key] = _Load(key, got.slot)
        queue.append(ld)
        self._cv.notify()
        return ld

    def _cancel(self, key: Key) -> None:
        ld = self._loads.pop(key)
        if ld.state == "queued":
            (self._demand if ld in self._demand else self._prefetch).remove(ld)
            ld.cancelled = True
            ld.event.set()
        # a read in progress completes into its old slot before the loader starts the next one

    # ---- the loader thread -------------------------------------------------------------------------

    def _loader(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._demand or self._prefetch):
                    self._cv.wait()
                if self._closed:
                    return
                ld = (self._demand or self._prefetch).popleft()
                ld.state = "reading"
                self._reading = True
                self.started += 1
                self.load_counts[ld.key] += 1
            try:
                self._store.read_into(*ld.key, self._buf[ld.slot], cold=self._cold)
            except Exception as e:  # handed to whoever waits for this expert
                ld.error = e
            ld.event.set()
            with self._cv:
                ld.state = "done"
                self._reading = False
                self._cv.notify_all()  # for wait_idle
