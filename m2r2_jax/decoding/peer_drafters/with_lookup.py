"""A peer's drafter combined with prompt lookup, as `M2R2WithLookup` combines M2R2's (decoding/drafters.py):
where the last n-gram of the text occurred earlier (in any active row), the lookup's continuation is
verified as a chain; elsewhere the peer drafts. One `lax.cond` on "some active row has a match"; both
branches read the base's cache and never write it.

A peer with a shadow cache (shadow.py: Kangaroo, the 2-model drafter) runs its catch-up block before the
cond, on every step whichever branch drafts: its cache then stays complete after lookup steps too, and
the catch-up block never owes more than the loop's W tokens.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from m2r2_jax.decoding.drafters import Drafter, PromptLookup, pad_block
from m2r2_jax.decoding.peer_drafters.shadow import ShadowChain, ShadowProposal, ShadowState
from m2r2_jax.decoding.state import DraftView, Proposal, StepResult
from m2r2_jax.errors import M2R2Error


@dataclasses.dataclass(frozen=True, eq=True)
class WithLookup(Drafter):
    inner: Drafter
    lookup: PromptLookup
    needs_text = True

    def __post_init__(self):
        if self.inner.stateful and not isinstance(self.inner, ShadowChain):
            raise M2R2Error(f"{type(self.inner).__name__} does not combine with prompt lookup")

    @property
    def m2r2(self) -> Drafter:
        """The drafting part (named as `M2R2WithLookup`'s, which the loop's cost breakdown times)."""
        return self.inner

    @property
    def stateful(self):
        return self.inner.stateful

    @property
    def trees(self):
        return tuple(self.inner.trees) + tuple(self.lookup.trees)

    @property
    def kinds(self):
        return tuple(self.inner.kinds) + ("lookup",)

    @property
    def block(self):
        return max(self.inner.block_size, self.lookup.k + 1)

    @property
    def width(self) -> int:
        """The loop's W: the most tokens one step emits."""
        return max(t.max_depth for t in self.trees) + 1

    @property
    def lookahead(self):
        return max(self.inner.lookahead, self.lookup.k)

    def prepare(self, base, *sources):
        return self.inner.prepare(base, *sources)

    def init_state(self, dparams, base, view: DraftView):
        return self.inner.init_state(dparams, base, view)

    def update_state(self, dparams, dstate, view: DraftView, prop: Proposal, step: StepResult):
        return self.inner.update_state(dparams, dstate, view, prop, step)

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        Tv, n_inner = self.block_size, len(self.inner.trees)
        found, cand = self.lookup.search(view)
        use_lookup = jnp.any(found & view.active)
        lookup_toks = pad_block(jnp.concatenate([view.cur[:, None], cand], 1), Tv)
        if isinstance(self.inner, ShadowChain):
            cu = self.inner.advance(dparams, base, view, self.width)

            def from_inner():
                toks, k, v = self.inner.draft_chain(dparams, base, view, cu)
                return pad_block(toks, Tv), jnp.int32(0), k, v

            toks, tree, k, v = lax.cond(use_lookup, lambda: (lookup_toks, jnp.int32(n_inner), cu.k, cu.v), from_inner)
            return ShadowProposal(toks, tree, shadow=ShadowState(k, v, view.dstate.spos))

        def from_inner():
            p = self.inner.propose(dparams, base, view)
            return pad_block(p.tokens, Tv), p.tree

        toks, tree = lax.cond(use_lookup, lambda: (lookup_toks, jnp.int32(n_inner)), from_inner)
        return Proposal(toks, tree)
