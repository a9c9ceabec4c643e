"""Train Medusa-1's heads on a frozen base: K residual blocks on the full model's final hidden state, each
under the base's frozen LM head, head k predicting the token k + 2 places ahead, with cross-entropy to
the self-distilled answers' tokens.

    python -m train.train_medusa --model smollm2-135m --distill-dir DIR --out DIR [--heads 4] \
        [--steps 400] [--batch-size 8] [--seq-len 256] [--lr 1e-3] [--limit N] [--minutes M] \
        [--save-minutes 10] [--no-progress]

Orbax checkpoints (at least every --save-minutes, and at the end), metrics (JSONL + TensorBoard) under
--out; the same command resumes exactly. `eval.speculative --drafter medusa --medusa-checkpoint DIR`
drafts with it.

--minutes M: a wall-clock budget: the run stops after the step during which M minutes of training (from
the first step's start, compile included, summed over resumed calls) are spent, and saves; every
checkpoint's metadata records train_minutes, steps_run, trainable_params, budget_minutes. The
learning-rate schedule stays defined on --steps: give more steps than the budget reaches.
"""

from __future__ import annotations

from m2r2_jax.cli import peer_trainer_main, run_main


def main(argv=None):
    return peer_trainer_main("medusa", __doc__, argv)


if __name__ == "__main__":
    run_main(main)
