"""m2r2_jax.offload: policies on handcrafted traces, the simulator against hand-computed timelines, the
residency rules, and the real (threaded, file-backed) engine giving identical outputs under every policy."""

import functools
import math

import numpy as np
import pytest

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload import (
    LINKS,
    ExpertCache,
    ExpertLayout,
    ExpertStore,
    Link,
    Residency,
    RoutingTrace,
    Schedule,
    aot_window,
    build_schedule,
    capacity_slots,
    check_aot_options,
    gate_prefetch,
    lru,
    m2r2_aot,
    ondemand,
    run_real,
    simulate,
    simulate_policies,
    speedups,
)
from m2r2_jax.offload.residency import DROPPED, PRESENT, Admission
from m2r2_jax.offload.schedule import Scoring

# 0.5 ms latency + 1000 B at 1 MB/s = 1.5 ms per expert transfer: round numbers for hand timelines
LINK = Link("toy", 1e6, 0.5e-3)
NBYTES = 1000


def _ids(rows):
    return np.array(rows, dtype=np.int64)


# ---- policies -------------------------------------------------------------------------------------


def test_lru_hit_rate_on_three_tokens():
    # L=2 layers, E=4, k=1; token 2 brings a new layer-0 expert
    tr = RoutingTrace(4, _ids([[[0], [1]], [[0], [1]], [[2], [1]]]))
    two = simulate(lru(tr, 0.25), LINK, NBYTES, layer_ms=1.0)  # 2 of 8 slots: both experts stay
    assert (two.hits, two.needs, two.loads) == (3, 6, 3)  # t1 hits both; t2 misses (0,2), hits (1,1)
    assert two.hit_rate == 0.5 and two.bytes_moved == 3 * NBYTES
    one = simulate(lru(tr, 0.125), LINK, NBYTES, layer_ms=1.0)  # 1 slot: each layer evicts the other
    assert (one.hits, one.loads) == (0, 6)
    base = simulate(ondemand(tr), LINK, NBYTES, layer_ms=1.0)
    assert (base.hits, base.loads, base.prefetch_recall) == (0, 6, 0.0)


def test_ondemand_keeps_nothing_beyond_the_current_layer():
    tr = RoutingTrace(4, _ids([[[0]], [[0]]]))  # one layer: an LRU would hit on token 1
    assert simulate(lru(tr, 0.5), LINK, NBYTES, 1.0).hits == 1
    s = ondemand(tr)
    assert (s.capacity, s.retain) == (1, False)
    assert simulate(s, LINK, NBYTES, 1.0).hits == 0


def test_gate_prefetch_requests_and_recall():
    needed = _ids([[[0], [1], [2]], [[3], [1], [0]]])
    gate = _ids([[[3], [1], [3]], [[3], [2], [0]]])  # row 0 ignored; right at (0,1) and (1,2) only
    s = gate_prefetch(RoutingTrace(4, needed, gate_pred=gate), 0.5)
    assert s.requests[0] == (((1, 1),), ((2, 3),), ())  # at layer l: layer l+1's gate on l's input
    assert s.requests[1] == (((1, 2),), ((2, 0),), ())
    m = simulate(s, LINK, NBYTES, 1.0)
    assert m.prefetched == 2 and m.prefetch_recall == pytest.approx(1 / 3)


def test_m2r2_prefetches_are_issued_when_known_never_for_the_current_layer():
    needed = _ids([[[0], [1], [2]]])
    pred = _ids([[[0, 3], [1, 1], [2, 3]]])  # a repeated id is requested once
    s = m2r2_aot(RoutingTrace(4, needed, m2r2_pred=pred, m2r2_avail=np.array([0, 0, 1])), 0.5, variant="window")
    # layer 0's guess is never fetched (at its step its router has spoken); layer 2 is known at step 1
    assert s.requests[0] == (((1, 1),), ((2, 2), (2, 3)), ())
    assert s.hints[0] == (((1, 1),), ((2, 2), (2, 3)), ())
    two, avail = np.concatenate([needed, needed]), _ids([[0, 1, 1], [0, 0, 0]])
    per_token = RoutingTrace(4, two, m2r2_pred=np.concatenate([pred, pred]), m2r2_avail=avail)
    s2 = m2r2_aot(per_token, 0.5, variant="window")
    assert s2.requests[0] == ((), ((2, 2), (2, 3)), ())  # layer 1 known only at its own step: no fetch
    assert s2.requests[1] == (((1, 1), (2, 2), (2, 3)), (), ())
    assert (s2.evict, s2.capacity) == ("predicted", 6)


