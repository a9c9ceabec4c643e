"""Compile the project's programs for a TPU slice ahead of time, on this machine, and report what they
need per chip.

    python -m eval.compile_tpu --topology v5e:2x2 [--config configs/smollm2_r3.yaml]
        [--model-config configs/models/llama3_8b.yaml] --what train,prefill,decode,speculative
        [--mesh data=..,fsdp=..,tensor=..] [--batch B] [--seq-len N] [--prompt-len P] [--max-new-tokens N] --json

Params are abstract (shapes, dtypes and shardings only): no weights are read or downloaded. Per program:
whether it fits the chip's HBM, per-device bytes (arguments + outputs + temporaries - aliased), FLOPs and
bytes accessed (XLA's cost analysis) and the collectives in the compiled HLO. A program that does not fit
is reported, and the command exits 2 with one error line naming it.
"""

from __future__ import annotations

import argparse
import json
import os

from m2r2_jax.cli import quiet_env, run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.compile_tpu", description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e:2x2", help="TPU topology, e.g. v5e:2x2, v5e:4x4, v4:2x2x2")
    p.add_argument("--config", default="configs/smollm2_r3.yaml", help="training config (its m2r2 section)")
    p.add_argument("--model-config", default="configs/models/smollm2_135m.yaml", help="model shape (YAML)")
    p.add_argument("--what", default="train,prefill,decode,speculative")
    p.add_argument("--mesh", default=None, help="mesh axes over the slice's chips (default: data over all)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="training sequence length (default: the config's)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--attention",
        choices=("xla", "pallas"),
        default="pallas",
        help="decode loops' attention: the Pallas tree attention (as on a TPU) or XLA's",
    )
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    quiet_env()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs on its CPU; the TPU is only described

    from m2r2_jax.cli import check_number
    from m2r2_jax.config import ModelConfig, from_dict, load_yaml
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.training.config import load_train_config

    what = [w.strip() for w in a.what.split(",") if w.strip()]
    from m2r2_jax.aot import PROGRAMS, compile_report, hbm_bytes, mesh_for, programs, tpu_devices

    bad = [w for w in what if w not in PROGRAMS]
    if bad or not what:
        raise M2R2Error(f"--what {a.what!r}: choose from {', '.join(PROGRAMS)}")
    for flag, v in (("--batch", a.batch), ("--prompt-len", a.prompt_len), ("--max-new-tokens", a.max_new_tokens)):
        check_number(flag, v, lo=1, integer=True)
    tc = load_train_config(a.config)
    cfg = from_dict(ModelConfig, load_yaml(a.model_config)).validate()
    seq_len = a.seq_len or tc.seq_len
    check_number("--seq-len", seq_len, lo=2, integer=True)
    mc = tc.m2r2.validate(cfg.num_layers)
    hbm = hbm_bytes(a.topology)
    devices = tpu_devices(a.topology)
    mesh = mesh_for(devices, a.mesh)
    from m2r2_jax.backend import Backend

    backend = Backend(a.attention, mesh=mesh)
    progs = programs(cfg, mc, mesh, a.batch, seq_len, a.prompt_len, a.max_new_tokens, backend=backend)
    out = {
        "topology": a.topology,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "attention": a.attention,
        "model_config": a.model_config,
        "config": a.config,
        "batch": a.batch,
        "seq_len": seq_len,
        "prompt_len": a.prompt_len,
        "max_new_tokens": a.max_new_tokens,
        "programs": {},
    }
    for name in what:
        fn, args, kw = progs[name]()
        try:
            out["programs"][name] = compile_report(fn, args, hbm, **kw).as_dict()
        except Exception as e:  # noqa: BLE001 - a compiler error for this program, reported as such
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            raise M2R2Error(f"compiling {name} for {a.topology} failed: {msg}") from None
    if a.json:
        print(json.dumps(out))
    else:
        for name, r in out["programs"].items():
            print(
                f"{name:12s} fits={r['fits']!s:5s} per-device {r['per_device_bytes'] / 2**30:7.3f} GiB of "
                f"{r['hbm_bytes'] / 2**30:.0f}  flops {r['flops']:.3e}  bytes {r['bytes_accessed']:.3e}  "
                f"collectives {r['collectives']}"
            )
    over = [n for n, r in out["programs"].items() if not r["fits"]]
    if over:
        raise M2R2Error(
            f"{', '.join(over)} does not fit {a.topology}'s {hbm / 2**30:.0f} GiB per chip "
            f"(needs {max(out['programs'][n]['per_device_bytes'] for n in over) / 2**30:.2f} GiB)"
        )
    return 0


if __name__ == "__main__":
    run_main(main)
