"""Train M2R2 accelerated residuals from a frozen base.

    python -m train.train --config configs/smollm2_r3.yaml [key=value ...]

Self-distils the training prompts with the frozen base (cached on disk,
resumable), then trains adapters + ARLA router; resumes from the newest
checkpoint in `out_dir` when there is one.
"""

from __future__ import annotations

import argparse

from m2r2_jax.cli import quiet_env, run_main
from m2r2_jax.errors import M2R2Error


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m train.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    p.add_argument("--distill-only", action="store_true", help="only build the self-distillation cache")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop (with a checkpoint) after this step; the schedule stays defined on `steps`",
    )
    p.add_argument("overrides", nargs="*", help="key=value (e.g. m2r2.rank=16 steps=500)")
    a = p.parse_args(argv)
    if a.stop_at is not None and a.stop_at < 1:
        raise M2R2Error(f"--stop-at must be a step >= 1, got {a.stop_at}")
    quiet_env()

    from m2r2_jax.training.config import load_train_config
    from m2r2_jax.training.trainer import distilled_records, train

    tc = load_train_config(a.config, a.overrides)
    if a.distill_only:
        from m2r2_jax.loading.registry import load_model

        recs = distilled_records(tc, load_model(tc.model), progress=not a.no_progress)
        print(
            f"distill cache {tc.data.distill_dir}: {len(recs)} records, "
            f"{sum(len(r['answer_ids']) for r in recs)} answer tokens"
        )
        return 0
    r = train(tc, progress=not a.no_progress, stop_at=a.stop_at)
    last = r.history[-1] if r.history else {}
    print(
        f"done: step {r.step}; out_dir {tc.out_dir}"
        + (f"; loss {float(last['loss']):.4f} agreement {float(last['agreement']):.3f}" if last else "")
    )
    return 0


if __name__ == "__main__":
    run_main(main)
