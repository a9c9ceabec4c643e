"""m2r2_jax.offload: policies on handcrafted traces, the simulator against hand-computed timelines, the
residency rules, and the real (threaded, file-backed) engine giving identical outputs under every policy."""

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
    build_schedule,
    capacity_slots,
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


def test_m2r2_prefetches_are_issued_at_their_availability_step():
    needed = _ids([[[0], [1], [2]]])
    pred = _ids([[[0, 3], [1, 1], [2, 3]]])  # a repeated id is requested once
    s = m2r2_aot(RoutingTrace(4, needed, m2r2_pred=pred, m2r2_avail=np.array([0, 0, 1])), 0.5)
    # step 0: layers 0 and 1, nearest first, each in prediction order; step 1: layer 2
    assert s.requests[0] == (((0, 0), (0, 3), (1, 1)), ((2, 2), (2, 3)), ())
    two, avail = np.concatenate([needed, needed]), _ids([[0, 1, 2], [0, 0, 0]])
    per_token = RoutingTrace(4, two, m2r2_pred=np.concatenate([pred, pred]), m2r2_avail=avail)
    s2 = m2r2_aot(per_token, 0.5)
    assert s2.requests[0] == (((0, 0), (0, 3)), ((1, 1),), ((2, 2), (2, 3)))
    assert s2.requests[1] == (((0, 0), (0, 3), (1, 1), (2, 2), (2, 3)), (), ())


def test_capacity_is_a_floored_fraction_of_all_experts():
    assert capacity_slots(0.25, 4, 8, 2) == 8
    assert capacity_slots(0.29, 10, 10, 2) == 29  # not 28 from 0.29 * 100 = 28.999...
    assert capacity_slots(1.0, 4, 8, 2) == 32


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


def test_simulated_prefetch_into_a_full_cache_is_dropped_not_stealing():
    tr = RoutingTrace(4, _ids([[[0], [1]]]), m2r2_pred=_ids([[[0], [1]]]), m2r2_avail=np.array([0, 0]))
    m = simulate(m2r2_aot(tr, 1 / 8), LINK, NBYTES, 1.0)  # 1 slot, taken by (0,0) which layer 0 needs
    assert (m.dropped_prefetches, m.loads, m.hits) == (1, 2, 0)


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
    res = simulate_policies(_three_layer_trace(), 1.0, LINK, NBYTES, layer_ms=(4.0, 0.5, 0.5), token_ms=0.25)
    # ondemand/lru: every layer waits 1.5 ms
    for p in ("ondemand", "lru"):
        assert res[p].stall_ms == pytest.approx(4.5) and res[p].total_ms == pytest.approx(9.75)
    # gate: (1,b) loads 1.5-3.0 under layer 0 (hit); (2,c) is asked at 5.5, lands at 7.0, layer 2
    # starts at 6.0 -> 1 ms stall
    g = res["gate_prefetch"]
    assert (g.hits, g.loads) == (1, 3)
    assert g.stall_ms == pytest.approx(2.5) and g.total_ms == pytest.approx(7.75)
    # m2r2: all three asked at 0; (0,a) is promoted, then (1,b) 1.5-3.0 and (2,c) 3.0-4.5 under layer 0
    a = res["m2r2_aot"]
    assert (a.hits, a.loads, a.prefetch_recall) == (2, 3, 1.0)
    assert a.stall_ms == pytest.approx(1.5) and a.total_ms == pytest.approx(6.75)
    assert a.stall_ms_per_token == pytest.approx(1.5) and a.tokens_per_s == pytest.approx(1000 / 6.75)
    assert speedups(res)["m2r2_aot"] == pytest.approx(9.75 / 6.75)


def test_a_demand_miss_jumps_the_queued_prefetches():
    # m2r2 guesses layer 0 wrong (expert 3): (0,0) must load first, at 0, not after three prefetches
    a = simulate(m2r2_aot(_three_layer_trace(m2r2_layer0=3), 1.0), LINK, NBYTES, (4.0, 0.5, 0.5), 0.25)
    # (0,0) 0-1.5; then (0,3) 1.5-3.0 (wasted), (1,1) 3.0-4.5, (2,2) 4.5-6.0: lands as layer 2 starts (6.0)
    assert a.stall_ms == pytest.approx(1.5) and a.total_ms == pytest.approx(6.75)
    assert (a.hits, a.loads, a.bytes_moved) == (2, 4, 4 * NBYTES)
    assert a.prefetch_recall == pytest.approx(2 / 3)


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
    return RoutingTrace(E, needed, gate_pred=noisy, m2r2_pred=needed, m2r2_avail=np.array([0, 0, 1]))


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
    for frac in (K / (L * E), 0.5, 1.0):  # as tight as allowed (evictions, cancellations), half, all
        for p in ("ondemand", "lru", "gate_prefetch", "m2r2_aot"):
            s = build_schedule(p, tr, frac)
            run = run_real(s, store, _swiglu_chain())
            assert all(np.array_equal(a, b) for ra, rb in zip(run.outputs, ref) for a, b in zip(ra, rb)), (p, frac)
            m = run.metrics
            assert m.mode == "measured" and m.needs == tr.num_tokens * L * K and 0 <= m.hits <= m.needs
            assert m.bytes_moved == m.loads * store.layout.stride and m.total_ms > 0
            if frac == 1.0:  # nothing is ever evicted: real loads = the simulator's = distinct admissions
                assert m.loads == simulate(s, LINK, NBYTES, 0.1).loads
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
    ],
)
def test_bad_traces_are_refused(kwargs, match):
    kwargs = {"needed": _ids([[[0], [1]]]), **kwargs}
    with pytest.raises(M2R2Error, match=match) as e:
        RoutingTrace(4, **kwargs)
    _one_line(e)


def test_other_bad_inputs_are_refused(store, tmp_path):
    tr = RoutingTrace(4, _ids([[[0], [1]]]))
    cases = [
        (lambda: lru(tr, 0.1), "fewer than the top-1"),  # 0 of 8 slots
        (lambda: gate_prefetch(tr, 0.5), "needs a trace with gate_pred"),
        (lambda: build_schedule("fifo", tr, 0.5), "unknown offload policy"),
        (lambda: simulate(lru(tr, 0.5), LINK, NBYTES, (1.0, 1.0, 1.0)), "one per MoE layer"),
        (lambda: run_real(lru(tr, 0.5), store, _swiglu_chain()), r"holds 3 layers x 4 experts"),
        (lambda: ExpertStore.write(tmp_path / "x.bin", ExpertLayout(1, 1, H, I), lambda l, e: {}), "missing"),
        (lambda: store.read(L, 0), "no expert"),
    ]
    for fn, match in cases:
        with pytest.raises(M2R2Error, match=match) as e:
            fn()
        _one_line(e)
