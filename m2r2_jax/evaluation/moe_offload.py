"""M2R2's third use, measured: ahead-of-time expert loading on an MoE base. The fast stream runs first
for each token and predicts, from its states, the experts every later MoE layer will route to, so
their weights can be moved into fast memory while the earlier layers compute. Against: on-demand
loading, an LRU cache, and LRU + the next-layer gate (Mixtral-offloading / Pre-gated MoE).

1. Routing traces (moe_trace.py): greedy decoding of the eval prompts, host-driven (moe_decode.py),
   recording per decode step and MoE layer l:
     needed     the router's top-k experts (what the layer computed with)
     gate_pred  layer l's router on MoE layer l-1's MLP input, i.e. rms_norm(h after layer l-1's
                attention, layer l-1's mlp_norm): the normalised state layer l-1's own router and
                experts read, one layer ahead (row 0 has none)
     m2r2_pred  layer l's router on its mlp_norm of the fast state aligned with layer l: "calibrated"
                (per MoE layer the fast state with the best recall@k on the traces of calibration
                prompts, never the evaluated ones) or a fixed map ("floor" / "nearest" / "ceil",
                moe_decode.aligned_state); available at step 0: the fast stream runs before the slow
                layers, and its compute is charged to m2r2_aot's per-token time
   Recall@k by look-ahead distance (MoE layers between a prediction's availability and its use): m2r2
   at distance l for layer l; the gate at distance d = layer l's router on layer l-d's MLP input
   (d = 1 is gate_pred); the previous token's experts at the same layer as a baseline.
2. `sim`: the traces replayed by offload.simulate at the link presets, with per-layer compute times
   (a) measured here (the host-driven decode's pieces, float32 on this CPU) and (b) projected for an
   accelerator by a roofline model (roofline.py: max(FLOPs / peak, bytes / HBM bandwidth) per piece;
   weights and KV in bf16) plus a stated per-layer launch overhead (`launch_us`, one source per value;
   0 = none): a model, not a measurement. All policies but ondemand hold the same cache fraction, and
   every prefetch overlaps compute (the link works while layers run). m2r2_aot's rows also carry the
   same schedule with the fast stream's time not charged (`speedup_fast_stream_free`): a bound for a
   fast stream whose cost is shared with another use (drafting), not a result.
3. `real`: the experts in an ExpertStore file on disk (read cold), an ExpertCache of a fraction of
   them, and the decode driven by offload.run_real: each MoE layer's FFN computed from the weights the
   cache returns. The tokens must equal the RAM-resident decode's under every policy (checked), and
   that decode the plain one's (decoding.generate.Generator; `plain_decode_match`). The prompts run
   back to back through one cache (as a server's would); ondemand runs once (it keeps nothing, so the
   fraction does not matter). Prefill runs with every expert resident, outside the measurement.

The fast layers' weights (attention + the whole dense FFN of a stream trained on the dense model a
MoEfied base was built from) stay resident, outside the cache's budget; `memory_matched` gives LRU
that memory as extra cache instead.

`record_run` decodes and records (a `moe_tracefile.Recording`: the trace, the measured times, the
decoder's shape for the projected ones, the recall report), `sim_results` replays a recording, live
or read back from a trace file (moe_tracefile.py), and `real_results` runs the real mode; the compute
model is moe_times.py. m2r2_aot is told, per link and compute source, how much of one expert's
transfer each layer's compute hides (`compute_per_transfer`), which sizes its speculation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from m2r2_jax.config import ModelConfig, from_dict, to_dict
from m2r2_jax.errors import M2R2Error
from m2r2_jax.evaluation.moe_decode import ALIGNMENTS, MoEDecoder, ram_experts, ram_provider
from m2r2_jax.evaluation.moe_times import ModelShape, Times, measured_times, projected_times
from m2r2_jax.evaluation.moe_trace import (
    Collected,
    build_trace,
    calibrate_alignment,
    collect,
    predictions,
    recall_report,
)
from m2r2_jax.evaluation.moe_tracefile import Recording
from m2r2_jax.offload import (
    AOT_OPTIONS,
    LINKS,
    POLICIES,
    ExpertLayout,
    ExpertStore,
    Link,
    RoutingTrace,
    aot_lookahead,
    build_schedule,
    capacity_slots,
    check_aot_options,
    measure_cold_warm,
    run_real,
    simulate,
)

MODES = ("sim", "real")
COMPUTE = ("measured", "projected")
LINK_ALIASES = {"nvme": "nvme4"}  # --link nvme: PCIe 4.0 x4 NVMe -> RAM


def link_of(name: str) -> Link:
    key = LINK_ALIASES.get(name, name)
    if key not in LINKS:
        raise M2R2Error(f"unknown link {name!r}: choose from {', '.join([*LINKS, *LINK_ALIASES])}")
    return LINKS[key]


@dataclasses.dataclass(frozen=True)
class MoEOffloadConfig:
    policies: tuple[str, ...] = POLICIES  # ondemand is always run (the speed-up baseline)
    cache_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    mode: str = "sim"
    links: tuple[str, ...] = ("pcie4",)  # sim only
    compute: tuple[str, ...] = COMPUTE  # sim only: measured here / projected for `chip`
    chip: str = "h100"
    max_new_tokens: int = 32
    alignment: str = "calibrated"  # calibrated (on calibration prompts) | floor | nearest | ceil
    width: int = 0  # experts predicted (and prefetched) per layer; 0 = the model's top-k
    projected_bytes_per_param: int = 2  # the accelerator's weights and KV (bf16)
    repeats: int = 1  # real only: every run this many times, round-robin; the fastest of each is kept
    window: int | None = None  # m2r2_aot's look-ahead in MoE layers (None: as far as the cache holds)
    window_sweep: tuple[int, ...] = ()  # sim only: m2r2_aot also at these windows (JSON `window_sweep`)
    launch_us: tuple[float, ...] = (0.0,)  # sim, projected compute: per-layer launch overhead(s), one source each
    aot: dict = dataclasses.field(default_factory=dict)  # m2r2_aot's other keyword arguments (policies.py)

    @property
    def aot_variant(self) -> str:
        return self.aot.get("variant", "scored")

    def __post_init__(self):
        bad = [p for p in self.policies if p not in POLICIES]
        if bad or not self.policies:
            raise M2R2Error(f"unknown policy {bad or '(none)'}: choose from {', '.join(POLICIES)}")
        if "ondemand" not in self.policies:
            object.__setattr__(self, "policies", ("ondemand", *self.policies))
        if not self.cache_fractions:
            raise M2R2Error("no cache fraction given")
        for f in self.cache_fractions:
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
                raise M2R2Error(f"cache fraction must be in (0, 1], got {f!r}")
        if self.mode not in MODES:
            raise M2R2Error(f"unknown mode {self.mode!r}: choose from {', '.join(MODES)}")
        for name in self.links:
            link_of(name)
        if not self.links:
            raise M2R2Error("no link given")
        bad = [c for c in self.compute if c not in COMPUTE]
        if bad or not self.compute:
            raise M2R2Error(f"unknown compute source {bad or '(none)'}: choose from {', '.join(COMPUTE)}")
        from m2r2_jax.roofline import CHIPS

        if self.chip not in CHIPS:
            raise M2R2Error(f"unknown chip {self.chip!r}: choose from {', '.join(CHIPS)}")
        if self.alignment not in ("calibrated", *ALIGNMENTS):
            raise M2R2Error(f"unknown alignment {self.alignment!r}: choose from calibrated, {', '.join(ALIGNMENTS)}")
        for name, lo in (("max_new_tokens", 2), ("width", 0), ("projected_bytes_per_param", 1), ("repeats", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise M2R2Error(f"{name} must be an integer >= {lo}, got {v!r}")
        for w in (self.window, *self.window_sweep):
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
                raise M2R2Error(f"window must be a number of layers >= 0 (or auto), got {w!r}")
        if not self.launch_us or any(not isinstance(x, (int, float)) or not 0 <= x < 1e6 for x in self.launch_us):
            raise M2R2Error(f"launch overhead must be microseconds in [0, 1e6), got {self.launch_us!r}")
        bad = [key for key in self.aot if key not in AOT_OPTIONS]
        if not isinstance(self.aot, dict) or bad:
            raise M2R2Error(f"unknown m2r2_aot option {bad}: choose from {', '.join(AOT_OPTIONS)}")
        check_aot_options(self.window, **self.aot)

    def aot_options(self) -> dict:
        """m2r2_aot's keyword arguments as run (JSON: `policy_options`)."""
        return dict(
            variant="scored",
            window="auto" if self.window is None else self.window,
            compute_per_transfer="each layer's compute / one expert's transfer, per link and compute source",
        ) | dict(self.aot)

    @property
    def needs_fast(self) -> bool:
        return "m2r2_aot" in self.policies

    def sources(self) -> list[tuple[str, float | None]]:
        """The sim's compute sources: (name, launch overhead in us; None = measured)."""
        out = [("measured", None)] if "measured" in self.compute else []
        if "projected" in self.compute:
            out += [(projected_name(x), float(x)) for x in dict.fromkeys(self.launch_us)]
        return out


