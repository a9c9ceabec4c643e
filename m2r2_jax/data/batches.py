"""Static-shape training batches from the self-distillation cache.

Each example is prompt + the base's own answer, truncated / right-padded to
`seq_len`; the loss mask covers answer tokens. The order is a deterministic
function of (seed, epoch), so a data position (the number of batches already
consumed) is all a checkpoint needs to resume the exact stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from m2r2_jax.errors import M2R2Error


def pack_examples(
    records: Sequence[dict], seq_len: int, pad_id: int = 0, loss_on_prompt: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """-> tokens [N, seq_len] int32, mask [N, seq_len] float32 (1 on answer tokens; with
    `loss_on_prompt`, on every real token: the full model's distribution, the target of
    self-distillation, exists at prompt positions too).

    Long examples keep the end of the prompt (the context the answer needs) and
    as much of the answer as fits.
    """
    toks = np.full((len(records), seq_len), pad_id, np.int32)
    mask = np.zeros((len(records), seq_len), np.float32)
    for i, r in enumerate(records):
        p, a = list(r["prompt_ids"]), list(r["answer_ids"])
        if not a:
            continue
        keep_p = min(len(p), max(seq_len // 2, seq_len - len(a)))
        p = p[len(p) - keep_p :]
        seq = (p + a)[:seq_len]
        toks[i, : len(seq)] = seq
        mask[i, 0 if loss_on_prompt else len(p) : len(seq)] = 1.0
    return toks, mask


class BatchStream:
    """Infinite, resumable stream of (tokens, mask) batches."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, batch_size: int, seed: int = 0):
        if len(tokens) < batch_size:
            raise M2R2Error(f"only {len(tokens)} training examples for batch_size={batch_size}")
        self.tokens, self.mask, self.batch_size, self.seed = tokens, mask, batch_size, seed
        self.per_epoch = len(tokens) // batch_size

    def indices_at(self, position: int) -> np.ndarray:
        """Example indices of batch `position` (sorted)."""
        epoch, k = divmod(position, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.tokens))
        return np.sort(order[k * self.batch_size : (k + 1) * self.batch_size])

    def batch_at(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices_at(position)
        return self.tokens[idx], self.mask[idx]

    def iterate(self, start: int = 0) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
        pos = start
        while True:
            yield pos, self.batch_at(pos)
            pos += 1