def _cyclic_trace(T=6, L=6, E=4, k=1, seed=0, perfect=True):
    """Random needs; m2r2 predicts them exactly (perfect) or with one wrong id per token."""
    rng = np.random.default_rng(seed)
    needed = np.stack([np.stack([rng.permutation(E)[:k] for _ in range(L)]) for _ in range(T)])
    pred = needed.copy()
    if not perfect:
        for t in range(T):
            layer = int(rng.integers(1, L))
            pred[t, layer, 0] = (needed[t, layer, 0] + 1) % E if needed[t, layer, 0] + 1 not in needed[t, layer] else 0
    return RoutingTrace(E, needed, gate_pred=needed, m2r2_pred=pred, m2r2_avail=np.zeros(L, np.int64))


def test_m2r2_window_is_capacity_aware_and_issued_in_layer_order():
    tr = _cyclic_trace(T=2, L=6, E=4, k=1)
    aot = functools.partial(m2r2_aot, variant="window")
    s = aot(tr, 4 / 24)  # 4 slots: the current layer's 1 + a window of 3 layers' 1 prediction
    assert aot_window(s.capacity, 1, 1, 6) == 3
    for t in (1, 0):
        p = [(layer, int(tr.m2r2_pred[t, layer, 0])) for layer in range(6)]
        # step 0: layers 1..3; then one layer enters the window as each layer starts
        assert s.requests[t] == ((p[1], p[2], p[3]), (p[4],), (p[5],), (), (), ())
    one = aot(tr, 4 / 24, window=1)
    assert one.requests[0] == ((p[1],), (p[2],), (p[3],), (p[4],), (p[5],), ())
    assert aot(tr, 4 / 24, window=9).requests == s.requests  # the knob never exceeds what fits
    assert all(r == () for per in aot(tr, 4 / 24, window=0).requests for r in per)
    assert aot(tr, 1 / 24).requests == tuple(((),) * 6 for _ in range(2))  # k slots: nothing fits
    assert aot_window(60, 2, 2, 30) == 29 and aot_window(59, 2, 2, 30) == 28 and aot_window(30, 2, 3, 30, 4) == 4


def _replay(schedule):
    """The schedule through Residency alone: every admission (step, key, kind, victim) and every drop."""
    res = schedule.residency()
    log, drops = [], []
    for t in range(schedule.num_tokens):
        res.begin_token()
        for l in range(schedule.num_layers):
            need = schedule.need(t, l)
            res.begin_layer(l, need)
            res.hint(*schedule.hint_at(t, l))
            for key in schedule.requests[t][l]:
                got = res.prefetch(key)
                drops += [(t, l, key)] if got == DROPPED else []
                if isinstance(got, Admission):
                    log.append((t, l, key, "prefetch", got.victim))
                elif got == PRESENT:
                    log.append((t, l, key, "present", None))
            for key in need:
                got = res.demand(key)
                log.append((t, l, key, "hit" if got is None else "miss", None if got is None else got.victim))
    return log, drops


