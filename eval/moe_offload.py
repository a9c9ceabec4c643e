"""Ahead-of-time expert loading on an MoE base: routing traces of greedy decoding, recall of the experts
predicted by M2R2's fast stream and by the next-layer gate, and the cache policies replayed on modelled
links (sim) or run for real against an expert file on this machine's disk (real).

    python -m eval.moe_offload --model smollm2-135m-moe --dataset NAME_OR_PATH [--limit N] \
        [--max-new-tokens N] [--cache-fraction 0.25,0.5,0.75] \
        [--policies ondemand,lru,gate_prefetch,m2r2_aot] [--mode sim|real] \
        [--link pcie4,nvme,pcie5] [--compute measured,projected] [--chip h100] [--launch-us 0,20] \
        [--window auto|N] [--window-sweep N,...] [--aot KEY=VALUE,...] [--top-k K] [--asset DIR] \
        [--checkpoint DIR] [--store FILE] [--repeats N] [--trace-out FILE.npz | --trace-in FILE.npz] \
        --out FILE.json [--plot FILE.png]

`--trace-out` keeps the run's routing traces (FILE.npz + FILE.json: moe_tracefile.py); `--trace-in`
replays such a file in sim mode without loading or running the model (the file's settings must be
the requested run's): record once, tune the policies many times.

The fast stream is an M2R2 checkpoint trained on the dense model an MoEfied base was built from
(default: the shipped smollm2-135m-r3): its layers run the merged dense weights and stay resident.
See m2r2_jax/evaluation/moe_offload.py for what is measured and how.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2r2_jax.cli import quiet_env, run_main

DEFAULT_CHECKPOINT = "m2r2_jax/assets/smollm2-135m-r3"
CALIBRATION_SET = "self_instruct/seed_tasks.jsonl"  # a training-prompt source (data/prompts.py), not an eval set


def _floats(flag: str, text: str) -> tuple[float, ...]:
    from m2r2_jax.errors import M2R2Error

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise M2R2Error(f"{flag} {text!r}: expected numbers separated by commas") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _ints(flag: str, text: str) -> tuple[int, ...]:
    from m2r2_jax.errors import M2R2Error

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise M2R2Error(f"{flag} {text!r}: expected integers separated by commas") from None


def _window(text: str) -> int | None:
    from m2r2_jax.errors import M2R2Error

    if text.strip() == "auto":
        return None
    w = _ints("--window", text)
    if len(w) != 1:
        raise M2R2Error(f"--window {text!r}: expected auto or one number of layers")
    return w[0]


def _options(flag: str, text: str) -> dict:
    """KEY=VALUE,... -> {key: int | float | None | str} (none -> None)."""
    from m2r2_jax.errors import M2R2Error

    out = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, eq, val = item.partition("=")
        if not eq or not key.strip() or not val.strip():
            raise M2R2Error(f"{flag} {item!r}: expected KEY=VALUE")
        val = val.strip()
        for conv in (int, float):
            try:
                out[key.strip()] = conv(val)
                break
            except ValueError:
                pass
        else:
            out[key.strip()] = None if val.lower() == "none" else val
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.moe_offload", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-moe", help="an MoE model: alias, .gguf, HF dir or hub id")
    p.add_argument("--checkpoint", default=None, help=f"M2R2 checkpoint (default: the shipped {DEFAULT_CHECKPOINT})")
    p.add_argument("--dataset", default="mt_bench", help="mt_bench, koala, ... or a .json/.jsonl path")
    p.add_argument("--limit", type=int, default=8, help="prompts (first turns), round-robin over categories")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cache-fraction", default="0.25,0.5,0.75", help="fractions of all experts the cache holds")
    p.add_argument("--policies", default="ondemand,lru,gate_prefetch,m2r2_aot")
    p.add_argument("--mode", default="sim", help="sim (replay on modelled links) or real (disk + cache here)")
    p.add_argument("--link", default=None, help="sim: comma-separated link presets (default pcie4,nvme,pcie5)")
    p.add_argument("--compute", default="measured,projected", help="sim: per-layer compute measured here / projected")
    p.add_argument("--chip", default="h100", help="sim: the accelerator of the projected compute (roofline.py)")
    p.add_argument(
        "--launch-us", default="0", help="sim: per-layer launch overhead(s) added to the projected compute, us"
    )
    p.add_argument("--window", default="auto", help="m2r2_aot look-ahead in MoE layers (auto: as far as fits)")
    p.add_argument("--window-sweep", default="", help="sim: m2r2_aot also at these windows (JSON window_sweep)")
    p.add_argument(
        "--aot",
        default="",
        help="m2r2_aot knobs KEY=VALUE,... (offload/policies.py: variant=scored|window, decay, weight, margin, "
        "max_spec, hint_floor)",
    )
    p.add_argument("--top-k", type=int, default=None, help="experts per token of a MoEfied alias (default: its own)")
    p.add_argument("--asset", default=None, help="a MoEfied alias's asset directory instead of its shipped one")
    p.add_argument(
        "--alignment", default="calibrated", help="fast state per MoE layer: calibrated, floor, nearest, ceil"
    )
    p.add_argument(
        "--calibration-set",
        default=None,
        help="prompts that calibrate the alignment (default: the Self-Instruct seed tasks, a training source)",
    )
    p.add_argument("--calibration", type=int, default=4, help="calibration prompts (their first turns)")
    p.add_argument("--store", default=None, help="real: the expert file (default: next to --out; a disk, not tmpfs)")
    p.add_argument("--repeats", type=int, default=1, help="real: runs of each policy (round-robin; fastest kept)")
    p.add_argument("--keep-store", action="store_true", help="real: keep the expert file afterwards")
    p.add_argument("--out", default=None, help="result JSON (default runs/moe_offload/<dataset>_<mode>.json)")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--trace-out", default=None, help="also write the recorded traces to FILE.npz (+ FILE.json)")
    p.add_argument("--trace-in", default=None, help="sim: replay the traces of FILE.npz instead of running the model")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_path(f: Path, flag: str) -> None:
    from m2r2_jax.errors import M2R2Error

    if not f.parent.is_dir():
        raise M2R2Error(f"{flag}: directory {f.parent} does not exist")
    if f.is_dir():
        raise M2R2Error(f"{flag}: {f} is a directory")


def moe_record(name: str, m, asset: str | None = None) -> dict:
    """The MoE's shape and, for a MoEfied alias, the build of its asset (an alias may be rebuilt later;
    `asset`: the directory used instead of the alias's own)."""
    c = m.cfg
    rec = dict(
        experts=c.num_experts,
        top_k=c.experts_per_token,
        expert_intermediate=c.moe_intermediate_size,
        router=c.router,
        fingerprint=m.fingerprint,
        derived_from=getattr(m, "derived_from", "") or None,
    )
    from m2r2_jax.loading import registry

    derived = getattr(registry, "DERIVED", {})
    if name in derived:
        from m2r2_jax.loading.moefied import ASSETS, read_moe_meta

        meta = read_moe_meta(Path(asset) if asset else ASSETS / derived[name][1])
        rec["asset"] = {k: v for k, v in meta.items() if k != "base"}  # its build, metrics, expert storage
    return rec


