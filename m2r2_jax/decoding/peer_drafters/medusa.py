"""Medusa-1 in the shared loop: K trained heads on the full model's final hidden state (peers/medusa.py)
fill a static sparse tree. The state is the one at slot pos - 1 -- the state whose logits chose `cur` --
which the loop carries from its verification forward (`Drafter.needs_hidden`: no extra forward). Head k
(0-based) predicts the token k + 1 places after cur; a node at depth d and rank r carries head d-1's
rank-r token whatever its parent (Medusa's candidates are the Cartesian product of the heads' top-k,
pruned to the tree). One LM-head pass over the tree's depth rows drafts the whole tree.

The default tree (`medusa_tree`: 20 nodes, 4 deep, for 4 or more heads; its first levels for fewer) keeps
the best-ranked paths per depth by their rank sum, as `trees.sparse_tree`; Medusa's own trees are chosen
from measured head accuracies (`--medusa-tree` takes any preset or a JSON file of rank paths).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.drafters import Drafter
from m2r2_jax.decoding.peer_drafters.trained import TrainedPeerOptions, check_tree_ranks
from m2r2_jax.decoding.state import DraftView, Proposal
from m2r2_jax.decoding.trees import DraftTree, get_tree, sparse_tree
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers import medusa as M

MEDUSA_WIDTHS = (6, 6, 4, 3)  # nodes kept per depth


def medusa_tree(heads: int = 4) -> DraftTree:
    w = MEDUSA_WIDTHS[: max(1, heads)]
    return sparse_tree(w, f"medusa{1 + sum(w)}")


@dataclasses.dataclass(frozen=True, eq=True)
class MedusaDrafter(Drafter):
    cfg: ModelConfig
    heads: int = 4
    tree: Any = None  # None: medusa_tree(heads)
    needs_hidden = True

    def __post_init__(self):
        object.__setattr__(self, "tree", medusa_tree(self.heads) if self.tree is None else get_tree(self.tree))
        if self.tree.max_depth > self.heads:
            raise M2R2Error(
                f"medusa: tree {self.tree.name!r} is {self.tree.max_depth} deep; the checkpoint has {self.heads} heads"
            )
        check_tree_ranks("medusa", self.tree, self.cfg)

    @property
    def trees(self):
        return (self.tree,)

    @property
    def kinds(self):
        return ("medusa",)

    def prepare(self, base, heads):
        D = self.cfg.hidden_size
        shape = tuple(np.shape(heads.get("w"))) if isinstance(heads, dict) else None
        if shape != (self.heads, D, D):
            raise M2R2Error(f"medusa: heads of shape {shape}, expected {(self.heads, D, D)}")
        return heads

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        t = self.tree
        lg = M.head_logits(self.cfg, base, dparams, view.hidden, t.max_depth)  # [B, depth, V]
        _, top = lax.top_k(lg, t.topk)  # [B, depth, topk]
        toks = top[:, t.depth[1:] - 1, t.rank[1:]].astype(jnp.int32)
        return Proposal(jnp.concatenate([view.cur[:, None], toks], 1), jnp.int32(0))


@dataclasses.dataclass(frozen=True)
class MedusaOptions(TrainedPeerOptions):
    """checkpoint: train.train_medusa's --out (or a step dir); tree: a preset or JSON file of rank paths
    (default: `medusa_tree` for the checkpoint's heads, medusa20 for 4); lookup N > 0: combined with prompt
    lookup (`medusa+lookup` in eval.compare)."""

    tree: Any = None
    name = "medusa"
    kind = M.KIND

    def __post_init__(self):
        self.check_common()
        heads = self.peer_config().heads
        t = medusa_tree(heads) if self.tree is None else get_tree(self.tree)
        object.__setattr__(self, "tree", t)
        if t.max_depth > heads:
            raise M2R2Error(f"medusa: tree {t.name!r} is {t.max_depth} deep; the checkpoint has {heads} heads")

    def peer_config(self) -> M.MedusaConfig:
        return self.config_from_meta(M.MedusaConfig)

    def abstract_params(self, cfg):
        return jax.eval_shape(lambda: M.init_heads(cfg, self.peer_config().heads))

    def peer(self, cfg, backend) -> MedusaDrafter:
        return MedusaDrafter(cfg, self.peer_config().heads, self.tree)
