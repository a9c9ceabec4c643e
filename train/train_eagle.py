"""Train EAGLE's draft model on a frozen base: one decoder layer over fc([embedding(x_{t+1}), f_t]) that
predicts the next final feature f_{t+1}, under the base's frozen LM head, with EAGLE's loss (smooth-L1
feature regression + 0.1 x cross-entropy to the self-distilled answers' tokens) and uniform noise on the
input features. EAGLE-2 (`--drafter eagle2`) drafts with the same weights.

    python -m train.train_eagle --model smollm2-135m --distill-dir DIR --out DIR [--steps 400] \
        [--batch-size 8] [--seq-len 256] [--lr 5e-4] [--noise 0.2] [--limit N] [--minutes M] \
        [--save-minutes 10] [--no-progress]

Orbax checkpoints (at least every --save-minutes, and at the end), metrics (JSONL + TensorBoard) under
--out; the same command resumes exactly. `eval.speculative --drafter eagle|eagle2 --eagle-checkpoint DIR`
drafts with it.

--minutes M: a wall-clock training budget, the same for every peer trainer (README, "Every trained
peer"; peers/budget.py).
"""

from __future__ import annotations

from m2r2_jax.cli import peer_trainer_main, run_main


def main(argv=None):
    return peer_trainer_main("eagle", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