def checkpoint_identity(ckpt: str) -> dict:
    """A fast-stream checkpoint as a trace file records it: its step and its metadata's checksum (the
    training config and base identity), not its path (a checkout may move)."""
    import hashlib

    from m2r2_jax.training.checkpoint import ckpt_path, read_meta, resolve_checkpoint_dir

    step_dir, step = resolve_checkpoint_dir(ckpt)
    read_meta(step_dir)
    meta = (ckpt_path(step_dir) / "meta" / "metadata").read_bytes()
    return dict(step=step, meta_sha256=hashlib.sha256(meta).hexdigest()[:16])


def main(argv=None):
    a = parse(argv)
    quiet_env()
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.moe_offload import RAM_FILESYSTEMS, MoEOffloadConfig, filesystem_of

    if a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if a.calibration < 1 and a.alignment == "calibrated":
        raise M2R2Error(f"--calibration must be >= 1 for the calibrated alignment, got {a.calibration}")
    if a.mode == "real" and a.link is not None:
        raise M2R2Error("--link applies to --mode sim: real mode reads this machine's disk")
    if a.trace_in is not None and a.trace_out is not None:
        raise M2R2Error("--trace-in replays a trace file, --trace-out records one: give one of them")
    if a.trace_in is not None and a.mode != "sim":
        raise M2R2Error("--trace-in replays in --mode sim only (real mode runs the model)")
    for flag, f in (("--trace-in", a.trace_in), ("--trace-out", a.trace_out)):
        if f is not None and Path(f).suffix != ".npz":
            raise M2R2Error(f"{flag} {f}: expected a .npz file name (its settings go next to it as .json)")
    if a.top_k is not None or a.asset is not None:
        from m2r2_jax.loading.registry import DERIVED

        flag = "--top-k" if a.top_k is not None else "--asset"
        if a.model not in DERIVED:
            raise M2R2Error(f"{flag} applies to a MoEfied alias ({', '.join(DERIVED)}), not {a.model}")
        if a.top_k is not None and a.top_k < 1:
            raise M2R2Error(f"--top-k must be >= 1, got {a.top_k}")
        if a.asset is not None and not Path(a.asset).is_dir():
            raise M2R2Error(f"--asset {a.asset}: no such directory")
    ec = MoEOffloadConfig(
        policies=_names(a.policies),
        cache_fractions=_floats("--cache-fraction", a.cache_fraction),
        mode=a.mode,
        links=_names(a.link or "pcie4,nvme,pcie5"),
        compute=_names(a.compute),
        chip=a.chip,
        max_new_tokens=a.max_new_tokens,
        alignment=a.alignment,
        repeats=a.repeats,
        window=_window(a.window),
        window_sweep=_ints("--window-sweep", a.window_sweep),
        launch_us=_floats("--launch-us", a.launch_us),
        aot=_options("--aot", a.aot),
    )
    name = Path(a.dataset).stem if Path(a.dataset).suffix else a.dataset.replace("/", "_").replace(":", "_")
    out = Path(a.out) if a.out else Path("runs") / "moe_offload" / f"{name}_{ec.mode}.json"
    plot = Path(a.plot) if a.plot else out.with_suffix(".png")
    if a.out is not None:
        check_path(out, "--out")
    if a.plot is not None or a.out is not None:
        check_path(plot, "--plot")
    store = None
    if ec.mode == "real":
        store = Path(a.store) if a.store else out.with_suffix(".experts.bin")
        if a.store is not None or a.out is not None:
            check_path(store, "--store")
        kind = filesystem_of(store.parent if store.parent.is_dir() else Path("."))
        if kind in RAM_FILESYSTEMS:
            raise M2R2Error(f"--store {store}: its directory is on {kind} (RAM); cold reads need a disk path")
    if a.trace_out is not None:
        check_path(Path(a.trace_out), "--trace-out")
    ckpt = None
    if ec.needs_fast:
        from m2r2_jax.training.checkpoint import resolve_checkpoint_dir

        ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
        resolve_checkpoint_dir(ckpt)
    settings = dict(
        model=a.model,
        dataset=a.dataset,
        limit=a.limit,
        max_new_tokens=ec.max_new_tokens,
        checkpoint=None if ckpt is None else checkpoint_identity(ckpt),
        alignment=ec.alignment if ec.needs_fast else None,
        calibration_set=(a.calibration_set or CALIBRATION_SET) if ec.needs_fast else None,
        calibration=a.calibration if ec.needs_fast else None,
        width=ec.width,
        top_k_override=a.top_k,
        asset_override=a.asset,
    )
    recording = None
    if a.trace_in is not None:
        from m2r2_jax.evaluation import moe_tracefile

        # the fast stream's settings matter only to a replay that runs m2r2_aot
        skip = () if ec.needs_fast else ("checkpoint", "alignment", "calibration_set", "calibration")
        recording = moe_tracefile.load(Path(a.trace_in), {k: v for k, v in settings.items() if k not in skip})

    from m2r2_jax.data.eval_sets import load_eval_set
    from m2r2_jax.evaluation.moe_offload import format_table, render_png, sim_results
    from m2r2_jax.evaluation.spec_eval import machine_info

    items = load_eval_set(a.dataset, limit=a.limit)
    cal_items = []
    if ec.needs_fast and ec.alignment == "calibrated":
        from m2r2_jax.data import data_root

        cal_set = a.calibration_set or str(data_root() / CALIBRATION_SET)
        cal_items = load_eval_set(cal_set, limit=a.calibration)
        texts = {" ".join(t.lower().split()) for it in load_eval_set(a.dataset) for t in it.turns}  # all of it
        if any(" ".join(it.turns[0].lower().split()) in texts for it in cal_items):
            raise M2R2Error(f"--calibration-set {cal_set}: it shares prompts with the evaluated set")
    if recording is not None:  # a replay: no model
        res = sim_results(recording, ec)
        train_step = None if settings["checkpoint"] is None else settings["checkpoint"]["step"]
        moe = recording.recorded.get("moe")
    else:
        res, recording, train_step, moe = _run_model(a, ec, ckpt, items, cal_items, store, out, settings)
    res["config"] = dict(
        model=a.model,
        checkpoint=ckpt,
        train_step=train_step,
        dataset=a.dataset,
        limit=a.limit,
        prompts=[it.id for it in items],
        policies=list(ec.policies),
        cache_fractions=list(ec.cache_fractions),
        links=list(ec.links) if ec.mode == "sim" else ["disk"],
        compute=list(ec.compute) if ec.mode == "sim" else ["measured"],
        chip=ec.chip,
        max_new_tokens=ec.max_new_tokens,
        alignment=ec.alignment,
        calibration=[it.id for it in cal_items],
        repeats=ec.repeats,
        window="auto" if ec.window is None else ec.window,
        window_sweep=list(ec.window_sweep),
        launch_us=list(ec.launch_us) if ec.mode == "sim" else None,
        top_k_override=a.top_k,
        asset_override=a.asset,
        trace_in=a.trace_in,
        trace_out=a.trace_out,
        policy_options=ec.aot_options(),
        command="python -m eval.moe_offload " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    res["config"]["moe"] = moe
    res["machine"] = machine_info()
    out.parent.mkdir(parents=True, exist_ok=True)
    plot.parent.mkdir(parents=True, exist_ok=True)
    if a.trace_out is not None:
        from m2r2_jax.evaluation import moe_tracefile

        written = moe_tracefile.save(Path(a.trace_out), recording)
        print(f"wrote {written[0]} ({written[0].stat().st_size:,} bytes) and {written[1]}", file=sys.stderr)
    out.write_text(json.dumps(res, indent=1))
    plot.write_bytes(render_png(res, f"{a.model} on {a.dataset}: {len(items)} prompts, {ec.mode} mode"))
    print(format_table(res))
    rc = res["recall"]
    line = f"recall@{rc['k']} (chance {rc['chance']:.3f}): gate (next layer) {rc['gate']['next_layer']:.3f}"
    if "m2r2_alignments" in rc:
        line += f", m2r2 ({rc['m2r2_alignment']}) {rc['m2r2_alignments'][rc['m2r2_alignment']]:.3f}"
    line += f", previous token {rc['previous_token']:.3f}"
    print(line, file=sys.stderr)
    if not res["identical_outputs"]:
        print("WARNING: the decoded tokens differ from the plain decode's (see plain_decode_match)", file=sys.stderr)
    print(f"wrote {out} and {plot}", file=sys.stderr)
    return 0


def _run_model(a, ec, ckpt, items, cal_items, store, out, settings):
    """Load the model (and the fast stream), decode, record and evaluate: -> (result dict, Recording,
    the checkpoint's train step, the MoE's record)."""
    from m2r2_jax.decoding.generate import GenerateConfig, Generator
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.moe_decode import MoEDecoder, merged_fast_stream
    from m2r2_jax.evaluation.moe_offload import real_results, record_run, sim_results
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.loading.tokenizer import encode_chat

    if a.top_k is not None or a.asset is not None:
        from m2r2_jax.loading.moefied import load_moefied
        from m2r2_jax.loading.registry import DERIVED

        base, shipped = DERIVED[a.model]
        m = load_moefied(base, a.asset or shipped, top_k=a.top_k)
    else:
        m = load_model(a.model)
    if m.cfg.mlp_type != "moe":
        raise M2R2Error(f"--model {a.model} is not an MoE model (its MLPs are {m.cfg.mlp_type})")
    fast, meta = None, {}
    if ec.needs_fast:
        dense_name = getattr(m, "derived_from", "")
        if not dense_name:
            raise M2R2Error(
                f"m2r2_aot on {a.model}: the fast stream runs the dense model an MoEfied base was built from "
                "(a derived alias such as smollm2-135m-moe); leave m2r2_aot out of --policies for this model"
            )
        from m2r2_jax.training.checkpoint import load_m2r2

        dense = load_model(dense_name, tokenizer=False)
        mc, m2r2, _, meta = load_m2r2(ckpt, dense.cfg, dense.params, dense_name, base_fingerprint=dense.fingerprint)
        fast = merged_fast_stream(dense.cfg, mc, dense.params, m2r2)
        del dense, m2r2
    prompts = [encode_chat(m.tokenizer, [{"role": "user", "content": it.turns[0]}]) for it in items]
    cal = [encode_chat(m.tokenizer, [{"role": "user", "content": it.turns[0]}]) for it in cal_items]
    gen = Generator(m.cfg)
    plain = [gen.generate(m.params, [p], GenerateConfig(max_new_tokens=ec.max_new_tokens)).new_ids[0] for p in prompts]
    dec = MoEDecoder(m.cfg, m.params, fast)
    out.parent.mkdir(parents=True, exist_ok=True)
    progress = not a.no_progress
    recording, col = record_run(dec, prompts, ec, plain, progress, cal, settings)
    moe = moe_record(a.model, m, a.asset)
    recording.recorded["moe"] = moe
    if ec.mode == "sim":
        return sim_results(recording, ec), recording, meta.get("step"), moe
    try:
        res = real_results(dec, col, recording, ec, store, progress)
    finally:
        if not a.keep_store:
            store.unlink(missing_ok=True)
    return res, recording, meta.get("step"), moe


if __name__ == "__main__":
    run_main(main)
