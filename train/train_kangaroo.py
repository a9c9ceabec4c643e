"""Train Kangaroo's adapter on a frozen base: the first E base layers, then one attention layer and two
RMSNorms under the frozen LM head, with soft cross-entropy to the full model's next-token distribution
on a self-distillation cache.

    python -m train.train_kangaroo --model smollm2-135m --distill-dir DIR --out DIR [--exit-layer 3] \
        [--steps 200] [--batch-size 8] [--lr 1e-3] [--limit N] [--minutes M] [--save-minutes 10] \
        [--no-progress]

Orbax checkpoints (at least every --save-minutes, and at the end), metrics (JSONL + TensorBoard) under
--out; the same command resumes exactly. `eval.speculative --drafter kangaroo --kangaroo-checkpoint DIR`
drafts with it.

--minutes M: a wall-clock training budget, the same for every peer trainer (README, "Every trained
peer"; peers/budget.py).
"""

from __future__ import annotations

from m2r2_jax.cli import peer_trainer_main, run_main


def main(argv=None):
    return peer_trainer_main("kangaroo", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
