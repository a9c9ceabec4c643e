"""Choose a draft tree from measured acceptance and measured costs.

    python -m eval.select_tree --spec RESULT.json --bench BENCH.json --draft-cost C [--out configs/trees/x.json]

RESULT.json: `eval.speculative --out` over an exploratory tree (e.g. --tree tree64), whose
node_acceptance gives per-depth, per-rank acceptance; BENCH.json: `eval.bench_decode --json`, whose
verify_cost gives the verification-cost curve; C: one drafted depth in plain decode steps (from
eval.speculative's cost breakdown). Prints the expected tokens per step, step cost and speed-up per
tree size and writes the best tree's paths (usable as `--tree FILE.json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from m2r2_jax.cli import run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.select_tree", description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True)
    p.add_argument("--bench", required=True)
    p.add_argument("--draft-cost", type=float, required=True, help="one drafted depth, in plain decode steps")
    p.add_argument("--node-cost", type=float, default=0.0)
    p.add_argument("--max-nodes", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    from m2r2_jax.cli import check_number, read_json
    from m2r2_jax.decoding.tree_select import acceptance_from_nodes, select_tree
    from m2r2_jax.errors import M2R2Error

    check_number("--draft-cost", a.draft_cost, lo=0)
    check_number("--node-cost", a.node_cost, lo=0)
    check_number("--max-nodes", a.max_nodes, lo=1, integer=True)
    if a.out and not Path(a.out).parent.is_dir():
        raise M2R2Error(f"--out: directory {Path(a.out).parent} does not exist")
    spec, bench = read_json(a.spec), read_json(a.bench)
    if not isinstance(spec, dict) or not spec.get("node_acceptance"):
        raise M2R2Error(f"{a.spec} has no node_acceptance (run eval.speculative greedy over an exploratory tree)")
    if not isinstance(bench, dict) or not isinstance(bench.get("verify_cost"), dict):
        raise M2R2Error(f"{a.bench} has no verify_cost (run eval.bench_decode --json)")
    try:
        curve = {int(k): float(v["relative"]) for k, v in bench["verify_cost"].items()}
        acc = acceptance_from_nodes(spec["node_acceptance"])
    except (KeyError, TypeError, ValueError) as e:
        raise M2R2Error(f"malformed node_acceptance or verify_cost ({type(e).__name__}: {e})") from None
    if 1 not in curve:
        raise M2R2Error(f"{a.bench}: verify_cost has no entry for T = 1")
    choice = select_tree(acc, curve, a.draft_cost, a.node_cost, a.max_nodes)
    for T, d, tau, cost, sp in choice.table:
        print(f"T={T:3d} depth={d} tau={tau:.2f} cost={cost:.2f} speedup={sp:.3f}")
    print(f"best: {choice.tree.size} nodes, depth {choice.tree.max_depth}, expected speed-up {choice.speedup:.3f}")
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {
                    "paths": [list(x) for x in choice.tree.paths],
                    "expected_tokens": choice.expected_tokens,
                    "step_cost": choice.step_cost,
                    "speedup": choice.speedup,
                }
            )
        )
    return 0


if __name__ == "__main__":
    run_main(main)
