"""Self-speculative decoding: any drafter (drafters.py), one jitted `lax.while_loop`, lossless.

Per step and row (pos = tokens already in the slow cache, cur = the last accepted token, not yet in
the cache):
  1. draft: the drafter proposes a block of Tv nodes laid out by one of its static trees
     (read-only on the cache);
  2. verify: one full forward over the block (verify.py), writing its K/V at slots pos .. pos+Tv-1;
  3. accept: greedy or by rejection sampling, under the tree that laid the block out;
  4. compact: the accepted nodes' K/V move to contiguous slots; pos += accepted + 1.
Rows advance independently (per-row positions), so a batch equals its rows one by one. The loop
state is a named dataclass (state.py). For drafters that read the full model's final hidden states
(`Drafter.needs_hidden`: Medusa, EAGLE) the prefill and the verification forward also return them
(`prefill_hidden`, `verify.verify_hidden`: the same forwards, no extra one), and the loop carries the
state at slot pos - 1; a dynamic drafter's per-row tree (`Proposal.layout`) is verified and accepted
under its own tables.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.compiled import CompileCache
from m2r2_jax.decoding.drafters import Drafter
from m2r2_jax.decoding.generate import PREFILL_CHUNK, bucket, pad_prompts, prefill, round_cache, stop_tuple
from m2r2_jax.decoding.sampling import SamplingConfig, sample_probs, select
from m2r2_jax.decoding.state import DraftView, SpecState, SpecStats, StepResult, TreeLayout
from m2r2_jax.decoding.verify import (
    TreeTables,
    accept_greedy,
    accept_sampling,
    compact,
    node_accepted,
    verify,
    verify_hidden,
)
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise M2R2Error(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")


def _init_stats(B: int, tt: TreeTables) -> SpecStats:
    z = jnp.zeros((B,), jnp.int32)
    t0 = tt.trees[0]
    nK = len(tt.trees)
    return SpecStats(
        steps=z,
        accepted=z,
        kind_steps=jnp.zeros((B, nK), jnp.int32),
        kind_accepted=jnp.zeros((B, nK), jnp.int32),
        depth_hits=jnp.zeros((B, t0.max_depth + 1), jnp.int32),
        node_tries=jnp.zeros((B, t0.size), jnp.int32),
        node_hits=jnp.zeros((B, t0.size), jnp.int32),
        draft_passes=z,
    )


def _update_stats(
    s: SpecStats, tt: TreeTables, active, tree, a, correct, layout: TreeLayout | None = None, passes=None
) -> SpecStats:
    """(A dynamic tree's node statistics are per block slot, under each step's own tree. `passes`: the
    draft-model passes the proposal ran, `Proposal.passes`; None counts 0.)"""
    t0 = tt.trees[0]
    B = a.shape[0]
    act = active.astype(jnp.int32)
    kind = (jnp.arange(len(tt.trees)) == tree).astype(jnp.int32)[None]  # [1, nK]
    first = act * (tree == 0).astype(jnp.int32)
    if layout is None:
        anc = jnp.asarray(t0.ancestor_mask)
        par = jnp.broadcast_to(jnp.asarray(np.maximum(t0.parent, 0))[None], (B, t0.size))
    else:
        anc, par = layout.mask[:, : t0.size, : t0.size], layout.parent[:, : t0.size]
    ok = node_accepted(anc, correct[:, : t0.size])
    parent_ok = jnp.take_along_axis(ok, par, 1)
    return SpecStats(
        steps=s.steps + act,
        accepted=s.accepted + act * a,
        kind_steps=s.kind_steps + act[:, None] * kind,
        kind_accepted=s.kind_accepted + (act * a)[:, None] * kind,
        depth_hits=s.depth_hits + first[:, None] * (jnp.arange(t0.max_depth + 1)[None] <= a[:, None]),
        node_tries=s.node_tries + first[:, None] * parent_ok.astype(jnp.int32),
        node_hits=s.node_hits + first[:, None] * (parent_ok & correct[:, : t0.size]).astype(jnp.int32),
        draft_passes=s.draft_passes if passes is None else s.draft_passes + act * passes,
    )


def prefill_hidden(
    cfg: ModelConfig, params, tokens, lengths, cache, chunk: int = PREFILL_CHUNK, backend: Backend = XLA
):
    """`generate.prefill` (the same chunks, the same last-token logits), also returning every prompt
    slot's final hidden state: -> (logits [B, V], cache, hidden [B, P, D] before the final norm; slots
    past the longest prompt's last chunk stay zero)."""
    B, P = tokens.shape
    C = chunk if (P > chunk and P % chunk == 0) else P
    if C == P:
        h, cache, _ = D.forward_hidden(cfg, params, tokens, cache, jnp.zeros((B,), jnp.int32), backend=backend)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)
        return D.logits_from_hidden(cfg, params, last)[:, 0], cache, h
    n_chunks = (jnp.max(lengths) + C - 1) // C

    def body(st):
        i, cache, last, hs = st
        s = i * C
        h, cache, _ = D.forward_hidden(
            cfg, params, lax.dynamic_slice(tokens, (0, s), (B, C)), cache, jnp.full((B,), s, jnp.int32), backend=backend
        )
        j = lengths - 1 - s
        hj = jnp.take_along_axis(h, jnp.clip(j, 0, C - 1)[:, None, None], axis=1)
        last = jnp.where(((j >= 0) & (j < C))[:, None, None], hj.astype(last.dtype), last)
        return i + 1, cache, last, lax.dynamic_update_slice(hs, h.astype(hs.dtype), (0, s, 0))

    last0 = jnp.zeros((B, 1, cfg.hidden_size), cfg.jnp_dtype)
    hs0 = jnp.zeros((B, P, cfg.hidden_size), cfg.jnp_dtype)
    _, cache, last, hs = lax.while_loop(lambda st: st[0] < n_chunks, body, (jnp.int32(0), cache, last0, hs0))
    return D.logits_from_hidden(cfg, params, last)[:, 0], cache, hs