def projected_name(launch_us: float) -> str:
    return "projected" if launch_us == 0 else f"projected+{launch_us:g}us"


# ----------------------------------------------------------------------------- 2. sim


def _row(policy: str, frac: float, m, base_tps: float, **extra) -> dict:
    return dict(
        policy=policy,
        cache_fraction=frac,
        hit_rate=m.hit_rate,
        recall=m.prefetch_recall,
        stall_ms_per_token=m.stall_ms_per_token,
        tokens_per_second=m.tokens_per_s,
        speedup_vs_ondemand=m.tokens_per_s / base_tps,
        ms_per_token=m.ms_per_token,
        loads=m.loads,
        bytes_moved=m.bytes_moved,
        dropped_prefetches=m.dropped_prefetches,
        **extra,
    )


def _window(trace: RoutingTrace, frac: float, window: int | None, variant: str = "scored") -> int:
    k, L = trace.top_k, trace.num_layers
    cap = capacity_slots(frac, L, trace.num_experts, k)
    return aot_lookahead(cap, k, trace.m2r2_pred.shape[2], L, window, variant)


def run_sim(
    trace: RoutingTrace,
    ec: MoEOffloadConfig,
    times: dict[str, Times],
    expert_bytes: dict[str, int],
    fast_fraction: float,
) -> tuple[list[dict], list[dict], list[dict]]:
    """-> (rows per link x compute x fraction x policy, memory-matched rows: LRU given the fast
    layers' resident bytes as extra cache, against m2r2_aot; m2r2_aot rows at the sweep's windows)."""
    rows, matched, sweep = [], [], []
    for link_name in ec.links:
        link = link_of(link_name)
        for src in times:
            tm, nb = times[src], expert_bytes[src]

            # m2r2_aot sizes its speculation to how much of a transfer each layer's compute hides
            aot = dict(compute_per_transfer=tuple(x / (link.transfer_s(nb) * 1e3) for x in tm.layer_ms)) | ec.aot

            def sim(policy, frac, window=ec.window, fast=True):
                tok = tm.token_ms + (tm.fast_ms if policy == "m2r2_aot" and fast else 0.0)
                return simulate(build_schedule(policy, trace, frac, window, **aot), link, nb, tm.layer_ms, tok)

            base = sim("ondemand", 1.0)
            for frac in ec.cache_fractions:
                for p in ec.policies:
                    m = base if p == "ondemand" else sim(p, frac)
                    extra = {}
                    if p == "m2r2_aot":  # and a bound: the same schedule with the fast stream's time not charged
                        free = sim(p, frac, fast=False).tokens_per_s
                        extra = dict(
                            window=_window(trace, frac, ec.window, ec.aot_variant),
                            tokens_per_second_fast_stream_free=free,
                            speedup_fast_stream_free=free / base.tokens_per_s,
                        )
                    rows.append(_row(p, frac, m, base.tokens_per_s, link=link.name, compute=src, **extra))
                if "m2r2_aot" in ec.policies:
                    for w in ec.window_sweep:
                        m = sim("m2r2_aot", frac, w)
                        eff = _window(trace, frac, w, ec.aot_variant)
                        sweep.append(
                            _row("m2r2_aot", frac, m, base.tokens_per_s, link=link.name, compute=src, window=eff)
                        )
                if "m2r2_aot" in ec.policies and "lru" in ec.policies:
                    more = min(1.0, frac + fast_fraction)
                    a, b = sim("lru", more), sim("m2r2_aot", frac)
                    matched.append(
                        dict(
                            link=link.name,
                            compute=src,
                            cache_fraction=frac,
                            lru_cache_fraction=more,
                            lru_tokens_per_second=a.tokens_per_s,
                            m2r2_aot_tokens_per_second=b.tokens_per_s,
                        )
                    )
    return rows, matched, sweep


