"""Autoregressive generation: prefill + the whole decode in ONE jitted function
over a preallocated KV cache, static shapes throughout: a `lax.while_loop` per
attention window, the windows growing through static cache lengths.

Prompts are right-padded to a length bucket; each row keeps its own position,
so a batch gives exactly the rows' one-by-one results. Compiled executables
are cached per (batch, prompt bucket, cache length, max new tokens, greedy,
block, window): a second prompt in the same bucket never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.compiled import CompileCache
from m2r2_jax.decoding.sampling import SamplingConfig, select
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D
from m2r2_jax.model.params import logical_axes, model_spec

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
CACHE_ROUND = 128
# A decode step's cost grows with the cache slots attention reads (XLA:CPU, batch 64: 66, 48 and 36
# tok/s with caches of 128, 256 and 512 slots), so the decode loop reads only a window of the cache,
# grown in steps of this many slots as the rows' positions advance (`decode_windows`).
DECODE_WINDOW = 64


def bucket(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    for b in buckets:
        if n <= b:
            return b
    return int(np.ceil(n / buckets[-1]) * buckets[-1])


def round_cache(n: int) -> int:
    """Cache lengths are multiples of CACHE_ROUND, so nearby requests share one executable."""
    return int(np.ceil(n / CACHE_ROUND) * CACHE_ROUND)


def stop_tuple(cfg: ModelConfig, stop_ids) -> tuple[int, ...]:
    """Explicit stop ids, else the model's EOS ids; (-1,) (never matches) when there are none."""
    return tuple(stop_ids if stop_ids is not None else cfg.eos_token_ids) or (-1,)


def pad_prompts(prompts: Sequence[Sequence[int]], P: int, pad_id: int = 0) -> np.ndarray:
    """Right-pad token lists to a [B, P] int32 array."""
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    return tokens


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: tuple[int, ...] | None = None  # None -> the model's EOS ids
    cache_len: int | None = None  # None -> bucketed prompt + max_new_tokens
    pad_id: int = 0
    # Slots per decode step: the token, then block - 1 padding slots that no real token attends to
    # (overwritten by the next step). Equal to a chain's verification size, every token goes through
    # the verification's shapes and cache slots and both round identically, which bf16 matmuls need
    # for token-for-token equality (BENCHMARKS.md, "bf16 matmuls, bit-exact chains"); 1 is the plain loop.
    block: int = 1
    # The decode attends over the cache in windows growing by this many slots (`decode_windows`);
    # None: always over the whole cache.
    window: int | None = DECODE_WINDOW

    def __post_init__(self):
        for name in ("max_new_tokens", "block") + (("window",) if self.window is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"{name} must be an integer >= 1, got {v!r}")
        if self.cache_len is not None and (not isinstance(self.cache_len, int) or self.cache_len < 1):
            raise M2R2Error(f"cache_len must be an integer >= 1, got {self.cache_len!r}")


@dataclasses.dataclass
class GenerateResult:
    new_ids: list[list[int]]
    prompt_ids: list[list[int]]
    decode_seconds: float  # wall clock of the jitted call (compile excluded)
    compile_seconds: float  # 0 when the executable was cached
    steps: int  # forward passes after prefill

    @property
    def num_new_tokens(self) -> int:
        return sum(len(x) for x in self.new_ids)


# Prompts are prefilled in chunks of this many slots, up to the longest real prompt: the padding of
# the prompt bucket past it is never computed (a 177-token prompt in the 256 bucket runs 192 rows, not
# 256). Smaller chunks cost more than they save: each chunk streams all the weights once more.
PREFILL_CHUNK = 64
# ... at batch 1. A large batch fills the product's rows with fewer slots per chunk, so its chunks are
# cut down to PREFILL_ROWS rows (B * chunk, 16 slots at least): at batch 64 a 40-token prompt bucketed
# to 64 is prefilled over 48 slots, not 64 (`prefill_chunk`).
PREFILL_ROWS = 1024


def prefill_chunk(batch: int) -> int:
    """The prefill chunk for a batch: PREFILL_CHUNK, halved while batch * chunk > PREFILL_ROWS (>= 16)."""
    c = PREFILL_CHUNK
    while c > 16 and batch * c > PREFILL_ROWS:
        c //= 2
    return c