def speculative_fn(
    cfg: ModelConfig,
    drafter: Drafter,
    greedy: bool,
    filtered: bool,
    max_new: int,
    cache_len: int,
    backend: Backend = XLA,
):
    """-> run(base, dparams, tokens, lengths, stop_ids, key, temperature, top_k, top_p)
    -> (out [B, max_new], n_out [B], SpecStats). Static: the config, drafter, sampling mode and shapes."""
    tt = TreeTables.of(drafter.trees, drafter.block_size)
    _Tv, W = tt.block, tt.width

    def run(base, dparams, tokens, lengths, stop_ids, key, temperature, top_k, top_p):
        B, P = tokens.shape
        cache = D.init_cache(cfg, B, cache_len)
        hidden = prompt_hidden = None
        if drafter.needs_hidden:
            logits, cache, prompt_hidden = prefill_hidden(cfg, base, tokens, lengths, cache, backend=backend)
            hidden = jnp.take_along_axis(prompt_hidden, (lengths - 1)[:, None, None], 1)[:, 0]
        else:
            logits, cache = prefill(cfg, base, tokens, lengths, cache, backend=backend)
        key, sub = jax.random.split(key)
        cur = select(logits, sub, greedy, temperature, top_k, top_p)
        text = None
        if drafter.needs_text:
            text = jnp.zeros((B, P + max_new + W + drafter.lookahead), jnp.int32).at[:, :P].set(tokens)
            text = jax.vmap(lambda h, c, n: h.at[n].set(c))(text, cur, lengths)
        done = jnp.isin(cur, stop_ids) | (max_new <= 1)
        dstate = None
        if drafter.stateful:
            view0 = DraftView(
                cache=cache,
                pos=lengths,
                cur=cur,
                text=text,
                text_len=lengths + 1,
                active=~done,
                hidden=hidden,
                prompt_hidden=prompt_hidden,
            )
            dstate = drafter.init_state(dparams, base, view0)
        state = SpecState(
            pos=lengths,
            cur=cur,
            cache=cache,
            out=jnp.zeros((B, max_new + W), jnp.int32).at[:, 0].set(cur),
            n_out=jnp.ones((B,), jnp.int32),
            done=done,
            key=key,
            stats=_init_stats(B, tt),
            text=text,
            dstate=dstate,
            hidden=hidden,
        )

        def accept(tree, toks, logits, sub, layout):
            if greedy:  # verified greedy: `logits` is the argmax at each node already
                return accept_greedy(tt, tree, toks, logits, layout)
            if filtered:
                probs = jax.vmap(lambda lg: sample_probs(lg, temperature, top_k, top_p), 1, 1)(logits)
            else:
                probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6), -1)
            return accept_sampling(tt, tree, toks, probs, sub, layout)

        def body(st: SpecState) -> SpecState:
            active = ~st.done
            key, sub = jax.random.split(st.key)
            view = DraftView(
                cache=st.cache,
                pos=st.pos,
                cur=st.cur,
                text=st.text,
                text_len=lengths + st.n_out,
                active=active,
                dstate=st.dstate,
                hidden=st.hidden,
            )
            prop = drafter.propose(dparams, base, view)
            lay = prop.layout
            # greedy: `logits` is the full model's argmax at each node [B, Tv] (all acceptance reads)
            if drafter.needs_hidden or lay is not None:
                logits, cache, hv = verify_hidden(
                    cfg, backend, base, tt, prop.tree, prop.tokens, st.cache, st.pos, lay, greedy=greedy
                )
            else:
                logits, cache = verify(cfg, backend, base, tt, prop.tree, prop.tokens, st.cache, st.pos, greedy=greedy)
            a, path, bonus, correct = accept(prop.tree, prop.tokens, logits, sub, lay)
            cache = compact(cache, st.pos, path)
            # emit the accepted path's tokens, then the bonus token; stop at a stop token or max_new
            k = jnp.arange(W)[None]
            path_toks = jnp.concatenate(
                [jnp.take_along_axis(prop.tokens, path[:, 1:], 1), jnp.zeros((B, 1), jnp.int32)], 1
            )
            emitted = jnp.where(k < a[:, None], path_toks, jnp.where(k == a[:, None], bonus[:, None], 0))
            is_stop = jnp.isin(emitted, stop_ids) & (k <= a[:, None])
            first_stop = jnp.where(jnp.any(is_stop, 1), jnp.argmax(is_stop, 1), W)
            n_new = jnp.minimum(jnp.minimum(a + 1, first_stop + 1), max_new - st.n_out)
            put = jax.vmap(lambda o, e, s: lax.dynamic_update_slice(o, e, (s,)))
            out = jnp.where(active[:, None], put(st.out, emitted, st.n_out), st.out)
            text = st.text
            if text is not None:
                text = jnp.where(active[:, None], put(text, emitted, lengths + st.n_out), text)
            n_out = st.n_out + jnp.where(active, n_new, 0)
            hidden, path_h = st.hidden, None
            if drafter.needs_hidden:  # the accepted path's states; the deepest is the next step's pos - 1
                path_h = jnp.take_along_axis(hv, path[:, :, None], 1)  # [B, W, D]
                deepest = jnp.take_along_axis(path_h, a[:, None, None], 1)[:, 0]
                hidden = jnp.where(active[:, None], deepest.astype(st.hidden.dtype), st.hidden)
            dstate = st.dstate
            if drafter.stateful:
                target = logits if greedy else jnp.argmax(logits, -1).astype(jnp.int32)
                step = StepResult(target, a, path, emitted, jnp.where(active, n_new, 0), path_h)
                dstate = drafter.update_state(dparams, dstate, view, prop, step)
            return SpecState(
                pos=jnp.where(active, st.pos + a + 1, st.pos),
                cur=jnp.where(active, bonus, st.cur),
                cache=cache,
                out=out,
                n_out=n_out,
                done=st.done | (first_stop < W) | (n_out >= max_new),
                key=key,
                stats=_update_stats(st.stats, tt, active, prop.tree, a, correct, lay, prop.passes),
                text=text,
                dstate=dstate,
                hidden=hidden,
            )

        st = lax.while_loop(lambda st: ~jnp.all(st.done), body, state)
        return st.out[:, :max_new], st.n_out, st.stats

    return run


