"""Ahead-of-time expert loading on an MoE base: routing traces of greedy decoding, recall of the experts
predicted by M2R2's fast stream and by the next-layer gate, and the cache policies replayed on modelled
links (sim) or run for real against an expert file on this machine's disk (real).

    python -m eval.moe_offload --model smollm2-135m-moe --dataset NAME_OR_PATH [--limit N] \
        [--max-new-tokens N] [--cache-fraction 0.25,0.5,0.75] \
        [--policies ondemand,lru,gate_prefetch,m2r2_aot] [--mode sim|real] \
        [--link pcie4,nvme,pcie5] [--compute measured,projected] [--chip h100] \
        [--checkpoint DIR] [--store FILE] [--repeats N] --out FILE.json [--plot FILE.png]

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


def _floats(flag: str, text: str) -> tuple[float, ...]:
    from m2r2_jax.errors import M2R2Error

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise M2R2Error(f"{flag} {text!r}: expected numbers separated by commas") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


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
    p.add_argument("--alignment", default="auto", help="fast state per slow layer: auto, floor, nearest, ceil")
    p.add_argument("--store", default=None, help="real: the expert file (default: next to --out; a disk, not tmpfs)")
    p.add_argument("--repeats", type=int, default=1, help="real: runs of each policy (round-robin; fastest kept)")
    p.add_argument("--keep-store", action="store_true", help="real: keep the expert file afterwards")
    p.add_argument("--out", default=None, help="result JSON (default runs/moe_offload/<dataset>_<mode>.json)")
    p.add_argument("--plot", default=None, help="PNG (default: --out with .png)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def check_path(f: Path, flag: str) -> None:
    from m2r2_jax.errors import M2R2Error

    if not f.parent.is_dir():
        raise M2R2Error(f"{flag}: directory {f.parent} does not exist")
    if f.is_dir():
        raise M2R2Error(f"{flag}: {f} is a directory")


def moe_record(name: str, m) -> dict:
    """The MoE's shape and, for a MoEfied alias, the build of its asset (an alias may be rebuilt later)."""
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

        meta = read_moe_meta(ASSETS / derived[name][1])
        rec["asset"] = {k: meta.get(k) for k in ("build", "held_out_mean")}
    return rec


def main(argv=None):
    a = parse(argv)
    quiet_env()
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.moe_offload import RAM_FILESYSTEMS, MoEOffloadConfig, filesystem_of

    if a.limit < 1:
        raise M2R2Error(f"--limit must be >= 1, got {a.limit}")
    if a.mode == "real" and a.link is not None:
        raise M2R2Error("--link applies to --mode sim: real mode reads this machine's disk")
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
    ckpt = None
    if ec.needs_fast:
        from m2r2_jax.training.checkpoint import resolve_checkpoint_dir

        ckpt = a.checkpoint or str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
        resolve_checkpoint_dir(ckpt)

    from m2r2_jax.data.eval_sets import load_eval_set
    from m2r2_jax.decoding.generate import GenerateConfig, Generator
    from m2r2_jax.evaluation.moe_decode import MoEDecoder, merged_fast_stream
    from m2r2_jax.evaluation.moe_offload import format_table, render_png, run_moe_offload
    from m2r2_jax.evaluation.spec_eval import machine_info
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.loading.tokenizer import encode_chat

    items = load_eval_set(a.dataset, limit=a.limit)
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
    gen = Generator(m.cfg)
    plain = [gen.generate(m.params, [p], GenerateConfig(max_new_tokens=ec.max_new_tokens)).new_ids[0] for p in prompts]
    dec = MoEDecoder(m.cfg, m.params, fast)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        res = run_moe_offload(dec, prompts, ec, store_path=store, plain_tokens=plain, progress=not a.no_progress)
    finally:
        if store is not None and not a.keep_store:
            store.unlink(missing_ok=True)
    res["config"] = dict(
        model=a.model,
        checkpoint=ckpt,
        train_step=meta.get("step"),
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
        repeats=ec.repeats,
        command="python -m eval.moe_offload " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    res["config"]["moe"] = moe_record(a.model, m)
    res["machine"] = machine_info()
    plot.parent.mkdir(parents=True, exist_ok=True)
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


if __name__ == "__main__":
    run_main(main)
