"""`--drafter kangaroo|sps`: the options of the trained draft-model peers (registered in options.py).

Each reads its checkpoint's metadata when the options are made (so a missing or foreign checkpoint is one
error line before any model loads), builds its drafter from the checkpoint's config, and restores the
trained params where the drafter is prepared, refusing a checkpoint trained on another base model.
`lookup` > 0 combines the drafter with prompt lookup (with_lookup.py). `budget()` is the checkpoint's
trainable parameters and training minutes, for eval.compare.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.decoding.drafters import PromptLookup
from m2r2_jax.decoding.peer_drafters.kangaroo import Kangaroo
from m2r2_jax.decoding.peer_drafters.shadow import check_chain_knobs
from m2r2_jax.decoding.peer_drafters.sps import Sps
from m2r2_jax.decoding.peer_drafters.with_lookup import WithLookup
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers import kangaroo as KG
from m2r2_jax.peers import sps as SP
from m2r2_jax.peers.draft_checkpoint import check_base, resolve_draft_checkpoint


@functools.lru_cache(maxsize=8)
def _meta(kind: str, path: str) -> dict:
    return resolve_draft_checkpoint(path, kind, kind)[2]


@functools.lru_cache(maxsize=4)
def _params(kind: str, path: str, cfg) -> Any:
    load = KG.load_kangaroo if kind == KG.KIND else SP.load_sps
    return load(path, cfg)[0]


class _Trained:
    needs_m2r2 = False
    kind = ""

    def _check_common(self) -> None:
        if not self.checkpoint:
            raise M2R2Error(
                f"{self.name}: a trained checkpoint is required (--{self.name}-checkpoint DIR, "
                f"written by train.train_{self.name})"
            )
        object.__setattr__(self, "checkpoint", str(self.checkpoint))
        _meta(self.kind, self.checkpoint)  # readable, of this kind
        check_chain_knobs(self.name, self.max_steps, self.threshold)
        if isinstance(self.lookup, bool) or not isinstance(self.lookup, int) or self.lookup < 0:
            raise M2R2Error(f"{self.name}: lookup must be an integer >= 0 (0 = off), got {self.lookup!r}")
        if self.lookup:
            PromptLookup(self.lookup, self.lookup_ngram, self.lookup_min_ngram)

    @property
    def meta(self) -> dict:
        return _meta(self.kind, self.checkpoint)

    def with_lookup(self, d):
        return WithLookup(d, PromptLookup(self.lookup, self.lookup_ngram, self.lookup_min_ngram)) if self.lookup else d

    def prepare(self, spec, base, m2r2=None) -> Any:
        check_base(self.meta, spec.cfg, base, self.name, self.checkpoint)
        return spec.prepare(base, _params(self.kind, self.checkpoint, spec.cfg))

    def budget(self) -> dict:
        m = self.meta
        return dict(trainable_params=m.get("trainable_params"), train_minutes=m.get("train_minutes"))

    def describe(self) -> dict:
        return dict(dataclasses.asdict(self), trained_steps=self.meta.get("step"), **self.budget())


@dataclasses.dataclass(frozen=True)
class KangarooOptions(_Trained):
    """checkpoint: train.train_kangaroo's --out; max_steps / threshold: the draft chain's length and its
    confidence stop (the paper's 6 and 0.6)."""

    checkpoint: str | None = None
    max_steps: int = 6
    threshold: float = 0.6
    lookup: int = 0
    lookup_ngram: int = 3
    lookup_min_ngram: int = 2
    name = "kangaroo"
    kind = KG.KIND

    def __post_init__(self):
        self._check_common()

    def drafter(self, cfg, mc=None, backend: Backend = XLA):
        kc = KG.config_from_meta(KG.KangarooConfig, self.meta, self.name)
        kc.check(cfg)
        return self.with_lookup(Kangaroo(cfg, kc.exit_layer, self.max_steps, self.threshold, backend))

    def describe(self) -> dict:
        return dict(super().describe(), exit_layer=self.meta["config"].get("exit_layer"))


@dataclasses.dataclass(frozen=True)
class SpsOptions(_Trained):
    """checkpoint: train.train_sps's --out; max_steps: gamma, the draft tokens per step; threshold: an
    optional confidence stop (0 = off, plain SpS)."""

    checkpoint: str | None = None
    max_steps: int = 4
    threshold: float = 0.0
    lookup: int = 0
    lookup_ngram: int = 3
    lookup_min_ngram: int = 2
    name = "sps"
    kind = SP.KIND

    def __post_init__(self):
        self._check_common()

    def drafter(self, cfg, mc=None, backend: Backend = XLA):
        sc = KG.config_from_meta(SP.SPSConfig, self.meta, self.name)
        sc.check(cfg)
        return self.with_lookup(Sps(cfg, sc.num_layers, self.max_steps, self.threshold, backend))

    def describe(self) -> dict:
        return dict(super().describe(), draft_layers=self.meta["config"].get("num_layers"))