@dataclasses.dataclass
class SpecResult:
    new_ids: list[list[int]]
    decode_seconds: float
    compile_seconds: float
    steps: list[int]  # verification steps per row
    accepted: list[int]  # drafted tokens accepted per row (bonus tokens not counted)
    depth_hits: np.ndarray  # [B, D+1] first-tree steps whose accepted depth >= d
    node_tries: np.ndarray  # [B, T] first-tree steps where the node's parent was accepted (greedy)
    node_hits: np.ndarray  # [B, T] ... and the node itself matched
    kinds: dict  # step kind -> {"steps": [B], "accepted": [B]}
    draft_passes: list[int] = dataclasses.field(default_factory=list)  # [B] draft-model passes run (M2R2: depths)

    @property
    def tau(self) -> float:
        """Mean tokens emitted per verification step (accepted drafts + the bonus token)."""
        s = sum(self.steps)
        return (sum(self.accepted) + s) / s if s else 0.0


class SpeculativeDecoder:
    """Compiled speculative executables for one model config and drafter, cached per shape bucket."""

    def __init__(self, cfg: ModelConfig, drafter: Drafter, backend: Backend = XLA):
        self.cfg, self.drafter, self.backend = cfg, drafter, backend
        self.cache = CompileCache()
        self._prepared = None

    @property
    def compiles(self) -> int:
        return self.cache.compiles

    @property
    def block(self) -> int:
        return self.drafter.block_size

    def prepare(self, base, *sources):
        """The drafter's jit argument (`Drafter.prepare`: e.g. merged adapters and the draft head), built
        once per (base, sources) and kept: merging rank-r adapters into 10 layers costs a few decode steps."""
        key = (id(base),) + tuple(id(s) for s in sources)
        if self._prepared is None or self._prepared[0] != key:
            dp = self.drafter.prepare(base, *sources)
            self._prepared = (key, dp, (base, sources))  # the inputs are held so their ids stay theirs
        return self._prepared[1]

    def plan(self, lens: Sequence[int], max_new: int) -> tuple[int, int]:
        longest = max(lens)
        if min(lens) < 1:
            raise M2R2Error("empty prompt: at least one token is required")
        P = bucket(longest)
        need = longest + max_new + self.block + 1
        if need > self.cfg.max_position_embeddings:
            raise M2R2Error(
                f"prompt of {longest} tokens + {max_new} new tokens (+ a {self.block}-node block) "
                f"exceeds the model's context of {self.cfg.max_position_embeddings} positions"
            )
        S_ = round_cache(max(need, P))
        self.cfg.check_cache_len(S_)
        return P, S_

    def generate(self, base, dparams, prompts: Sequence[Sequence[int]], sc: SpecConfig = SpecConfig()) -> SpecResult:
        """`dparams`: `prepare(base, ...)`'s result (for M2R2: prepare(base, m2r2, draft_ids))."""
        prompts = [list(map(int, p)) for p in prompts]
        if not prompts:
            raise M2R2Error("no prompts given")
        B, lens = len(prompts), [len(p) for p in prompts]
        if self.drafter.dynamic and self.backend.block_attention is not None and B > 1:
            raise M2R2Error(
                f"a dynamic draft tree with the {self.backend.name} block attention needs batch size 1 (got {B})"
            )
        P, S_ = self.plan(lens, sc.max_new_tokens)
        s = sc.sampling
        filtered = (s.top_k > 0) or (s.top_p < 1.0)
        args = (
            base,
            dparams,
            jnp.asarray(pad_prompts(prompts, P)),
            jnp.asarray(lens, jnp.int32),
            jnp.asarray(stop_tuple(self.cfg, sc.stop_ids), jnp.int32),
            jax.random.key(s.seed),
            jnp.float32(s.temperature),
            jnp.int32(s.top_k),
            jnp.float32(s.top_p),
        )
        key = (B, P, S_, sc.max_new_tokens, s.greedy, filtered, jax.tree.structure((base, dparams)))
        exe, compile_s = self.cache.get(
            key,
            lambda: speculative_fn(self.cfg, self.drafter, s.greedy, filtered, sc.max_new_tokens, S_, self.backend),
            args,
        )
        t0 = time.perf_counter()
        out, n_out, stats = exe(*args)
        out = np.asarray(jax.block_until_ready(out))
        dt = time.perf_counter() - t0
        n_out = np.asarray(n_out)
        st = jax.tree.map(np.asarray, stats)
        kinds = {
            k: {"steps": st.kind_steps[:, i].tolist(), "accepted": st.kind_accepted[:, i].tolist()}
            for i, k in enumerate(self.drafter.kinds)
        }
        return SpecResult(
            [out[b, : n_out[b]].tolist() for b in range(B)],
            dt,
            compile_s,
            st.steps.tolist(),
            st.accepted.tolist(),
            st.depth_hits,
            st.node_tries,
            st.node_hits,
            kinds,
            st.draft_passes.tolist(),
        )

    def cost_breakdown(
        self,
        base,
        dparams,
        cache_len: int = 512,
        fill: int = 256,
        repeats: int = 5,
        batch: int = 1,
        greedy: bool = True,
    ) -> dict:
        """Median ms of one draft (the drafter's first kind of step, e.g. the whole M2R2 tree) and of
        one block verification, each jitted alone over a cache filled to `fill` positions. The decode
        loop's remaining per-step work (acceptance, compaction, bookkeeping) is its step time minus these.
        A drafter with a confidence stop (M2R2's `stop`) is timed without it, every depth drafted
        (`draft_passes` of them): how many it ran per step is the loop's count (`SpecResult.draft_passes`).
        `greedy`: the verification as greedy decoding runs it (the argmax at each node, not the logits)."""
        cfg, drafter = self.cfg, self.drafter
        tt = TreeTables.of(drafter.trees, drafter.block_size)
        cache_len = min(cache_len, cfg.max_position_embeddings)
        fill = min(fill, cache_len - tt.block)
        cache = D.init_cache(cfg, batch, cache_len)
        pos = jnp.full((batch,), fill, jnp.int32)
        cur = jnp.ones((batch,), jnp.int32)
        first = getattr(drafter, "m2r2", drafter)  # a composite's M2R2 part: what M2R2 steps draft with
        if getattr(first, "stop", 0):  # the full draft (the stop reads the data: here a synthetic cache)
            first = dataclasses.replace(first, stop=0.0)
        hd = (batch, cfg.hidden_size)
        view = DraftView(
            cache=cache,
            pos=pos,
            cur=cur,
            text=jnp.zeros((batch, fill + 64), jnp.int32),
            text_len=pos,
            active=jnp.ones((batch,), bool),
            hidden=jnp.zeros(hd, cfg.jnp_dtype) if first.needs_hidden else None,
            prompt_hidden=jnp.zeros((batch, fill, cfg.hidden_size), cfg.jnp_dtype) if first.needs_hidden else None,
        )
        if first.stateful:  # a stateful drafter proposes from its state (e.g. Lookahead's pool and window)
            view = view.replace(dstate=jax.jit(first.init_state)(dparams, base, view))
        draft = jax.jit(lambda b, q, v: first.propose(q, b, v).tokens)
        # the cache is donated, as in the decode loop, where it is updated in place: an undonated cache
        # would be copied (all layers' K/V) on every call and counted as verification
        ver = jax.jit(lambda b, t, c, p: verify(cfg, self.backend, b, tt, 0, t, c, p, greedy), donate_argnums=2)
        fresh = jax.jit(lambda: D.init_cache(cfg, batch, cache_len))
        toks = jnp.zeros((batch, tt.block), jnp.int32)

        def med(fn, setup=lambda: None):
            jax.block_until_ready(fn(setup()))
            ts = []
            for _ in range(repeats):
                arg = jax.block_until_ready(setup())
                t0 = time.perf_counter()
                jax.block_until_ready(fn(arg))
                ts.append(time.perf_counter() - t0)
            return 1e3 * float(np.median(ts))

        return {
            "draft_ms": med(lambda _: draft(base, dparams, view)),
            "verify_ms": med(lambda c: ver(base, toks, c, pos), fresh),
            "cache_len": cache_len,
            "fill": fill,
            "block": tt.block,
            "batch": batch,
            "draft_layers": getattr(first, "depth", None),
            "draft_passes": getattr(first, "max_passes", None),
        }
