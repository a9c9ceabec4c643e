"""Draft & Verify (Zhang et al. 2023) / LayerSkip-style self-speculation without training: the draft
model is the base itself with a static set of layers skipped (or every layer from E on: "exit at
layer E"), read through the shared final norm + LM head. It drafts a chain autoregressively and stops
extending once its top-1 probability falls below a threshold.

Static shapes: the chain is `k` tokens (one `chain(k)` tree). Step 0 always runs; each later step runs
under a `lax.cond` on "some active row is still confident" (`drafters.confident_step`), so once every
row has stopped the remaining draft steps cost nothing. Nodes never drafted carry token 0: verification treats them like
any draft token (accepted only where the full model agrees), so the loop stays lossless without a
per-row length. A row that stopped while another row continues keeps the tokens the batch drafts for
it anyway (free: the block is verified whole). The threshold is static (Draft & Verify adapts it).

The prefix's K/V come from the main cache (the full model's, as in Draft & Verify and LayerSkip: for
the layers below the first skipped one they are exactly the draft model's own); the draft tokens'
K/V for the layers the draft runs go to a draft-local buffer, so `propose` never writes the cache.

`search_skip` picks the skipped set greedily on calibration prompts by measured acceptance (Draft &
Verify uses Bayesian optimisation over the layers' attention and MLP sublayers; here whole layers, one
at a time, the one whose skipping keeps tau highest, up to a budget).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.drafters import Drafter, confident_step
from m2r2_jax.decoding.state import DraftView, Proposal
from m2r2_jax.decoding.trees import chain
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import tree_draft_attention
from m2r2_jax.model.modules import Transformer


def segments(run: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) runs of the sorted layer indices `run` (each runs as one stack call)."""
    out: list[tuple[int, int]] = []
    for i in run:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def parse_layers(spec, num_layers: int) -> tuple[int, ...]:
    """A skipped set from "3,5,7", "10-19" ranges, a list, or a JSON file {"skip": [...]} (search_skip's)."""
    if isinstance(spec, str) and spec.endswith(".json"):
        import json
        from pathlib import Path

        f = Path(spec)
        if not f.is_file():
            raise M2R2Error(f"skip-layers file not found: {f}")
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise M2R2Error(f"corrupt skip-layers file {f}: {e}") from None
        spec = data.get("skip") if isinstance(data, dict) else data
        if not isinstance(spec, list):
            raise M2R2Error(f'skip-layers file {f}: expected {{"skip": [layer, ...]}}')
    if isinstance(spec, str):
        out = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
            except ValueError:
                raise M2R2Error(f"skip layers: {part!r} is not a layer index or a range lo-hi") from None
        spec = out
    layers = tuple(sorted(set(spec)))
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in layers):
        raise M2R2Error(f"skip layers must be integers, got {list(spec)!r}")
    if any(not 0 <= i < num_layers for i in layers):
        raise M2R2Error(f"skip layers {list(layers)} must lie in [0, {num_layers})")
    return tuple(int(i) for i in layers)


def check_knobs(k, threshold) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise M2R2Error(f"draft_verify: max draft length must be an integer >= 1, got {k!r}")
    t = threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t < 1.0:
        raise M2R2Error(f"draft_verify: confidence threshold must be in [0, 1), got {t!r}")


