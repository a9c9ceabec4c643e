"""Decode-step costs under different XLA:CPU kernel settings (XLA_FLAGS).

Runs scripts/bench_draft.py once per setting, each in a fresh process (XLA reads its flags
at start-up), and prints one table: plain decode step, merged draft, verification of 2
tokens, and the two ratios the speculative speed-up depends on.

    python scripts/bench_xla_flags.py [--repeats 20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS = {
    "default": "",
    "no XNNPACK": "--xla_cpu_use_xnnpack=false",
    "XNN dot fusion": "--xla_cpu_experimental_xnn_fusion_type=+dot",
    "YNN dot fusion": "--xla_cpu_experimental_ynn_fusion_type=+dot",
    "oneDNN": "--xla_cpu_use_onednn=true",
    "vector width 512": "--xla_cpu_prefer_vector_width=512",
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--only", nargs="*", default=None, help="setting names to run (default: all)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = {}
    for name, flags in SETTINGS.items():
        if a.only and name not in a.only:
            continue
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "bench_draft.py"), "--repeats", str(a.repeats)],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            rows[name] = {"flags": flags, "error": proc.stderr.strip().splitlines()[-1:]}
            print(f"{name}: failed: {rows[name]['error']}", flush=True)
            continue
        r = json.loads(proc.stdout[proc.stdout.index("{") :])
        r["flags"] = flags
        rows[name] = r
        print(
            f"{name:<18} step {r['ar_step_ms']:6.1f} ms  draft {r['draft_merged_ms']:5.1f} ms "
            f"({r['draft_merged_steps']:.3f})  verify2 {r['verify2_ms']:6.1f} ms ({r['verify2_steps']:.3f})"
            f"  same draft {r['same_draft_token']}",
            flush=True,
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