def prefill(cfg: ModelConfig, params, tokens, lengths, cache, chunk: int = PREFILL_CHUNK, backend: Backend = XLA):
    """Process padded prompts [B, P]; return last-real-token logits [B, V] and the cache.

    Runs a `lax.while_loop` over chunks of `chunk` slots (P itself when P <= chunk or P is not a
    multiple of it) that stops after the chunk holding the longest prompt's last token. Each chunk
    attends to the cache written by the earlier ones, so the result is the one-block prefill's (with
    the CPU kernels bit for bit: their rows do not depend on how many rows share a call)."""
    B, P = tokens.shape
    C = chunk if (P > chunk and P % chunk == 0) else P
    if C == P:
        h, cache, _ = D.forward_hidden(cfg, params, tokens, cache, jnp.zeros((B,), jnp.int32), backend=backend)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
        return D.logits_from_hidden(cfg, params, last)[:, 0], cache
    n_chunks = (jnp.max(lengths) + C - 1) // C

    def body(st):
        i, cache, last = st
        s = i * C
        h, cache, _ = D.forward_hidden(
            cfg, params, lax.dynamic_slice(tokens, (0, s), (B, C)), cache, jnp.full((B,), s, jnp.int32), backend=backend
        )
        j = lengths - 1 - s  # the last real token's index in this chunk
        hj = jnp.take_along_axis(h, jnp.clip(j, 0, C - 1)[:, None, None], axis=1)
        last = jnp.where(((j >= 0) & (j < C))[:, None, None], hj.astype(last.dtype), last)
        return i + 1, cache, last

    last0 = jnp.zeros((B, 1, cfg.hidden_size), cfg.jnp_dtype)
    _, cache, last = lax.while_loop(lambda st: st[0] < n_chunks, body, (jnp.int32(0), cache, last0))
    return D.logits_from_hidden(cfg, params, last)[:, 0], cache


def decode_windows(prompt_slots: int, cache_len: int, window: int | None) -> tuple[int, ...]:
    """The static cache lengths the decode loop runs through: the multiples of `window` from the first
    one holding the `prompt_slots` a prefill writes, then `cache_len` (only `cache_len` without a window).

    A phase attends over its window's slots only; a step whose block would reach past the window
    moves to the next (the cache is padded once per phase). Slots past every row's position are masked
    in any case, so a window changes which masked slots are read, not what a row sees."""
    if window is None:
        return (cache_len,)
    first = -(-prompt_slots // window) * window
    return tuple(range(first, cache_len, window)) + (cache_len,)


def _grow(cache: D.KVCache, length: int) -> D.KVCache:
    """The cache padded with empty slots to `length` (unchanged when it has them)."""
    if cache.length == length:
        return cache
    pad = ((0, 0), (0, 0), (0, length - cache.length), (0, 0))
    return D.KVCache([jnp.pad(k, pad) for k in cache.k], [jnp.pad(v, pad) for v in cache.v])


def generate_fn(
    cfg: ModelConfig,
    greedy: bool,
    max_new: int,
    cache_len: int,
    block: int = 1,
    backend: Backend = XLA,
    window: int | None = None,
):
    def run(params, tokens, lengths, stop_ids, key, temperature, top_k, top_p):
        B, P = tokens.shape
        windows = decode_windows(P, cache_len, window)
        cache = D.init_cache(cfg, B, windows[0])
        logits, cache = prefill(cfg, params, tokens, lengths, cache, prefill_chunk(B), backend)
        key, sub = jax.random.split(key)
        first = select(logits, sub, greedy, temperature, top_k, top_p)
        out = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first)
        done = jnp.isin(first, stop_ids)
        longest = jnp.max(lengths)

        def body(st):
            i, tok, cache, out, done, key = st
            pos = lengths + i - 1  # slot of `tok`
            blk = tok[:, None] if block == 1 else jnp.pad(tok[:, None], ((0, 0), (0, block - 1)))
            logits, cache = D.forward(cfg, params, blk, cache, pos, backend=backend)
            key, sub = jax.random.split(key)
            nxt = select(logits[:, 0], sub, greedy, temperature, top_k, top_p)
            nxt = jnp.where(done, stop_ids[0], nxt)
            out = lax.dynamic_update_slice(out, nxt[:, None], (0, i))
            done = done | jnp.isin(nxt, stop_ids)
            return i + 1, nxt, cache, out, done, key

        def in_window(w, st):
            """Steps remain, and the step's block (the longest row's slots up to longest + i + block - 2)
            lies inside the window's w slots."""
            i, _, _, _, done, _ = st
            return (i < max_new) & ~jnp.all(done) & (longest + i + block - 2 < w)

        st = (jnp.int32(1), first, cache, out, done, key)
        for w in windows:  # one loop per window, each over a cache of w slots
            i, tok, cache, out, done, key = st
            st = lax.while_loop(functools.partial(in_window, w), body, (i, tok, _grow(cache, w), out, done, key))
        i, _, _, out, done, _ = st
        return out, i

    return run


