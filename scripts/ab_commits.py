"""A/B of two checkouts of this repository in one run, alternating A and B: the regression check of a
change against the commit before it.

    git worktree add /tmp/base <commit>
    python scripts/ab_commits.py --a /tmp/base --b . --rounds 2 --out docs/results/ab.json

Per side: HF parity (the parity tests), `eval.bench_decode` (ratio to HF transformers, our tokens/s),
`eval.alignment` (final agreement, MT-Bench first turns) and `eval.speculative --limit N` (speed-up over
the same side's AR, tau, lossless). The timed commands run in A, B, A, B, ... order so that machine
noise hits both alike; the report gives each side's mean and B / A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _run(tree: Path, argv: list[str], tmp: Path) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr, time.perf_counter() - t0


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output:\n" + text[-2000:])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="checkout A (the baseline)")
    p.add_argument("--b", required=True, help="checkout B (the change)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--limit", type=int, default=16, help="eval.speculative --limit")
    p.add_argument("--dataset", default="mt_bench", help="eval.speculative --dataset")
    p.add_argument("--cpu-kernel", default="auto", help="--cpu-kernel for both sides' timed commands")
    p.add_argument("--skip-alignment", action="store_true", help="skip eval.alignment (about 17 min a side)")
    p.add_argument("--skip-parity", action="store_true", help="skip the HF parity tests")
    p.add_argument("--skip-spec", action="store_true", help="skip eval.speculative (bench_decode only)")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    trees = {"A": Path(a.a).resolve(), "B": Path(a.b).resolve()}
    tmp = Path(a.out).resolve().parent
    res = {"trees": {k: str(v) for k, v in trees.items()}, "commits": {}, "runs": []}
    for k, t in trees.items():
        res["commits"][k] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=t, capture_output=True, text=True
        ).stdout.strip()

    def record(side, name, rc, out, sec, fig):
        res["runs"].append(dict(side=side, name=name, rc=rc, seconds=round(sec, 1), **fig))
        print(f"{side} {name}: rc {rc} {fig} ({sec:.0f}s)", flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))

    def _parity(side, t):
        rc, out, sec = _run(
            t,
            [
                "-m",
                "pytest",
                "-q",
                "tests/test_model_parity.py",
                "tests/test_smollm2.py",
                "-k",
                "parity or identical_to_hf",
            ],
            tmp,
        )
        record(side, "hf_parity_tests", rc, out, sec, {"summary": out.strip().splitlines()[-1]})

    # untimed, once per side: parity with HF and the alignment figure
    for side, t in trees.items():
        if not a.skip_parity:
            _parity(side, t)
        if a.skip_alignment:
            continue
        rc, out, sec = _run(t, ["-m", "eval.alignment", "--model", "smollm2-135m", "--json"], tmp)
        j = _last_json(out) if rc == 0 else {}
        record(
            side, "alignment", rc, out, sec, {"final_agreement": j.get("final_agreement"), "tokens": j.get("tokens")}
        )
    # timed, alternating
    for r in range(a.rounds):
        for side, t in trees.items():
            rc, out, sec = _run(
                t,
                ["-m", "eval.bench_decode", "--model", "smollm2-135m", "--json", "--repeats", "1"]
                + ["--cpu-kernel", a.cpu_kernel],
                tmp,
            )
            j = _last_json(out) if rc == 0 else {}
            record(
                side,
                "bench_decode",
                rc,
                out,
                sec,
                {
                    "round": r,
                    "ratio_vs_hf": j.get("ratio_vs_hf"),
                    "ours_tokens_per_second": j.get("ours_tokens_per_second"),
                    "identical_to_hf": j.get("greedy_tokens_identical_to_hf"),
                },
            )
            if a.skip_spec:
                continue
            o = tmp / f"ab_spec_{side}_{r}.json"
            for f in (o, o.with_suffix(".partial.jsonl")):
                f.unlink(missing_ok=True)
            rc, out, sec = _run(
                t,
                [
                    "-m",
                    "eval.speculative",
                    "--model",
                    "smollm2-135m",
                    "--dataset",
                    a.dataset,
                    "--limit",
                    str(a.limit),
                    "--no-progress",
                    "--cpu-kernel",
                    a.cpu_kernel,
                    "--out",
                    str(o),
                ],
                tmp,
            )
            j = json.loads(o.read_text()) if rc == 0 and o.exists() else {}
            record(
                side,
                "speculative",
                rc,
                out,
                sec,
                {
                    "round": r,
                    "speedup": j.get("overall_speedup"),
                    "tau": j.get("tau"),
                    "lossless": j.get("lossless"),
                    "prompts": j.get("prompts"),
                    "ar_tps": (j.get("totals") or {}).get("ar_tps"),
                    "spec_tps": (j.get("totals") or {}).get("spec_tps"),
                },
            )
            for f in (o, o.with_suffix(".png")):
                f.unlink(missing_ok=True)
    summary = {}
    for name, keys in (
        ("alignment", ["final_agreement"]),
        ("bench_decode", ["ratio_vs_hf", "ours_tokens_per_second"]),
        ("speculative", ["speedup", "tau", "ar_tps", "spec_tps"]),
    ):
        for key in keys:
            vals = {
                s: [x[key] for x in res["runs"] if x["side"] == s and x["name"] == name and x.get(key) is not None]
                for s in trees
            }
            if all(vals.values()):
                ma, mb = statistics.mean(vals["A"]), statistics.mean(vals["B"])
                summary[f"{name}.{key}"] = {"A": ma, "B": mb, "B_over_A": mb / ma if ma else None}
    res["summary"] = summary
    res["lossless"] = {
        s: all(x["lossless"] for x in res["runs"] if x["side"] == s and x["name"] == "speculative") for s in trees
    }
    Path(a.out).write_text(json.dumps(res, indent=1))
    for k, v in summary.items():
        print(f"{k:40s} A {v['A']:.4f}  B {v['B']:.4f}  B/A {v['B_over_A']:.4f}")
    print("lossless:", res["lossless"])


if __name__ == "__main__":
    main()
