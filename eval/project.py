"""Project M2R2's speculative speed-up onto accelerators (a roofline, stated as a projection).

    python -m eval.project [--model-config configs/models/smollm2_135m.yaml] [--config configs/smollm2_r3.yaml]
        [--acceptance docs/results/spec_mtbench.json] [--chips v5e,v4,v5p,h100] [--mesh tensor=4]
        [--cache-len 512] [--fill 256] [--batch 1] [--out FILE.json]

Compiles, for each TPU generation (one chip, or the --mesh over the chips of its smallest slice), the
three pieces of a speculative step as `SpeculativeDecoder.cost_breakdown` times them on the CPU: an AR
decode step, one block verification and one M2R2 draft (the whole static tree). XLA's cost analysis of
each compiled program gives FLOPs and bytes accessed per chip; the roofline turns them into times; the
acceptance statistics measured by `eval.speculative` (tau of M2R2-drafted steps, the share and tau of
prompt-lookup steps) turn the times into a speed-up. The H100 row reuses the counts of the v5p compile.
"""

from __future__ import annotations

import argparse
import json
import os

from m2r2_jax.cli import quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.project", description=__doc__.split("\n")[0])
    p.add_argument("--model-config", default="configs/models/smollm2_135m.yaml")
    p.add_argument("--config", default="configs/smollm2_r3.yaml", help="training config (its m2r2 section)")
    p.add_argument("--acceptance", default="docs/results/spec_mtbench.json", help="an eval.speculative result")
    p.add_argument("--chips", default="v5e,v4,v5p,h100")
    p.add_argument("--mesh", default="data=1", help="mesh over the slice's chips, e.g. tensor=4 (default: one chip)")
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--fill", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--attention",
        choices=("xla", "pallas"),
        default="pallas",
        help="the attention of decode steps and verification: Pallas (as on a TPU) or XLA's",
    )
    p.add_argument("--out", default=None, help="write the JSON here")
    a = p.parse_args(argv)
    quiet_env()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    from m2r2_jax.aot import compile_report, mesh_for, step_programs, tpu_devices
    from m2r2_jax.backend import Backend
    from m2r2_jax.cli import check_number, read_json
    from m2r2_jax.config import ModelConfig, from_dict, load_yaml
    from m2r2_jax.roofline import CHIPS, acceptance, chips, projected_speedup, step_ms
    from m2r2_jax.training.config import load_train_config

    names = chips(a.chips)
    for flag, v in (("--cache-len", a.cache_len), ("--fill", a.fill), ("--batch", a.batch)):
        check_number(flag, v, lo=1, integer=True)
    acc = acceptance(read_json(a.acceptance))
    tc = load_train_config(a.config)
    cfg = from_dict(ModelConfig, load_yaml(a.model_config)).validate()
    mc = tc.m2r2.validate(cfg.num_layers)
    tree = acc["tree"] if isinstance(acc["tree"], str) else "star4"
    lookup = acc["lookup_tokens"]

    counts, rows = {}, {}
    for name in names:
        chip = CHIPS[name]
        src = name if chip.topology else "v5p"
        if src not in counts:
            top = CHIPS[src].topology
            mesh = mesh_for(tpu_devices(top), a.mesh)
            progs = step_programs(
                cfg, mc, mesh, tree, lookup, a.cache_len, a.fill, a.batch, Backend(a.attention, mesh=mesh)
            )
            counts[src] = {
                "topology": top,
                "mesh": dict(mesh.shape),
                "block": progs["_block"],
                "draft_depth": progs["_depth"],
            }
            for step in ("ar", "verify", "draft"):
                fn, args, kw = progs[step]()
                r = compile_report(fn, args, CHIPS[src].hbm_bytes, **kw)
                counts[src][step] = {
                    "flops": r.flops,
                    "bytes_accessed": r.bytes_accessed,
                    "per_device_bytes": r.per_device_bytes,
                    "fits": r.fits,
                }
        c = counts[src]
        t = {s: step_ms(c[s]["flops"], c[s]["bytes_accessed"], chip) for s in ("ar", "verify", "draft")}
        args = (t["ar"]["ms"], t["draft"]["ms"], t["verify"]["ms"])
        rows[name] = {
            "chip": chip.name,
            "counts_from": src,
            "peak_flops": chip.peak_flops,
            "hbm_bw": chip.hbm_bw,
            "ar_ms": t["ar"]["ms"],
            "verify_ms": t["verify"]["ms"],
            "draft_ms": t["draft"]["ms"],
            "draft_ms_per_depth": t["draft"]["ms"] / max(c["draft_depth"] or 1, 1),
            "bound": {s: t[s]["bound"] for s in t},
            "speedup_m2r2": projected_speedup(*args, acc["tau_m2r2"]),
            "speedup_m2r2_lookup": projected_speedup(*args, acc["tau_m2r2"], acc["lookup_share"], acc["tau_lookup"])
            if acc["lookup_share"]
            else None,
        }
    out = {
        "model_config": a.model_config,
        "config": a.config,
        "acceptance_from": a.acceptance,
        "acceptance": acc,
        "cache_len": a.cache_len,
        "fill": a.fill,
        "batch": a.batch,
        "counts": counts,
        "chips": rows,
        "method": "roofline: max(FLOPs/peak, bytes/HBM bandwidth) per program per chip, no "
        "overheads; speed-up = tokens per step x AR step time / step time, acceptance measured on CPU",
    }
    for name, r in rows.items():
        mix = f"{r['speedup_m2r2_lookup']:.2f}x" if r["speedup_m2r2_lookup"] else "-"
        print(
            f"{name:5s} AR {r['ar_ms']:.3f} ms  verify {r['verify_ms']:.3f} ms  draft {r['draft_ms']:.3f} ms  "
            f"-> M2R2 {r['speedup_m2r2']:.2f}x, + lookup {mix}  ({r['bound']['ar']}-bound AR)"
        )
    if a.out:
        from pathlib import Path

        from m2r2_jax.evaluation.spec_eval import machine_info

        out["machine"] = machine_info()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1))
        print(f"wrote {a.out}")
    else:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_main(main)