@pytest.mark.parametrize("frac", [8 / 48, 12 / 48, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("perfect", [True, False])
def test_m2r2_window_is_never_dropped_and_never_evicts_what_is_needed(frac, seed, perfect):
    tr = _cyclic_trace(T=8, L=8, E=6, k=2, seed=seed, perfect=perfect)
    s = m2r2_aot(tr, frac, variant="window")
    log, drops = _replay(s)
    assert drops == []  # the window fits: no request of it is refused
    for t, l, key, kind, victim in log:
        assert victim is None or victim not in s.need(t, l)  # never an expert the current layer needs
        if kind == "prefetch" and victim is not None:  # never an expert predicted nearer than its own
            nearer = {(j, int(e)) for j in range(l + 1, key[0] + 1) for e in tr.m2r2_pred[t, j]}
            assert victim not in nearer, (t, l, key, victim)
    if perfect:  # every layer after the first finds its experts already admitted
        assert all(kind == "hit" for t, l, key, kind, _ in log if kind in ("hit", "miss") and l >= 1)
    W = aot_window(s.capacity, 2, 2, 8)
    assert W >= 2 and m2r2_aot(tr, frac, window=W + 3, variant="window").requests == s.requests


def test_predicted_eviction_order_is_belady_like():
    r = Residency(4, evict="predicted")
    r.begin_token()
    r.begin_layer(0, [(0, 0)])
    r.hint([(1, 1), (3, 3), (0, 7)])  # (0, 7): the current layer's, ignored
    assert r.demand((0, 0)) == Admission(0, None)
    for key in [(3, 3), (1, 1), (2, 5)]:  # (2, 5) is not predicted
        assert isinstance(r.prefetch(key), Admission)  # (2, 5) is a request: it becomes a prediction too
    r.begin_layer(1, [(1, 1)])  # (0, 0) is now a past layer's: nothing predicts it again this token
    assert r.prefetch((2, 6)) == Admission(0, (0, 0))  # `neither` goes first
    assert r.prefetch((2, 4)) == Admission(1, (3, 3))  # then the furthest prediction, beyond layer 2
    assert r.prefetch((3, 2)) == DROPPED  # only (2, *) left besides the needed (1, 1): all nearer
    assert r.demand((1, 1)) is None and r.demand((1, 9)) == Admission(3, (2, 5))  # the LRU of layer 2's
    r.begin_token()  # predictions end with their token: plain LRU among the non-needed
    r.begin_layer(0, [(0, 1)])
    assert r.lru_order() == [(2, 6), (2, 4), (1, 1), (1, 9)]
    assert r.demand((0, 1)) == Admission(0, (2, 6))


def test_capacity_is_a_floored_fraction_of_all_experts():
    assert capacity_slots(0.25, 4, 8, 2) == 8
    assert capacity_slots(0.29, 10, 10, 2) == 29  # not 28 from 0.29 * 100 = 28.999...
    assert capacity_slots(1.0, 4, 8, 2) == 32


# ---- m2r2_aot, the scored variant -----------------------------------------------------------------


def _sticky_trace(T=12, L=6, E=8, k=2, seed=0, noise=0.5, probs=True):
    """Needs that persist from token to token (each expert stays with p 0.6), and fast-stream router
    probabilities that favour the truth through noise."""
    rng = np.random.default_rng(seed)
    needed = np.zeros((T, L, k), np.int64)
    for t in range(T):
        for l in range(L):
            keep = [int(e) for e in needed[t - 1, l] if rng.random() < 0.6] if t else []
            needed[t, l] = (keep + [int(e) for e in rng.permutation(E) if e not in keep])[:k]
    logits = noise * rng.standard_normal((T, L, E))
    np.put_along_axis(logits, needed, np.take_along_axis(logits, needed, -1) + 1.0, -1)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    pred = np.argsort(-p, -1, kind="stable")[..., :k]
    kw = dict(m2r2_probs=p) if probs else {}
    return RoutingTrace(E, needed, gate_pred=needed, m2r2_pred=pred, m2r2_avail=np.zeros(L, np.int64), **kw)


def test_scored_eviction_weighs_the_prediction_and_the_use_count():
    r = Residency(4, evict="scored", scoring=Scoring(decay=0.5, weight=10.0))
    r.begin_token()
    r.begin_layer(0, [(0, 0)])
    r.hint([(1, 1), (2, 2), (0, 7)], [0.9, 0.1, 1.0])  # (0, 7): the current layer's, ignored
    assert r.demand((0, 0)) == Admission(0, None)
    for key in [(1, 1), (2, 2), (3, 3)]:
        assert isinstance(r.prefetch(key), Admission)  # free slots
    assert [r.value(key) for key in [(0, 0), (1, 1), (2, 2), (3, 3), (0, 7)]] == [1.0, 9.0, 1.0, 0.0, 0.0]
    assert r.begin_layer(1, [(1, 1)]) == [] and r.demand((1, 1)) is None
    assert r.cheapest() == ((3, 3), 0.0)  # unpredicted, never used
    assert r.peek((2, 5)) == DROPPED and (2, 5) not in r  # no value of its own: it may not evict anything
    r.hint([(2, 5)], [0.5])
    assert r.peek((2, 5)) == Admission(3, (3, 3)) and (3, 3) in r  # peek changes nothing
    assert r.prefetch((2, 5)) == Admission(3, (3, 3))
    # (0, 0): used once (1.0); (2, 2): p 0.1 (1.0); equal values: the least recently used goes first
    assert r.demand((1, 9)) == Admission(0, (0, 0))
    r.begin_token()  # hinted probabilities end with the token, use counts decay (x 0.5)
    r.begin_layer(0, [(0, 4)])
    assert r.value((1, 1)) == 0.5 and r.value((2, 2)) == 0.0 and r.value((1, 9)) == 0.5
    assert r.demand((0, 4)) == Admission(2, (2, 2))  # the wrong, never used guess goes first


def test_scored_speculation_is_sized_to_the_compute_that_hides_it():
    for probs in (True, False):
        tr = _sticky_trace(probs=probs)
        count = {}
        for c, cap in ((0.0, None), (0.5, None), (1.5, None), (100.0, None), (100.0, 1), (None, None)):
            s = m2r2_aot(tr, 0.5, compute_per_transfer=c, max_spec=cap)
            assert (s.evict, s.scoring) == ("scored", Scoring(0.9, 16.0)) and s.hints is not None
            most = {0.0: 0, 0.5: 1, 1.5: 2}.get(c, cap or 10**9)  # ceil(c) per layer, or the cap
            for per in s.requests:
                for l, reqs in enumerate(per):
                    assert len(reqs) <= most and all(l < layer <= l + 2 for layer, _ in reqs)  # the window: 2
            log, drops = _replay(s)
            assert drops == [] and all(kind != "present" for *_, kind, _ in log)  # it knows the cache
            count[c, cap] = sum(kind == "prefetch" for *_, kind, _ in log)
        # nothing hidden: a guess pays only when sure beyond certainty; all hidden: every likely one moves
        assert count[0.0, None] == 0 < count[1.5, None] <= count[100.0, None] == count[None, None]
        assert count[100.0, 1] <= count[100.0, None]
        assert all(r == () for per in m2r2_aot(tr, 0.5, max_spec=0).requests for r in per)


def test_scored_schedule_decides_on_what_is_known_at_each_step():
    tr = _sticky_trace(T=10, seed=4)
    t, s = 6, 2
    needed = tr.needed.copy()
    needed[t, s + 1 :] = (needed[t, s + 1 :] + 1) % tr.num_experts  # the layers after step s, unknown at it
    needed[t + 1 :] = (needed[t + 1 :] + 3) % tr.num_experts  # and every later token
    alt = RoutingTrace(
        tr.num_experts, needed, m2r2_pred=tr.m2r2_pred, m2r2_avail=tr.m2r2_avail, m2r2_probs=tr.m2r2_probs
    )
    for c in (0.5, 3.0, None):
        a, b = m2r2_aot(tr, 0.5, compute_per_transfer=c), m2r2_aot(alt, 0.5, compute_per_transfer=c)
        assert a.requests[:t] == b.requests[:t] and a.requests[t][: s + 1] == b.requests[t][: s + 1]
        assert a.hints[: t + 1] == b.hints[: t + 1] and a.hint_probs[: t + 1] == b.hint_probs[: t + 1]
        assert a.requests != b.requests or a.hints != b.hints  # the changes do reach later decisions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scored_m2r2_never_stalls_more_than_ondemand(seed):
    tr = _sticky_trace(T=16, seed=seed)
    x = LINK.transfer_s(NBYTES) * 1e3  # 1.5 ms
    for layer_ms in (0.1, 1.4, 6.0):  # the link the bottleneck .. compute hides several transfers
        base = simulate(ondemand(tr), LINK, NBYTES, layer_ms, 0.25)
        for frac in (2 / 48, 12 / 48, 24 / 48):
            m = simulate(m2r2_aot(tr, frac, compute_per_transfer=layer_ms / x), LINK, NBYTES, layer_ms, 0.25)
            assert m.stall_ms <= base.stall_ms and m.needs == base.needs, (layer_ms, frac)


# ---- residency rules ------------------------------------------------------------------------------


def test_prefetch_never_evicts_an_expert_the_current_layer_needs():
    r = Residency(2)
    r.begin_token()
    r.begin_layer(0, [(0, 0), (0, 1)])
    assert r.demand((0, 0)) == Admission(0, None) and r.demand((0, 1)) == Admission(1, None)
    assert r.prefetch((1, 5)) == DROPPED  # full, and both entries are needed now
    assert r.lru_order() == [(0, 0), (0, 1)]
    r.begin_layer(1, [(1, 2)])
    assert r.prefetch((1, 5)) == Admission(0, (0, 0))  # full cache: the LRU entry goes
    assert r.prefetch((1, 5)) == PRESENT


def test_prefetch_keeps_earlier_promises_and_demand_may_break_them():
    r = Residency(2)
    r.begin_token()
    r.begin_layer(0, [(0, 0)])
    r.demand((0, 0))
    assert r.prefetch((2, 2)) == Admission(1, None)
    assert r.prefetch((2, 3)) == DROPPED  # (0,0) needed now, (2,2) promised to a later layer
    r.begin_layer(1, [(1, 1), (1, 4)])
    assert r.demand((1, 1)) == Admission(0, (0, 0))
    assert r.demand((1, 4)) == Admission(1, (2, 2))  # the model cannot wait: demand beats a promise


def test_wrong_guesses_are_released_when_their_layer_starts():
    for evict in ("lru", "predicted"):
        r = Residency(4, evict=evict)
        r.begin_token()
        r.begin_layer(0, [(0, 0)])
        assert isinstance(r.prefetch((1, 1)), Admission) and isinstance(r.prefetch((1, 2)), Admission)
        assert isinstance(r.prefetch((2, 3)), Admission) and r.demand((0, 0)) == Admission(3, None)
        assert r.begin_layer(1, [(1, 1)]) == [(1, 2)]  # the wrong guess goes; (2, 3)'s layer is ahead
        assert r.lru_order() == [(1, 1), (2, 3), (0, 0)] and r.demand((1, 1)) is None
        assert r.begin_layer(2, [(2, 4)]) == [(2, 3)] and r.demand((2, 4)) == Admission(2, None)
        r.begin_token()
        r.begin_layer(0, [(0, 0)])
        assert r.prefetch((1, 1)) == PRESENT  # held before this guess named it: not a guess, it stays
        assert r.begin_layer(1, [(1, 5)]) == [] and (1, 1) in r


def test_simulated_prefetch_into_a_full_cache_is_dropped_not_stealing():
    # 2 slots; at step 0 the gate asks for three layer-1 experts: the third finds both slots promised
    tr = RoutingTrace(4, _ids([[[0], [1]]]), gate_pred=_ids([[[0, 0, 0], [1, 2, 3]]]))
    m = simulate(gate_prefetch(tr, 2 / 8), LINK, NBYTES, 1.0)
    # then (0,0)'s demand takes (1,1)'s slot before its transfer starts (the model cannot wait), and
    # layer 1 loads (1,1) again on demand: transfers (0,0), (1,2), (1,1)
    assert (m.dropped_prefetches, m.loads, m.hits) == (1, 3, 0)


# ---- simulator ------------------------------------------------------------------------------------


def _three_layer_trace(m2r2_layer0=0):
    needed = _ids([[[0], [1], [2]]])
    return RoutingTrace(
        4,
        needed,
        gate_pred=needed,
        m2r2_pred=_ids([[[m2r2_layer0], [1], [2]]]),
        m2r2_avail=np.array([0, 0, 0]),
    )


def test_simulator_matches_hand_computed_timelines():
    # transfers 1.5 ms; layers compute 4, 0.5, 0.5 ms; 0.25 ms per token outside the MoE layers
    res = simulate_policies(
        _three_layer_trace(), 1.0, LINK, NBYTES, layer_ms=(4.0, 0.5, 0.5), token_ms=0.25, variant="window"
    )
    # ondemand/lru: every layer waits 1.5 ms
    for p in ("ondemand", "lru"):
        assert res[p].stall_ms == pytest.approx(4.5) and res[p].total_ms == pytest.approx(9.75)
    # gate: (1,b) loads 1.5-3.0 under layer 0 (hit); (2,c) is asked at 5.5, lands at 7.0, layer 2
    # starts at 6.0 -> 1 ms stall
    g = res["gate_prefetch"]
    assert (g.hits, g.loads) == (1, 3)
    assert g.stall_ms == pytest.approx(2.5) and g.total_ms == pytest.approx(7.75)
    # m2r2: layers 1 and 2 asked at 0, behind (0,a)'s demand: (1,b) 1.5-3.0 and (2,c) 3.0-4.5 under layer 0
    a = res["m2r2_aot"]
    assert (a.hits, a.loads, a.prefetch_recall) == (2, 3, pytest.approx(2 / 3))
    assert a.stall_ms == pytest.approx(1.5) and a.total_ms == pytest.approx(6.75)
    assert a.stall_ms_per_token == pytest.approx(1.5) and a.tokens_per_s == pytest.approx(1000 / 6.75)
    assert speedups(res)["m2r2_aot"] == pytest.approx(9.75 / 6.75)


def test_a_demand_miss_jumps_the_queued_prefetches():
    # m2r2 guesses layer 1 wrong (expert 3): (0,0) loads first, at 0, not after the two prefetches
    needed = _ids([[[0], [1], [2]]])
    tr = RoutingTrace(4, needed, m2r2_pred=_ids([[[0], [3], [2]]]), m2r2_avail=np.array([0, 0, 0]))
    a = simulate(m2r2_aot(tr, 1.0, variant="window"), LINK, NBYTES, (4.0, 0.5, 0.5), 0.25)
    # (0,0) 0-1.5; (1,3) 1.5-3.0 (wasted); (2,2) 3.0-4.5; layer 0 1.5-5.5; (1,1) 5.5-7.0 on demand;
    # layer 1 7.0-7.5; layer 2 hits, 7.5-8.0; + 0.25
    assert a.stall_ms == pytest.approx(3.0) and a.total_ms == pytest.approx(8.25)
    assert (a.hits, a.loads, a.bytes_moved) == (1, 4, 4 * NBYTES)
    assert a.prefetch_recall == pytest.approx(1 / 3)


def test_windowed_m2r2_stalls_less_than_lru_and_gate_when_the_link_is_the_bottleneck():
    # 1.5 ms per transfer, 1 ms per layer: one layer of lead (the gate) cannot hide a load, a window can
    tr = _cyclic_trace(T=6, L=6, E=4, k=1, seed=3)
    frac = 6 / 24  # one token's worth of slots
    res = simulate_policies(tr, frac, LINK, NBYTES, layer_ms=1.0, token_ms=0.5, variant="window")
    a, g, lr = res["m2r2_aot"], res["gate_prefetch"], res["lru"]
    assert a.stall_ms < g.stall_ms < lr.stall_ms and a.tokens_per_s > g.tokens_per_s
    assert a.dropped_prefetches == 0 and a.prefetch_recall == pytest.approx(5 / 6)
    w1 = simulate(m2r2_aot(tr, frac, window=1, variant="window"), LINK, NBYTES, 1.0, 0.5)
    assert a.stall_ms < w1.stall_ms  # the lead is what buys it


def test_presets_and_determinism():
    assert LINKS["pcie4"].bandwidth_bytes_per_s == 25e9 and LINKS["pcie5"].bandwidth_bytes_per_s == 50e9
    assert 3e9 <= LINKS["nvme3"].bandwidth_bytes_per_s < LINKS["nvme4"].bandwidth_bytes_per_s <= 7e9
    tr = _random_trace(np.random.default_rng(0))
    one = simulate_policies(tr, 0.5, LINKS["nvme4"], 2_000_000, 0.2, 0.1)
    assert one == simulate_policies(tr, 0.5, LINKS["nvme4"], 2_000_000, 0.2, 0.1)


# ---- the real engine ------------------------------------------------------------------------------

L, E, K, H, I = 3, 4, 2, 8, 16


def _weights(layer, expert):
    rng = np.random.default_rng(100 * layer + expert)
    return {
        "gate": rng.standard_normal((H, I), np.float32),
        "up": rng.standard_normal((H, I), np.float32),
        "down": rng.standard_normal((I, H), np.float32) * np.float32(0.1),
    }


def _random_trace(rng, T=5):
    needed = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(L)]) for _ in range(T)])
    noisy = np.where(rng.random(needed.shape) < 0.5, needed, rng.integers(0, E, needed.shape))
    probs = rng.dirichlet(np.ones(E), needed.shape[:2])  # not the truth's: only a confidence to rank by
    avail = np.array([0, 0, 1])
    return RoutingTrace(E, needed, gate_pred=noisy, m2r2_pred=needed, m2r2_avail=avail, m2r2_probs=probs)


