"""Train Medusa-1's heads on a frozen base: K residual blocks on the full model's final hidden state, each
under the base's frozen LM head, head k predicting the token k + 2 places ahead, with cross-entropy to
the self-distilled answers' tokens.

    python -m train.train_medusa --model smollm2-135m --distill-dir DIR --out DIR [--heads 4] \
        [--steps 400] [--batch-size 8] [--seq-len 256] [--lr 1e-3] [--limit N] [--minutes M] \
        [--save-minutes 10] [--no-progress]

Orbax checkpoints (at least every --save-minutes, and at the end), metrics (JSONL + TensorBoard) under
--out; the same command resumes exactly. `eval.speculative --drafter medusa --medusa-checkpoint DIR`
drafts with it.

--minutes M: a wall-clock training budget, the same for every peer trainer (README, "Every trained
peer"; peers/budget.py).
"""

from __future__ import annotations

from m2r2_jax.cli import peer_trainer_main, run_main


def main(argv=None):
    return peer_trainer_main("medusa", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
