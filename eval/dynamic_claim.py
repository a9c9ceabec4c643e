"""The paper's early-exit claim, tested on `eval.dynamic` results: at the speed-ups each peer reaches,
is M2R2's ROUGE-L against the full model's output higher? One result file per dataset.

    python -m eval.dynamic_claim RESULT.json [RESULT.json ...] [--json OUT.json] [--plot-dir DIR]

Results of the same dataset (same model, limit, prompts, max new tokens) are merged: the methods of one
run and the trained peers of a later one, say (a method in two of them is refused). Prints, per dataset
and peer, how many of the peer's points M2R2's upper envelope (over m2r2 and
m2r2_deferred) beats, and whether M2R2 is ahead of every peer on that dataset; then on how many datasets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from m2r2_jax.cli import run_main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m eval.dynamic_claim", description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="+", help="eval.dynamic JSON results, one per dataset")
    p.add_argument("--json", default=None, help="write the verdicts as JSON here")
    p.add_argument("--plot-dir", default=None, help="write each dataset's merged curves here as DATASET.png")
    a = p.parse_args(argv)
    from m2r2_jax.errors import M2R2Error
    from m2r2_jax.evaluation.dynamic_eval import claim_check, merge_results, render_png

    if a.plot_dir is not None and not Path(a.plot_dir).is_dir():
        raise M2R2Error(f"--plot-dir: directory {a.plot_dir} does not exist")
    groups: dict[str, list] = {}
    for f in a.results:
        path = Path(f)
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise M2R2Error(f"cannot read result {f}: {e}") from None
        if not isinstance(res, dict) or not isinstance(res.get("methods"), dict):
            raise M2R2Error(f"{f} is not an eval.dynamic result (no 'methods')")
        name = (res.get("config") or {}).get("dataset") or path.stem
        groups.setdefault(name, []).append((str(path), res))
    out = {}
    for name, group in groups.items():
        res = merge_results(group)
        out[name] = claim_check(res)
        out[name]["sources"] = res["sources"]
        if a.plot_dir is not None:
            stem = Path(name).name.replace(":", "_") or "dataset"
            title = f"{(res.get('config') or {}).get('model')} on {name}: {res.get('prompts')} prompts, greedy"
            (Path(a.plot_dir) / f"{stem}.png").write_bytes(render_png(res, title))
    print("| dataset | peer | M2R2 higher at | ahead |")
    print("|---|---|---:|---|")
    for ds, c in out.items():
        for peer, v in c["peers"].items():
            print(f"| {ds} | {peer} | {v['m2r2_higher']}/{len(v['points'])} | {'yes' if v['beaten'] else 'no'} |")
    won = sum(c["all_beaten"] for c in out.values())
    print(f"M2R2 ahead of every peer on {won} of {len(out)} datasets", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(datasets=out, datasets_won=won), indent=1))
    return 0


if __name__ == "__main__":
    run_main(main)