def _swiglu_chain():
    """compute_fn: x <- x + sum over experts of SwiGLU(x); returns a copy of x after each layer."""
    x = np.full(H, 0.1, np.float32)

    def compute(layer, weights):
        nonlocal x
        for e in sorted(weights):
            w = weights[e]
            g = x @ w["gate"]
            x = x + ((g / (1 + np.exp(-g))) * (x @ w["up"])) @ w["down"]
        return x.copy()

    return compute


@pytest.fixture
def store(tmp_path):
    with ExpertStore.write(tmp_path / "experts.bin", ExpertLayout(L, E, H, I), _weights) as s:
        yield s


def test_store_round_trips_weights_bit_exactly(store, tmp_path):
    for layer in range(L):
        for expert in range(E):
            got, want = store.read(layer, expert), _weights(layer, expert)
            for name in ("gate", "up", "down"):
                assert got[name].dtype == np.float32 and np.array_equal(got[name], want[name])
    assert store.layout.stride == 4096 and store.layout.offset(1, 2) == 4096 * (1 + 1 * E + 2)
    (tmp_path / "junk.bin").write_bytes(b"not a store" * 500)
    with pytest.raises(M2R2Error, match="bad magic"):
        ExpertStore(tmp_path / "junk.bin")


def test_real_engine_outputs_are_identical_under_every_policy(store):
    tr = _random_trace(np.random.default_rng(1))
    ref = [[None] * L for _ in range(tr.num_tokens)]  # plain in-memory reference
    compute = _swiglu_chain()
    for t in range(tr.num_tokens):
        for layer in range(L):
            ref[t][layer] = compute(layer, {int(e): _weights(layer, int(e)) for e in tr.needed[t, layer]})
    runs = [(p, None, {}) for p in ("ondemand", "lru", "gate_prefetch", "m2r2_aot")]
    runs += [("m2r2_aot", 0, {}), ("m2r2_aot", 1, {}), ("m2r2_aot", None, {"variant": "window"})]
    runs += [("m2r2_aot", None, {"compute_per_transfer": c, "max_spec": 1}) for c in (0.0, 0.7)]
    for frac in (K / (L * E), 4 / (L * E), 0.5, 1.0):  # as tight as allowed (evictions, cancellations) .. all
        for p, window, aot in runs:
            s = build_schedule(p, tr, frac, window, **aot)
            run = run_real(s, store, _swiglu_chain())
            assert all(np.array_equal(a, b) for ra, rb in zip(run.outputs, ref) for a, b in zip(ra, rb)), (p, frac)
            m = run.metrics
            assert m.mode == "measured" and m.needs == tr.num_tokens * L * K and 0 <= m.hits <= m.needs
            assert m.bytes_moved == m.loads * store.layout.stride and m.total_ms > 0
            if frac == 1.0:  # nothing is evicted; only wrong guesses are released, loaded or not (timing)
                admitted = sum(kind in ("miss", "prefetch") for *_, kind, _ in _replay(s)[0])
                distinct = len({(layer, int(e)) for layer in range(L) for e in tr.needed[:, layer].ravel()})
                assert distinct <= m.loads <= admitted and distinct <= simulate(s, LINK, NBYTES, 0.1).loads <= admitted
                if p in ("ondemand", "lru"):  # no guesses: real loads = the simulator's = admissions
                    assert m.loads == simulate(s, LINK, NBYTES, 0.1).loads == admitted
            if p == "ondemand":
                assert m.hits == 0 and m.loads == m.needs
    assert len(run.layer_ms) == L and run.token_ms == 0.0