class Generator:
    """Holds compiled generate executables for one model config (and mesh)."""

    def __init__(self, cfg: ModelConfig, mesh=None, backend: Backend = XLA):
        self.cfg, self.mesh, self.backend = cfg, mesh, backend
        self.cache = CompileCache()

    @property
    def compiles(self) -> int:
        return self.cache.compiles

    # -- shapes ---------------------------------------------------------------
    def plan(self, prompt_lens: Sequence[int], gen: GenerateConfig) -> tuple[int, int]:
        longest = max(prompt_lens)
        if min(prompt_lens) < 1:
            raise M2R2Error("empty prompt: at least one token is required")
        P = bucket(longest)
        need = longest + gen.max_new_tokens + gen.block - 1
        if gen.cache_len is not None:
            S = gen.cache_len
            if need > S:
                raise M2R2Error(
                    f"prompt of {longest} tokens + {gen.max_new_tokens} new tokens needs a cache of "
                    f"{need}, longer than the cache length {S}"
                )
            P = min(P, S)
        else:
            S = round_cache(max(need, P))
        if need > self.cfg.max_position_embeddings:
            raise M2R2Error(
                f"prompt of {longest} tokens + {gen.max_new_tokens} new tokens exceeds the model's "
                f"context of {self.cfg.max_position_embeddings} positions"
            )
        P = max(P, longest)
        self.cfg.check_cache_len(S)
        return P, S

    # -- run ------------------------------------------------------------------
    def generate(
        self, params, prompts: Sequence[Sequence[int]], gen: GenerateConfig = GenerateConfig()
    ) -> GenerateResult:
        prompts = [list(map(int, p)) for p in prompts]
        B = len(prompts)
        if B == 0:
            raise M2R2Error("no prompts given")
        lens = [len(p) for p in prompts]
        P, S = self.plan(lens, gen)
        stop = stop_tuple(self.cfg, gen.stop_ids)
        tokens = pad_prompts(prompts, P, gen.pad_id)
        s = gen.sampling
        args = (
            params,
            jnp.asarray(tokens),
            jnp.asarray(lens, jnp.int32),
            jnp.asarray(stop, jnp.int32),
            jax.random.key(s.seed),
            jnp.float32(s.temperature),
            jnp.int32(s.top_k),
            jnp.float32(s.top_p),
        )
        exe, compile_s = self._lookup(params, B, P, S, gen, args)
        t0 = time.perf_counter()
        out, steps = exe(*args)
        out = np.asarray(jax.block_until_ready(out))
        dt = time.perf_counter() - t0
        new_ids = []
        stop_set = set(stop)
        for row in out.tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in stop_set), len(row))
            new_ids.append(row[:cut])
        return GenerateResult(
            new_ids=new_ids, prompt_ids=prompts, decode_seconds=dt, compile_seconds=compile_s, steps=int(steps) - 1
        )

    def _lookup(self, params, B, P, S, gen, args):
        greedy = gen.sampling.greedy
        key = (B, P, S, gen.max_new_tokens, greedy, gen.block, gen.window, jax.tree.structure(params))
        jit_kw = {}
        if self.mesh is not None:
            from m2r2_jax.sharding import named_sharding, replicated, tree_shardings

            pshard = tree_shardings(self.mesh, logical_axes(model_spec(self.cfg)), params)
            vec = named_sharding(self.mesh, ("batch",), (B,))
            rep = replicated(self.mesh)
            jit_kw = dict(
                in_shardings=(
                    pshard,
                    named_sharding(self.mesh, ("batch", "seq"), (B, P)),
                    vec,
                    rep,
                    rep,
                    rep,
                    rep,
                    rep,
                ),
                out_shardings=(named_sharding(self.mesh, ("batch", None), (B, gen.max_new_tokens)), rep),
            )
        return self.cache.get(
            key,
            lambda: generate_fn(self.cfg, greedy, gen.max_new_tokens, S, gen.block, self.backend, gen.window),
            args,
            **jit_kw,
        )
