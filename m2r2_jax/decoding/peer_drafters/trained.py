"""The trained peers' `--drafter` options (registered in options.py): Kangaroo and the 2-model drafter
here, Medusa, EAGLE and EAGLE-2 next to their drafters (medusa.py, eagle.py); and the combination with
prompt lookup of the peers that read the full model's hidden states.

Each reads its training checkpoint's metadata (train.train_<kind>'s --out, read through
peers/draft_checkpoint.py) when the options are made, so a missing or foreign checkpoint is one error
line before any model loads; builds its drafter from the checkpoint's config; and restores the trained
params where the drafter is prepared, refusing a checkpoint trained on another base model (one line).
`lookup` > 0 combines the drafter with prompt lookup (with_lookup.py). `budget()` is the checkpoint's
trainable parameters and training minutes, for eval.compare.

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
from m2r2_jax.decoding.peer_drafters.kangaroo import Kangaroo
from m2r2_jax.decoding.peer_drafters.shadow import check_chain_knobs
from m2r2_jax.decoding.peer_drafters.sps import Sps
from m2r2_jax.decoding.peer_drafters.with_lookup import WithLookup
from m2r2_jax.decoding.state import DraftView, Proposal, TreeLayout
from m2r2_jax.decoding.trees import DraftTree
from m2r2_jax.decoding.verify import TreeTables
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers import kangaroo as KG
from m2r2_jax.peers import sps as SP
from m2r2_jax.peers.draft_checkpoint import check_base, config_from_meta, resolve_draft_checkpoint, restore_draft_params


def check_tree_ranks(label: str, tree: DraftTree, cfg) -> None:
    if cfg is not None and tree.topk > cfg.vocab_size:
        raise M2R2Error(f"{label}: tree {tree.name!r} ranks {tree.topk} candidates, more than the vocabulary")


@functools.lru_cache(maxsize=4)
def _restore(opts, cfg, step_dir: str, step: int):
    """The checkpoint's params, restored once per (options, model config, step)."""
    from pathlib import Path

    return restore_draft_params(Path(step_dir), step, opts.abstract_params(cfg), opts.name)


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


@dataclasses.dataclass(frozen=True)
class TrainedPeerOptions:
    """The shared part of the trained peers' options (frozen dataclasses that add their own knobs):
    checkpoint, the training's --out (or a step dir); lookup N > 0: combined with prompt lookup of N
    tokens (n-grams of lookup_ngram down to lookup_min_ngram tokens)."""

    checkpoint: str | None = None
    lookup: int = 0
    lookup_ngram: int = 3
    lookup_min_ngram: int = 2
    needs_m2r2 = False
    name = ""
    kind = ""  # the checkpoint kind its training writes
    combined = FeatureWithLookup  # its combination with prompt lookup

    def check_common(self) -> None:
        if not self.checkpoint:
            raise M2R2Error(
                f"{self.name}: a trained checkpoint is required (--{self.kind}-checkpoint DIR, "
                f"written by train.train_{self.kind})"
            )
        object.__setattr__(self, "checkpoint", str(self.checkpoint))
        resolve_draft_checkpoint(self.checkpoint, self.kind, self.name)
        if isinstance(self.lookup, bool) or not isinstance(self.lookup, int) or self.lookup < 0:
            raise M2R2Error(f"{self.name}: lookup must be an integer >= 0 (0 = off), got {self.lookup!r}")
        if self.lookup:
            self.lookup_drafter()

    def lookup_drafter(self) -> PromptLookup:
        return PromptLookup(self.lookup, self.lookup_ngram, self.lookup_min_ngram)

    def checkpoint_meta(self):
        """-> (step dir, step, meta) of the checkpoint's latest step."""
        return resolve_draft_checkpoint(self.checkpoint, self.kind, self.name)

    def config_from_meta(self, cls):
        return config_from_meta(cls, self.checkpoint_meta()[2], self.name)

    def drafter(self, cfg, mc=None, backend: Backend = XLA) -> Drafter:
        p = self.peer(cfg, backend)
        return self.combined(p, self.lookup_drafter()) if self.lookup else p

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


@dataclasses.dataclass(frozen=True)
class ChainOptions(TrainedPeerOptions):
    """Kangaroo's and the 2-model drafter's options: a draft chain over a shadow cache (shadow.py) of
    `max_steps` tokens with a confidence stop at `threshold`; combined with prompt lookup by `WithLookup`.
    Subclasses set `chain` (the drafter), `config_cls` (the checkpoint's config) and `model_layers` (the
    describe() key and the config field that size the draft model)."""

    combined = WithLookup
    chain = None
    config_cls = None
    model_layers = ("", "")

    def __post_init__(self):
        self.check_common()
        check_chain_knobs(self.name, self.max_steps, self.threshold)

    def peer_config(self):
        return self.config_from_meta(self.config_cls)

    def peer(self, cfg, backend: Backend = XLA) -> Drafter:
        c = self.peer_config()
        c.check(cfg)
        return self.chain(cfg, getattr(c, self.model_layers[1]), self.max_steps, self.threshold, backend)

    def describe(self) -> dict:
        key, field = self.model_layers
        return dict(super().describe(), **{key: self.checkpoint_meta()[2]["config"].get(field)})


@dataclasses.dataclass(frozen=True)
class KangarooOptions(ChainOptions):
    """checkpoint: train.train_kangaroo's --out; max_steps / threshold: the draft chain's length and its
    confidence stop (the paper's 6 and 0.6)."""

    max_steps: int = 6
    threshold: float = 0.6
    name, kind, chain, config_cls, model_layers = "kangaroo", KG.KIND, Kangaroo, KG.KangarooConfig, ("exit_layer",) * 2

    def abstract_params(self, cfg):
        return KG.adapter_spec(cfg)


@dataclasses.dataclass(frozen=True)
class SpsOptions(ChainOptions):
    """checkpoint: train.train_sps's --out; max_steps: gamma, the draft tokens per step; threshold: an
    optional confidence stop (0 = off, plain SpS)."""

    max_steps: int = 4
    threshold: float = 0.0
    name, kind, chain, config_cls, model_layers = "sps", SP.KIND, Sps, SP.SPSConfig, ("draft_layers", "num_layers")

    def abstract_params(self, cfg):
        return SP.draft_spec(cfg, self.peer_config().num_layers)