def test_prefetch_and_demand_share_one_read(store):
    with ExpertCache(store, L * E) as cache:
        cache.begin_token()
        for layer in range(L):
            cache.begin_layer(layer, range(E))
            for e in range(E):  # a prefetch racing the demand right behind it
                assert cache.prefetch(layer, e) == "queued"
                w = cache.get(layer, e)
                assert np.array_equal(w["down"], _weights(layer, e)["down"])
            assert cache.prefetch(layer, 0) == "present"
        assert set(cache.load_counts.values()) == {1} and len(cache.load_counts) == L * E
        assert cache.hits + cache.misses == L * E
    with pytest.raises(M2R2Error, match="closed"):
        cache.get(0, 0)


# ---- bad input ------------------------------------------------------------------------------------


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize("frac", [0.0, -0.5, 1.5, math.nan, "0.5"])
def test_capacity_fraction_outside_0_1_is_refused(frac):
    tr = RoutingTrace(4, _ids([[[0], [1]]]))
    with pytest.raises(M2R2Error, match="capacity fraction") as e:
        lru(tr, frac)
    _one_line(e)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(needed=_ids([[[0], [4]]])), r"expert ids must be in \[0, 4\)"),
        (dict(needed=_ids([[[0], [-1]]])), "expert ids"),
        (dict(needed=_ids([[0, 1]])), r"\[T, L, k\]"),
        (dict(needed=_ids([[[0, 0], [1, 2]]])), "repeats an expert id"),
        (dict(needed=np.zeros((1, 2, 1), np.float32)), "integer"),
        (dict(gate_pred=_ids([[[0]]])), "does not match"),
        (dict(m2r2_pred=_ids([[[0], [1]]])), "come together"),
        (dict(m2r2_pred=_ids([[[0], [1]]]), m2r2_avail=np.array([0, 2])), r"layer 1 must exist at a step in \[0, 1\]"),
        (dict(m2r2_pred=_ids([[[0], [1]]]), m2r2_avail=np.array([0, 0, 0])), "m2r2_avail"),
        (dict(m2r2_probs=np.full((1, 2, 4), 0.25)), "m2r2_probs needs m2r2_pred"),
        (
            dict(m2r2_pred=_ids([[[0], [1]]]), m2r2_avail=np.zeros(2, int), m2r2_probs=np.ones((1, 2, 3))),
            r"\[T, L, E\]",
        ),
        (
            dict(m2r2_pred=_ids([[[0], [1]]]), m2r2_avail=np.zeros(2, int), m2r2_probs=np.full((1, 2, 4), -0.1)),
            "finite",
        ),
    ],
)
def test_bad_traces_are_refused(kwargs, match):
    kwargs = {"needed": _ids([[[0], [1]]]), **kwargs}
    with pytest.raises(M2R2Error, match=match) as e:
        RoutingTrace(4, **kwargs)
    _one_line(e)