@dataclasses.dataclass(frozen=True, eq=True)
class DraftVerify(Drafter):
    """The base with `skip` layers skipped drafts a `k`-token chain with a confidence stop.

    masked: the skipped set is data (`prepare(base, skip_mask)` -> {"skip": bool [L]}): every layer runs
    and a skipped layer's output is discarded, so one compiled loop measures any set (search_skip)."""

    cfg: ModelConfig
    skip: tuple[int, ...] = ()
    k: int = 5
    threshold: float = 0.5
    backend: Backend = XLA
    masked: bool = False

    def __post_init__(self):
        n = self.cfg.num_layers
        if self.skip != parse_layers(list(self.skip), n):
            raise M2R2Error(f"skip layers must be sorted and distinct, got {list(self.skip)}")
        if not self.masked and len(self.skip) >= n:
            raise M2R2Error(f"draft_verify: skipping all {n} layers leaves no draft model")
        check_knobs(self.k, self.threshold)

    @classmethod
    def exit_at(cls, cfg: ModelConfig, exit_layer: int, **kw) -> DraftVerify:
        """LayerSkip's draft without its training: the first `exit_layer` layers, then the LM head."""
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < cfg.num_layers:
            raise M2R2Error(f"draft_verify: exit layer must be in [1, {cfg.num_layers}), got {exit_layer!r}")
        return cls(cfg, tuple(range(exit_layer, cfg.num_layers)), **kw)

    @property
    def trees(self):
        return (chain(self.k),)

    @property
    def kinds(self):
        return ("draft_verify",)

    @property
    def run_layers(self) -> tuple[int, ...]:
        if self.masked:
            return tuple(range(self.cfg.num_layers))
        return tuple(i for i in range(self.cfg.num_layers) if i not in self.skip)

    def prepare(self, base, skip_mask=None):
        if not self.masked:
            return None
        m = np.zeros(self.cfg.num_layers, bool) if skip_mask is None else np.asarray(skip_mask, bool)
        if m.shape != (self.cfg.num_layers,):
            raise M2R2Error(f"skip mask must have {self.cfg.num_layers} entries, got shape {m.shape}")
        return {"skip": jnp.asarray(m)}

    def _step(self, dparams, base, view: DraftView, d: int, carry):
        """Draft token d + 1 from token d (at position pos + d)."""
        cfg, K = self.cfg, self.k
        toks, lk, lv, going = carry
        lk, lv = list(lk), list(lv)
        x = toks[:, d : d + 1]
        cos, sin = L.rope_cos_sin(cfg, view.pos[:, None] + d)
        anc = np.zeros((1, K), bool)
        anc[0, :d] = True  # the earlier draft tokens' slots of the local buffer (its own K/V is the block's)
        h = D.embed(cfg, base, x)
        run = self.run_layers
        slot = {j: n for n, j in enumerate(run)}

        def attention_for(j):
            return tree_draft_attention(
                cfg, self.backend, view.cache.k[j], view.cache.v[j], view.pos, lk[slot[j]], lv[slot[j]], anc
            )

        segs = [(j, j + 1) for j in run] if self.masked else segments(run)
        for lo, hi in segs:
            h_new, states, _, _ = Transformer(cfg).apply(D.variables(base), x, cos, sin, attention_for, lo, hi, h)
            h = jnp.where(dparams["skip"][lo], h, h_new) if self.masked else h_new
            for j, (k, v) in states.items():
                lk[slot[j]] = lk[slot[j]].at[:, :, d : d + 1].set(k.astype(lk[slot[j]].dtype))
                lv[slot[j]] = lv[slot[j]].at[:, :, d : d + 1].set(v.astype(lv[slot[j]].dtype))
        p = jax.nn.softmax(D.logits_from_hidden(cfg, base, h)[:, 0], -1)
        toks = toks.at[:, d + 1].set(jnp.argmax(p, -1).astype(jnp.int32))
        return toks, lk, lv, going & (jnp.max(p, -1) >= self.threshold)

    def propose(self, dparams, base, view: DraftView) -> Proposal:
        cfg, K = self.cfg, self.k
        B = view.cur.shape[0]
        shape = (B, cfg.num_kv_heads, K, cfg.head_dim)
        n = len(self.run_layers)
        lk = [jnp.zeros(shape, cfg.jnp_dtype) for _ in range(n)]
        lv = [jnp.zeros(shape, cfg.jnp_dtype) for _ in range(n)]
        toks = jnp.zeros((B, K + 1), jnp.int32).at[:, 0].set(view.cur)
        carry = self._step(dparams, base, view, 0, (toks, lk, lv, view.active))
        for d in range(1, K):  # each later step only while some active row is still confident
            carry = confident_step(carry[3], lambda c, d=d: self._step(dparams, base, view, d, c), carry)
        return Proposal(carry[0], jnp.int32(0))


def search_skip(
    cfg: ModelConfig,
    base,
    prompts: Sequence[Sequence[int]],
    n_skip: int,
    *,
    k: int = 5,
    threshold: float = 0.0,
    candidates: Sequence[int] | None = None,
    max_new_tokens: int = 32,
    backend: Backend = XLA,
    progress=None,
) -> dict:
    """Greedy search for the skipped set: start from none; each round skips, among `candidates` (default
    every layer but the first and the last), the layer whose skipping gives the highest tau (tokens per
    verification step, greedy, on `prompts` batched) together with the set so far; `n_skip` rounds.
    One compiled loop serves every set (`DraftVerify(masked=True)`). -> {"skip", "tau", "history"}."""
    from m2r2_jax.decoding.speculative import SpecConfig, SpeculativeDecoder

    L_ = cfg.num_layers
    cand = tuple(range(1, L_ - 1)) if candidates is None else parse_layers(list(candidates), L_)
    if isinstance(n_skip, bool) or not isinstance(n_skip, int) or not 1 <= n_skip <= len(cand):
        raise M2R2Error(f"search_skip: n_skip must be in [1, {len(cand)}] (the candidate layers), got {n_skip!r}")
    if not prompts:
        raise M2R2Error("search_skip: no calibration prompts")
    drafter = DraftVerify(cfg, (), k, threshold, backend, masked=True)
    spec = SpeculativeDecoder(cfg, drafter, backend)
    sc = SpecConfig(max_new_tokens=max_new_tokens, stop_ids=(-1,))

    def tau(skip) -> float:
        r = spec.generate(base, drafter.prepare(base, [i in skip for i in range(L_)]), prompts, sc)
        return r.tau

    chosen: list[int] = []
    history = []
    for _ in range(n_skip):
        scores = {c: tau(set(chosen) | {c}) for c in cand if c not in chosen}
        best = max(scores, key=lambda c: (scores[c], -c))
        chosen.append(best)
        history.append({"skip": sorted(chosen), "tau": scores[best], "tried": {str(c): s for c, s in scores.items()}})
        if progress:
            progress(history[-1])
    return {"skip": sorted(chosen), "tau": history[-1]["tau"], "history": history, "compiles": spec.compiles}
