"""Distil the 2-model drafter's small model from a frozen base: the base's config at N layers (the project's
decoder), initialised from N evenly spaced base layers and the final norm, sharing the base's embedding and
tied head; its layers and final norm trained with KL to the full model's logits on a self-distillation
cache.

    python -m train.train_sps --model smollm2-135m --distill-dir DIR --out DIR [--layers 3] \
        [--steps 200] [--batch-size 8] [--lr 3e-4] [--limit N] [--minutes M] [--save-minutes 10] \
        [--no-progress]

Orbax checkpoints (at least every --save-minutes, and at the end), metrics (JSONL + TensorBoard) under
--out; the same command resumes exactly. `eval.speculative --drafter sps --sps-checkpoint DIR` drafts
with it.

--minutes M: a wall-clock training budget, the same for every peer trainer (README, "Every trained
peer"; peers/budget.py).
"""

from __future__ import annotations

from m2r2_jax.cli import peer_trainer_main, run_main


def main(argv=None):
    return peer_trainer_main("sps", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