def test_other_bad_inputs_are_refused(store, tmp_path):
    tr = RoutingTrace(4, _ids([[[0], [1]]]))
    aot = RoutingTrace(4, tr.needed, m2r2_pred=tr.needed, m2r2_avail=np.zeros(2, int))
    cases = [
        (lambda: lru(tr, 0.1), "fewer than the top-1"),  # 0 of 8 slots
        (lambda: gate_prefetch(tr, 0.5), "needs a trace with gate_pred"),
        (lambda: build_schedule("fifo", tr, 0.5), "unknown offload policy"),
        (lambda: m2r2_aot(aot, 0.5, variant="greedy"), "unknown m2r2_aot variant"),
        (lambda: m2r2_aot(aot, 0.5, margin=1.5), "margin must be in"),
        (lambda: m2r2_aot(aot, 0.5, max_spec=-1), "max_spec must be"),
        (lambda: m2r2_aot(aot, 0.5, decay=2.0), "decay must be"),
        (lambda: m2r2_aot(aot, 0.5, compute_per_transfer=(1.0, 2.0, 3.0)), "one per layer"),
        (lambda: m2r2_aot(aot, 0.5, compute_per_transfer=float("nan")), "compute_per_transfer"),
        (lambda: build_schedule("m2r2_aot", aot, 0.5, wider=2), "unknown m2r2_aot option wider"),
        (lambda: check_aot_options(wider=2), "unknown m2r2_aot option wider"),
        (lambda: Residency(4, evict="scored"), "a Scoring goes with evict='scored'"),
        (lambda: Schedule("x", 4, tr.needed, (((), ()),), 2, scoring=Scoring()), "a scoring goes with"),
        (
            lambda: Schedule(
                "x",
                4,
                tr.needed,
                (((), ()),),
                2,
                evict="scored",
                hints=(((), ((1, 0),)),),
                hint_probs=(((), (0.5, 0.5)),),
                scoring=Scoring(),
            ),
            "align",
        ),
        (lambda: simulate(lru(tr, 0.5), LINK, NBYTES, (1.0, 1.0, 1.0)), "one per MoE layer"),
        (lambda: run_real(lru(tr, 0.5), store, _swiglu_chain()), r"holds 3 layers x 4 experts"),
        (lambda: ExpertStore.write(tmp_path / "x.bin", ExpertLayout(1, 1, H, I), lambda l, e: {}), "missing"),
        (lambda: store.read(L, 0), "no expert"),
    ]
    for fn, match in cases:
        with pytest.raises(M2R2Error, match=match) as e:
            fn()
        _one_line(e)
