"""Chain drafters that keep their own K/V of past tokens (a *shadow* cache), for the trained peers whose
draft model has layers the base's cache does not hold: Kangaroo's adapter attention, the 2-model
drafter's small model. A stateful drafter in the shared loop (drafters.py): verification, acceptance and
the base's cache stay the loop's; the shadow cache is the drafter's carried state.

State: the shadow K/V [B, KV, S + CHUNK, hd] per shadow layer, valid at positions < `spos` [B].

  init_state   the draft model's own prefill of the prompt: chunks of CHUNK tokens of the text, a
               `lax.while_loop` that stops after the longest prompt (spos = the prompt length)
  propose      1. catch-up: one block of C tokens at positions spos .. spos+C-1 through the draft model:
                  the tokens accepted last step (not yet in the shadow cache) and `cur` at position pos
                  (pos - spos + 1 <= C of them; the rest is padding, causally invisible to them). It
                  attends to the shadow cache below spos and writes the block's K/V there; its output
                  at cur gives the first draft token. C = the most tokens one step can accept + 1
                  (the loop's W), so the block always holds every token owed.
               2. the chain: draft token d + 1 from token d (position pos + d), d = 1 .. max_steps-1,
                  each step run only while some active row's top-1 probability is >= `threshold`
                  (a `lax.cond`, as Draft & Verify's confidence stop: static shapes, a row that stopped
                  keeps what the batch drafts for it, verified like any draft).
               The shadow cache with the block written travels to `update_state` in the proposal
               (`ShadowProposal`), which sets spos = pos + 1: the accepted tokens after cur are the next
               step's catch-up, and whatever the chain wrote past pos (the 2-model drafter's cache) is
               masked there and overwritten -- the cache rolled back to the accepted prefix.
So the accepted tokens' draft-model states are recomputed in the next step's catch-up (they are not read
off the verification pass): a block of C tokens through the draft model where a plain chain would pass
`cur` alone, i.e. one C-row pass instead of a one-row pass (on this CPU a few-row matmul costs about what
a one-row one does: the weights dominate).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from m2r2_jax.decoding.drafters import Drafter, confident_step
from m2r2_jax.decoding.state import DraftView, Proposal, StepResult
from m2r2_jax.decoding.trees import chain
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model.attention import SetsAttention

CHUNK = 64  # the draft model's prefill chunk (tokens)


@struct.dataclass
class ShadowState:
    k: list  # per shadow layer [B, KV, S + CHUNK, hd]
    v: list
    spos: jax.Array  # [B] positions < spos hold valid K/V


@struct.dataclass
class ShadowProposal(Proposal):
    shadow: ShadowState | None = None  # the shadow cache after this step's catch-up (and chain)


@struct.dataclass
class CatchUp:
    k: list  # the shadow cache with the catch-up block written
    v: list
    logits: jax.Array  # [B, V] the draft model's logits at cur
    idx: jax.Array  # [B] cur's index in the block (pos - spos)
    extra: object  # what the drafter's chain needs from the block (Kangaroo: the shallow layers' K/V)


def prefix_block_attention(cfg, backend, k_cache, v_cache, start, T: int) -> SetsAttention:
    """A T-token block at positions start[b] .. over a read-only cache: the cache below start[b], the
    block's own K/V causally (state = the block's (k, v), for the caller to keep)."""
    tril = jnp.tril(jnp.ones((T, T), bool))
    if backend.block_attention is not None:
        return SetsAttention(cfg, backend, prefix=(k_cache, v_cache, start), kernel_mask=tril)
    B, S = start.shape[0], k_cache.shape[2]
    m_prefix = jnp.broadcast_to((jnp.arange(S)[None, :] < start[:, None])[:, None, :], (B, T, S))
    return SetsAttention(
        cfg, backend, sets=[(k_cache, v_cache, m_prefix)], self_mask=jnp.broadcast_to(tril[None], (B, T, T))
    )


def check_chain_knobs(label: str, max_steps, threshold) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise M2R2Error(f"{label}: max draft length must be an integer >= 1, got {max_steps!r}")
    t = threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
        raise M2R2Error(f"{label}: confidence threshold must be in [0, 1), got {t!r}")


class ShadowChain(Drafter):
    """Subclasses (frozen dataclasses with `max_steps`, `threshold`) implement

    shadow_shape(B, S) -> (number of shadow layers, [B, KV, S, hd])
    catch_up(dparams, base, cache, k, v, toks [B, T], start [B]) -> (k, v, h [B, T, D], extra)
    logits(dparams, base, h) -> f32 [..., V]
    chain_init(dparams, extra, idx) -> the chain's local carry
    chain_step(dparams, base, view, k, v, local, tok [B, 1], d) -> (h [B, 1, D], k, v, local)
    """

    needs_text = True
    stateful = True
    max_steps: int = 1
    threshold: float = 0.0

    @property
    def trees(self):
        return (chain(self.max_steps),)

    @property
    def width(self) -> int:
        return self.max_steps + 1

    # ------------------------------------------------------------------ the subclass's part

    def shadow_shape(self, B: int, S: int):
        raise NotImplementedError

    def catch_up(self, dparams, base, cache, k, v, toks, start):
        raise NotImplementedError

    def logits(self, dparams, base, h):
        raise NotImplementedError

    def chain_init(self, dparams, extra, idx):
        return None

    def chain_step(self, dparams, base, view, k, v, local, tok, d: int):
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def init_state(self, dparams, base, view: DraftView) -> ShadowState:
        B = view.cur.shape[0]
        n, shape = self.shadow_shape(B, view.cache.length + CHUNK)
        dt = view.cache.k[0].dtype
        k = [jnp.zeros(shape, dt) for _ in range(n)]
        v = [jnp.zeros(shape, dt) for _ in range(n)]
        text = jnp.pad(view.text, ((0, 0), (0, CHUNK)))
        chunks = (jnp.max(view.pos) + CHUNK - 1) // CHUNK

        def body(i, kv):
            toks = lax.dynamic_slice(text, (0, i * CHUNK), (B, CHUNK))
            k, v, _, _ = self.catch_up(dparams, base, view.cache, *kv, toks, jnp.full((B,), i * CHUNK, jnp.int32))
            return k, v

        k, v = lax.fori_loop(0, chunks, body, (k, v))
        return ShadowState(k, v, view.pos.astype(jnp.int32))

    def advance(self, dparams, base, view: DraftView, width: int) -> CatchUp:
        """The catch-up block (C = `width` tokens: the loop's W, at least max_steps + 1)."""
        st: ShadowState = view.dstate
        text = jnp.pad(view.text, ((0, 0), (0, width)))
        toks = jax.vmap(lambda h, s: lax.dynamic_slice(h, (s,), (width,)))(text, st.spos)
        idx = jnp.clip(view.pos - st.spos, 0, width - 1)
        toks = jax.vmap(lambda t, i, c: t.at[i].set(c))(toks, idx, view.cur)
        k, v, h, extra = self.catch_up(dparams, base, view.cache, st.k, st.v, toks, st.spos)
        h_cur = jnp.take_along_axis(h, idx[:, None, None], 1)  # [B, 1, D]
        return CatchUp(k, v, self.logits(dparams, base, h_cur)[:, 0], idx, extra)

    def draft_chain(self, dparams, base, view: DraftView, cu: CatchUp):
        """-> (the chain's tokens [B, max_steps + 1] (node 0 = cur), the shadow k, v after it)."""
        K, B = self.max_steps, view.cur.shape[0]
        p = jax.nn.softmax(cu.logits, -1)
        toks = jnp.zeros((B, K + 1), jnp.int32).at[:, 0].set(view.cur).at[:, 1].set(jnp.argmax(p, -1))
        going = view.active & (jnp.max(p, -1) >= self.threshold)
        carry = (toks, cu.k, cu.v, self.chain_init(dparams, cu.extra, cu.idx), going)

        def step(c, d):
            toks, k, v, local, going = c
            h, k, v, local = self.chain_step(dparams, base, view, k, v, local, toks[:, d : d + 1], d)
            p = jax.nn.softmax(self.logits(dparams, base, h)[:, 0], -1)
            toks = toks.at[:, d + 1].set(jnp.argmax(p, -1).astype(jnp.int32))
            return toks, k, v, local, going & (jnp.max(p, -1) >= self.threshold)

        for d in range(1, K):  # each later step only while some active row is still confident
            carry = confident_step(carry[4], lambda c, d=d: step(c, d), carry)
        return carry[0], carry[1], carry[2]

    def propose(self, dparams, base, view: DraftView) -> ShadowProposal:
        cu = self.advance(dparams, base, view, self.width)
        toks, k, v = self.draft_chain(dparams, base, view, cu)
        return ShadowProposal(toks, jnp.int32(0), shadow=ShadowState(k, v, view.dstate.spos))

    def update_state(self, dparams, dstate, view: DraftView, prop: Proposal, step: StepResult) -> ShadowState:
        sh: ShadowState = prop.shadow
        return ShadowState(sh.k, sh.v, jnp.where(view.active, view.pos + 1, dstate.spos).astype(jnp.int32))