# ----------------------------------------------------------------------------- 3. real


def filesystem_of(path: Path) -> str:
    """The filesystem type holding `path` (from /proc/mounts: the longest mount point above it)."""
    p = str(path.resolve())
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                mnt = parts[1].replace("\\040", " ")
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


RAM_FILESYSTEMS = ("tmpfs", "ramfs")


def write_store(dec: MoEDecoder, path: Path) -> ExpertStore:
    kind = filesystem_of(path.parent)
    if kind in RAM_FILESYSTEMS:
        raise M2R2Error(f"expert store {path}: {path.parent} is on {kind} (RAM): cold reads need a disk path")
    cfg = dec.cfg
    ex = ram_experts(cfg, dec.params)
    layout = ExpertLayout(dec.num_moe_layers, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    return ExpertStore.write(path, layout, ram_provider(ex))


class _Driver:
    """compute_fn / token_fn for offload.run_real over the prompts' decode steps back to back (the
    expert cache carries over from one prompt to the next, as a server's would)."""

    def __init__(self, dec: MoEDecoder, seqs, fast_src, width: int, expect_pred):
        self.dec, self.fast_src, self.width, self.expect = dec, fast_src, width, expect_pred
        self.seqs = [s.copy() for s in seqs]
        self.p = self.t = 0
        self.pred_mismatch = 0
        self._skip_done()
        self.step = self._begin() if self.p < len(self.seqs) else None

    def _skip_done(self):
        while self.p < len(self.seqs) and self.seqs[self.p].done:
            self.p += 1

    def _begin(self):
        st = self.dec.begin(self.seqs[self.p], self.fast_src, self.width)
        if self.fast_src is not None and self.expect is not None:
            self.pred_mismatch += not np.array_equal(st.fast_pred, self.expect[self.t])
        return st

    def compute(self, l: int, weights) -> None:
        self.dec.layer(self.step, l, weights)

    def token(self, t: int) -> None:
        self.dec.finish(self.step)
        self.t += 1
        self._skip_done()
        if self.p < len(self.seqs):
            self.step = self._begin()

    @property
    def tokens(self) -> list[list[int]]:
        return [list(s.out) for s in self.seqs]


def run_real_mode(
    dec: MoEDecoder,
    col: Collected,
    trace: RoutingTrace,
    ec: MoEOffloadConfig,
    store: ExpertStore,
    fast_src,
    width: int,
    progress: bool = False,
) -> tuple[list[dict], bool, dict]:
    """-> (rows, whether every run decoded exactly the RAM-resident decode's tokens, details)."""
    from tqdm import tqdm

    seqs = [dec.start(p, ec.max_new_tokens) for p in col.prompts]
    runs = [("ondemand", 1.0)] + [(p, f) for f in ec.cache_fractions for p in ec.policies if p != "ondemand"]
    disk = measure_cold_warm(store)
    disk_link = Link("this disk (measured cold reads)", disk["cold_gb_s"] * 1e9, 0.0)
    got, identical, mismatches = {}, True, {}
    todo = runs * ec.repeats  # round-robin: a slow spell of this shared machine hits every policy alike
    read_ms = disk_link.transfer_s(store.layout.stride) * 1e3
    aot = dict(compute_per_transfer=tuple(x / read_ms for x in col.ms["layer"])) | ec.aot
    for policy, frac in tqdm(todo, desc="real mode", disable=not progress):
        sched = build_schedule(policy, trace, frac, ec.window, **aot)
        fast = policy == "m2r2_aot"
        drv = _Driver(dec, seqs, fast_src if fast else None, width, trace.m2r2_pred if fast else None)
        run = run_real(sched, store, drv.compute, drv.token)
        same = drv.tokens == col.tokens
        identical &= same
        if fast:
            mismatches[frac] = mismatches.get(frac, 0) + drv.pred_mismatch
        if (policy, frac) in got and got[policy, frac][0].metrics.total_ms <= run.metrics.total_ms:
            continue
        sim = simulate(sched, disk_link, store.layout.stride, run.layer_ms, run.token_ms)
        got[policy, frac] = (run, same, sim)
    base = got["ondemand", 1.0][0].metrics.tokens_per_s
    rows = []
    for frac in ec.cache_fractions:
        for p in ec.policies:
            run, same, sim = got[p, 1.0] if p == "ondemand" else got[p, frac]
            rows.append(
                _row(
                    p,
                    frac,
                    run.metrics,
                    base,
                    link="disk",
                    compute="measured",
                    tokens_identical=same,
                    layer_ms_mean=float(np.mean(run.layer_ms)),
                    token_ms=run.token_ms,
                    sim_tokens_per_second_on_measured_disk=sim.tokens_per_s,
                    **(dict(window=_window(trace, frac, ec.window, ec.aot_variant)) if p == "m2r2_aot" else {}),
                )
            )
    details = dict(
        cold_warm_read=disk,
        m2r2_live_prediction_mismatches=mismatches,
        ondemand_shared_across_fractions=True,
        repeats=ec.repeats,
        kept="the fastest of the repeats of each run" if ec.repeats > 1 else "the one run",
    )
    return rows, identical, details


# ----------------------------------------------------------------------------- the whole eval


def record_run(
    dec: MoEDecoder,
    prompts: Sequence[Sequence[int]],
    ec: MoEOffloadConfig,
    plain_tokens: Sequence[Sequence[int]] | None = None,
    progress: bool = False,
    calibration: Sequence[Sequence[int]] | None = None,
    settings: dict | None = None,
) -> tuple[Recording, Collected]:
    """Decode the prompts (host-driven), record the routing and the predictions: -> (the Recording the
    sim mode replays, and the decode's Collected for the real mode). Arguments as run_moe_offload's;
    `settings`: the run's identity kept with the recording (moe_tracefile.SETTINGS)."""
    cfg = dec.cfg
    k, L_, E = cfg.experts_per_token, dec.num_moe_layers, cfg.num_experts
    width = ec.width or k
    if width > E:
        raise M2R2Error(f"width {width} exceeds the {E} experts per layer")
    for f in ec.cache_fractions:
        capacity_slots(f, L_, E, k)  # refuses a fraction too small to hold one layer's experts
    if ec.needs_fast and dec.fast is None:
        raise M2R2Error("m2r2_aot needs a fast stream (an M2R2 checkpoint)")
    calibrated = dec.fast is not None and ec.alignment == "calibrated"
    if calibrated and not calibration:
        raise M2R2Error("the calibrated alignment needs calibration prompts (or pick floor / nearest / ceil)")
    maps, cal = {}, None
    if calibrated:
        cal_col = collect(dec, calibration, ec.max_new_tokens, progress)
        src, cal_rec = calibrate_alignment(dec, cal_col, k)
        maps["calibrated"] = src
        cal = dict(
            prompts=len(cal_col.prompts),
            decode_steps=int(cal_col.needed.shape[0]),
            state_per_layer=src.tolist(),
            recall_per_state=cal_rec.round(4).tolist(),
            recall=float(cal_rec.max(0).mean()),
        )
    col = collect(dec, prompts, ec.max_new_tokens, progress)
    preds = predictions(dec, col, width, maps)
    rec = recall_report(col, preds, k, E)
    alignment = None
    if dec.fast is not None:
        alignment = ec.alignment
        rec["m2r2_alignment"] = alignment
        rec["m2r2_by_distance"] = rec["m2r2"][alignment]
        rec["m2r2_state_per_layer"] = (maps[alignment] if calibrated else dec.state_index(alignment)).tolist()
        rec["fast_state_targets"] = dec.fast.targets()
        rec["calibration"] = cal
    if alignment is not None:  # float16, as the trace file keeps them: a replay sees the same numbers
        preds["m2r2_probs"][alignment] = preds["m2r2_probs"][alignment].astype(np.float16)
    trace = build_trace(dec, col, preds, alignment, width)
    plain_ok = None if plain_tokens is None else tuple(list(a) == list(b) for a, b in zip(col.tokens, plain_tokens))
    fast = dec.fast
    recorded = dict(
        recall=rec,
        shape=dict(
            model_config=to_dict(cfg),
            moe_layers=list(dec.moe),
            fast_config=None if fast is None else to_dict(fast.cfg),
            fast_layers=0 if fast is None else len(fast.layers),
        ),
        expert_bytes_float32=3 * cfg.hidden_size * cfg.moe_intermediate_size * 4,
        fast_stream=None
        if fast is None
        else dict(
            fast_layers=len(fast.layers),
            base_layers=fast.mc.base_layers(cfg.num_layers),
            targets=fast.mc.targets_of(cfg.num_layers),
            resident_bytes=fast.resident_bytes,
        ),
    )
    recorded = json.loads(json.dumps(recorded))  # as a trace file holds it: a replay reports the same
    recording = Recording(
        trace=trace,
        steps=tuple(col.steps),
        tokens=tuple(tuple(t) for t in col.tokens),
        plain_match=plain_ok,
        context=np.asarray(col.context, np.int64),
        measured_ms=dict(col.ms),
        settings=dict(settings or {}),
        recorded=recorded,
    )
    return recording, col


def _shape(recording: Recording) -> ModelShape:
    sh = recording.recorded["shape"]
    fc = sh["fast_config"]
    return ModelShape(
        from_dict(ModelConfig, sh["model_config"]).validate(),
        tuple(sh["moe_layers"]),
        None if fc is None else from_dict(ModelConfig, fc).validate(),
        int(sh["fast_layers"]),
    )


def _common(recording: Recording, times: dict[str, Times]) -> dict:
    """The result keys every mode shares, from the recording."""
    tr, rd = recording.trace, recording.recorded
    L_, E = tr.num_layers, tr.num_experts
    expert_f32 = rd["expert_bytes_float32"]
    all_expert_bytes = L_ * E * expert_f32
    fs = rd["fast_stream"]
    return dict(
        recall=rd["recall"],
        plain_decode_match=None if recording.plain_match is None else list(recording.plain_match),
        compute_ms={name: t.as_dict() for name, t in times.items()},
        trace=dict(
            prompts=len(recording.steps),
            decode_steps=tr.num_tokens,
            moe_layers=L_,
            experts=E,
            top_k=tr.top_k,
            prefetch_width=None if tr.m2r2_pred is None else tr.m2r2_pred.shape[2],
            mean_context=float(np.mean(recording.context)) + 1,
        ),
        fast_stream=None
        if fs is None
        else dict(
            fs,
            resident_as_fraction_of_all_experts=fs["resident_bytes"] / all_expert_bytes,
            note="the fast layers (attention + the whole dense FFN, adapters merged) stay resident; their bytes "
            "are not part of the expert cache's budget (memory_matched gives LRU that memory as extra cache)",
        ),
        experts=dict(count=L_ * E, bytes_each_float32=expert_f32, bytes_all_float32=all_expert_bytes),
        definitions=dict(
            hit_rate="needs whose expert had landed in the cache when its layer asked, over all T * L * k needs",
            recall="needs named by a prefetch request of the same token before their layer ran (schedule recall)",
            stall_ms_per_token="time layers waited for their experts, per decode step",
            tokens_per_second="decode steps / (compute + stalls); speed-up over ondemand on the same trace",
            recall_at_k="share of a layer's k used experts among the predictor's top k, by look-ahead distance "
            "(MoE layers between the prediction's availability and its use)",
        ),
    )


def _check_policies(recording: Recording, ec: MoEOffloadConfig) -> None:
    tr = recording.trace
    for f in ec.cache_fractions:
        capacity_slots(f, tr.num_layers, tr.num_experts, tr.top_k)
    if ec.needs_fast and tr.m2r2_pred is None:
        raise M2R2Error("m2r2_aot needs the fast stream's predictions: this recording has none")


def sim_results(recording: Recording, ec: MoEOffloadConfig) -> dict:
    """The sim mode on a recording (live or read back from a trace file): -> the result dict."""
    if ec.mode != "sim":
        raise M2R2Error(f"a recording replays in sim mode only, not {ec.mode!r}")
    _check_policies(recording, ec)
    rd, tr = recording.recorded, recording.trace
    expert_f32 = rd["expert_bytes_float32"]
    ctx = float(np.mean(recording.context)) + 1
    shape = _shape(recording) if any(launch is not None for _, launch in ec.sources()) else None
    times, nbytes = {}, {}
    for name, launch in ec.sources():
        if launch is None:
            times[name], nbytes[name] = measured_times(recording.measured_ms), expert_f32
        else:
            times[name] = projected_times(shape, ec.chip, ctx, ec.projected_bytes_per_param, launch)
            nbytes[name] = expert_f32 // 4 * ec.projected_bytes_per_param
    fast_bytes = 0 if rd["fast_stream"] is None else rd["fast_stream"]["resident_bytes"]
    all_expert_bytes = tr.num_layers * tr.num_experts * expert_f32
    rows, matched, sweep = run_sim(tr, ec, times, nbytes, fast_bytes / all_expert_bytes)
    pm = recording.plain_match
    out = dict(
        mode="sim",
        results=rows,
        identical_outputs=all(pm) if pm is not None else None,
        memory_matched=matched,
        expert_bytes=nbytes,
        window_sweep=sweep,
        policy_options=ec.aot_options(),
    )
    out.update(_common(recording, times))
    return out


def real_results(
    dec: MoEDecoder,
    col: Collected,
    recording: Recording,
    ec: MoEOffloadConfig,
    store_path: Path,
    progress: bool = False,
) -> dict:
    """The real mode on a live decoder and its recording: -> the result dict."""
    if store_path is None:
        raise M2R2Error("real mode needs a path for the expert store")
    _check_policies(recording, ec)
    trace, rec = recording.trace, recording.recorded["recall"]
    width = ec.width or dec.cfg.experts_per_token
    times = {"measured": measured_times(col.ms)}
    fs = filesystem_of(Path(store_path).parent)
    with write_store(dec, Path(store_path)) as store:
        src = None if dec.fast is None else np.asarray(rec["m2r2_state_per_layer"], np.int32)
        rows, same, details = run_real_mode(dec, col, trace, ec, store, src, width, progress)
        details.update(
            path=str(store_path),
            filesystem=fs,
            file_bytes=store.layout.file_bytes,
            record_bytes=store.layout.stride,
        )
    pm = recording.plain_match
    identical = same and (all(pm) if pm is not None else True)
    out = dict(mode="real", results=rows, identical_outputs=identical, store=details, policy_options=ec.aot_options())
    out.update(_common(recording, times))
    return out


def run_moe_offload(
    dec: MoEDecoder,
    prompts: Sequence[Sequence[int]],
    ec: MoEOffloadConfig,
    store_path: Path | None = None,
    plain_tokens: Sequence[Sequence[int]] | None = None,
    progress: bool = False,
    calibration: Sequence[Sequence[int]] | None = None,
) -> dict:
    """The eval on token-id prompts; `plain_tokens`: the plain decode's (decoding.generate.Generator)
    tokens per prompt, which the host-driven decode must equal; `calibration`: other prompts (never the
    evaluated ones) whose traces pick the calibrated alignment. -> the result dict (eval.moe_offload)."""
    if ec.mode == "real" and store_path is None:
        raise M2R2Error("real mode needs a path for the expert store")
    recording, col = record_run(dec, prompts, ec, plain_tokens, progress, calibration)
    if ec.mode == "sim":
        return sim_results(recording, ec)
    return real_results(dec, col, recording, ec, store_path, progress)


# ----------------------------------------------------------------------------- the PNG


def render_png(res: dict, title: str = "") -> bytes:
    """Speed-up over ondemand vs cache fraction, one line per policy (m2r2_aot's fast-stream-free bound
    dotted); panels: links across, compute sources down. Last row: recall@k by look-ahead distance, and
    stall ms per token by fraction for the first link and compute source."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    links = list(dict.fromkeys(r["link"] for r in res["results"]))
    comps = list(dict.fromkeys(r["compute"] for r in res["results"]))
    cols = max(2, len(links))
    fig = Figure(figsize=(4.2 * cols, 3.3 * (len(comps) + 1) + 0.4), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(comps) + 1, cols, squeeze=False)
    for (ci, comp), (li, link) in itertools.product(enumerate(comps), enumerate(links)):
        ax = grid[ci][li]
        rows = [r for r in res["results"] if (r["link"], r["compute"]) == (link, comp)]
        for p in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["cache_fraction"], r["speedup_vs_ondemand"]) for r in rows if r["policy"] == p)
            (line,) = ax.plot([a for a, _ in pts], [b for _, b in pts], "o-", label=p)
            free = sorted((r["cache_fraction"], r.get("speedup_fast_stream_free")) for r in rows if r["policy"] == p)
            if all(b is not None for _, b in free):
                ax.plot(
                    [a for a, _ in free], [b for _, b in free], ":", color=line.get_color(), label=f"{p}, fast free"
                )
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("cache fraction of all experts")
        ax.set_ylabel("speed-up over ondemand")
        ax.set_title(f"{link}, {comp} compute", fontsize=8)
        ax.legend(fontsize=6)
    for li in range(len(links), cols):
        for ci in range(len(comps)):
            grid[ci][li].axis("off")
    rc, ax = res.get("recall") or {}, grid[-1][0]
    if rc:
        gate = [(r["distance"], r["recall"]) for r in rc["gate"]["by_distance"]]
        ax.plot(*zip(*gate), "o-", ms=3, label="gate: layer l's router on layer l-d's input")
        if "m2r2_by_distance" in rc:
            m = [(r["distance"], r["recall"]) for r in rc["m2r2_by_distance"]]
            ax.plot(*zip(*m), "o-", ms=3, label=f"m2r2 ({rc['m2r2_alignment']}): for layer d, before layer 0")
        if rc.get("previous_token") is not None:
            ax.axhline(rc["previous_token"], color="grey", lw=0.8, ls="--", label="previous token, same layer")
        ax.axhline(rc["chance"], color="black", lw=0.6, ls=":", label="chance")
        ax.set_xlabel("look-ahead distance (MoE layers)")
        ax.set_ylabel(f"recall@{rc['k']}")
        ax.legend(fontsize=6)
    ax = grid[-1][1]
    rows = [r for r in res["results"] if (r["link"], r["compute"]) == (links[0], comps[0])]
    pols = list(dict.fromkeys(r["policy"] for r in rows))
    fracs = sorted({r["cache_fraction"] for r in rows})
    for i, p in enumerate(pols):
        ys = [
            next(r["stall_ms_per_token"] for r in rows if r["policy"] == p and r["cache_fraction"] == f) for f in fracs
        ]
        ax.bar(
            [x + (i - len(pols) / 2 + 0.5) * 0.8 / len(pols) for x in range(len(fracs))], ys, 0.8 / len(pols), label=p
        )
    ax.set_xticks(range(len(fracs)), [f"{f:g}" for f in fracs])
    ax.set_xlabel("cache fraction")
    ax.set_ylabel("stall ms per token")
    ax.set_title(f"{links[0]}, {comps[0]} compute", fontsize=8)
    ax.legend(fontsize=6)
    for li in range(2, cols):
        grid[-1][li].axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def format_table(res: dict) -> str:
    head = ("link", "compute", "frac", "policy", "hit", "recall", "stall ms", "tok/s", "speedup")
    rows = [head]
    for r in res["results"]:
        rows.append(
            (
                r["link"],
                r["compute"],
                f"{r['cache_fraction']:g}",
                r["policy"],
                f"{r['hit_rate']:.3f}",
                f"{r['recall']:.3f}",
                f"{r['stall_ms_per_token']:.3f}",
                f"{r['tokens_per_second']:.1f}",
                f"{r['speedup_vs_ondemand']:.2f}",
            )
        )
    w = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join(" ".join(str(c).ljust(w[i]) for i, c in enumerate(r)) for r in rows)
