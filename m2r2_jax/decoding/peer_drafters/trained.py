"""What the feature-reading trained peers (Medusa, EAGLE, EAGLE-2) share in the loop: their `--drafter`
options over a training checkpoint (train.train_medusa / train.train_eagle's --out, read through
peers/draft_checkpoint.py: the base is checked where the drafter is prepared, so a checkpoint trained on
another base is refused in one line), and their combination with prompt lookup.

Options (frozen dataclasses with `checkpoint`, `lookup`, `lookup_ngram`, `lookup_min_ngram` and their
own knobs) implement `peer_config()`, `abstract_params(cfg)` and `peer(cfg, backend)`; the rest is here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from jax import lax

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.decoding.drafters import Drafter, PromptLookup, pad_block
from m2r2_jax.decoding.peer_drafters.with_lookup import WithLookup
from m2r2_jax.decoding.state import DraftView, Proposal, TreeLayout
from m2r2_jax.decoding.trees import DraftTree
from m2r2_jax.decoding.verify import TreeTables
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers.draft_checkpoint import check_base, resolve_draft_checkpoint, restore_draft_params


def check_tree_ranks(label: str, tree: DraftTree, cfg) -> None:
    if cfg is not None and tree.topk > cfg.vocab_size:
        raise M2R2Error(f"{label}: tree {tree.name!r} ranks {tree.topk} candidates, more than the vocabulary")


def _count(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise M2R2Error(f"{name} must be an integer >= {lo}, got {v!r}")


@functools.lru_cache(maxsize=4)
def _restore(opts, cfg, step_dir: str, step: int):
    """The checkpoint's params, restored once per (options, model config, step)."""
    from pathlib import Path

    return restore_draft_params(Path(step_dir), step, opts.abstract_params(cfg), opts.name)


class TrainedPeerOptions:
    """The shared part of the trained peers' options (a mixin of the frozen options dataclasses)."""

    needs_m2r2 = False
    name = ""
    kind = ""  # the checkpoint kind its training writes

    def check_common(self) -> None:
        if not self.checkpoint:
            raise M2R2Error(
                f"{self.name}: a trained checkpoint is required (--{self.kind}-checkpoint DIR, "
                f"written by train.train_{self.kind})"
            )
        object.__setattr__(self, "checkpoint", str(self.checkpoint))
        resolve_draft_checkpoint(self.checkpoint, self.kind, self.name)
        _count(f"{self.name}: lookup", self.lookup, 0)
        if self.lookup:
            self.lookup_drafter()

    def lookup_drafter(self) -> PromptLookup:
        return PromptLookup(self.lookup, self.lookup_ngram, self.lookup_min_ngram)

    def checkpoint_meta(self):
        """-> (step dir, step, meta) of the checkpoint's latest step."""
        return resolve_draft_checkpoint(self.checkpoint, self.kind, self.name)

    def config_from_meta(self, cls):
        _, _, meta = self.checkpoint_meta()
        try:
            return cls(**meta["config"])
        except TypeError as e:
            raise M2R2Error(f"{self.name}: checkpoint {self.checkpoint} has an unknown config ({e})") from None

    def drafter(self, cfg, mc=None, backend: Backend = XLA) -> Drafter:
        p = self.peer(cfg, backend)
        return FeatureWithLookup(p, self.lookup_drafter()) if self.lookup else p

    def sources(self) -> tuple:
        return ()

    def prepare(self, spec, base, m2r2=None) -> Any:
        step_dir, step, meta = self.checkpoint_meta()
        check_base(meta, spec.cfg, base, self.name, step_dir)
        return spec.prepare(base, _restore(self, spec.cfg, str(step_dir), step))

    def budget(self) -> dict:
        """What eval.compare reports for it: trainable parameters and training minutes (its checkpoint's)."""
        _, _, meta = self.checkpoint_meta()
        return dict(trainable_params=meta.get("trainable_params"), train_minutes=meta.get("train_minutes"))

    def describe(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: (v.name if isinstance(v, DraftTree) else v) for k, v in d.items()}
        return dict(d, trained_steps=self.checkpoint_meta()[2].get("step"), **self.budget())


def pad_layout(lay: TreeLayout, Tv: int, K: int, W: int) -> TreeLayout:
    """A per-row layout grown to Tv nodes, K children and W path entries (padding nodes see only
    themselves, sit at depth 0 and are nobody's child)."""
    B, t = lay.depth.shape
    k, w = lay.children.shape[2], lay.path.shape[2]
    if (t, k, w) == (Tv, K, W):
        return lay
    mask = jnp.broadcast_to(jnp.eye(Tv, dtype=bool), (B, Tv, Tv)).at[:, :t, :t].set(lay.mask)
    return TreeLayout(
        mask,
        jnp.pad(lay.depth, ((0, 0), (0, Tv - t))),
        jnp.pad(lay.parent, ((0, 0), (0, Tv - t))),
        jnp.pad(lay.children, ((0, 0), (0, Tv - t), (0, K - k)), constant_values=-1),
        jnp.pad(lay.path, ((0, 0), (0, Tv - t), (0, W - w))),
    )


@dataclasses.dataclass(frozen=True, eq=True)
class FeatureWithLookup(WithLookup):
    """`WithLookup` for the peers that read the full model's hidden states (and EAGLE's own draft cache,
    which its `update_state` extends after every step whichever branch drafted): forwards
    `needs_hidden` / `dynamic`, and hands the loop a layout on lookup steps of a dynamic peer."""

    def __post_init__(self):
        pass

    @property
    def needs_hidden(self):
        return self.inner.needs_hidden

    @property
    def dynamic(self):
        return self.inner.dynamic

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        if not self.inner.dynamic:
            return super().propose(dparams, base, view)
        tt = TreeTables.of(self.trees, self.block_size)
        B, n_inner = view.cur.shape[0], len(self.inner.trees)
        found, cand = self.lookup.search(view)

        def from_lookup():
            toks = pad_block(jnp.concatenate([view.cur[:, None], cand], 1), tt.block)
            return toks, jnp.int32(n_inner), tt.layout(n_inner, B)

        def from_inner():
            p = self.inner.propose(dparams, base, view)
            return pad_block(p.tokens, tt.block), p.tree, pad_layout(p.layout, tt.block, tt.children.shape[2], tt.width)

        toks, tree, lay = lax.cond(jnp.any(found & view.active), from_lookup, from_inner)
        return Proposal(toks, tree, lay)
