"""Greedy decoding of an MoE model driven from the host one MoE layer at a time, so that something
outside the model (an `offload.ExpertCache`) can hand each layer its experts' weights; and the fast
stream of M2R2 run over the same KV cache, whose states predict the experts of later layers.

A decode step (one token, batch 1) is cut at the MoE layers' expert FFNs:

    begin     embed the token; [the fast stream + its expert predictions]; every layer up to the
              router of the first MoE layer (its attention; dense layers before it in full)
    layer(l)  MoE layer l's k experts' FFN from the weights handed in, then every layer up to the router
              of MoE layer l + 1 (its attention, and any dense layer between; after the last MoE
              layer, any dense layer left)
    finish    the final norm + LM head, argmax -> the next token

Each piece is a jitted function of the resident weights (attention, norms, routers, a shared expert,
dense MLPs, embeddings, head: never the routed experts) and the per-layer KV cache (donated, written
in place). The experts' FFN is `moe.dense_experts` over the k experts handed in, in the router's
order with its combine weights: the same executable whether the weights come from RAM (`ram_experts`)
or from a cache slot, so both decode the same tokens bit for bit.

Prompts are prefilled by the whole model (`decoding.generate.prefill`, every expert resident), in the
cache shape `Generator.plan` picks; routing and offloading cover the decode steps only.

The fast stream (`FastStream`) is M2R2Exit's (decoding/early_exit.py): from the token's embedding, fast
layer m runs its merged weights over the base's layer-idx[m] KV cache of the tokens before it plus its
own K/V, before any slow layer of the token. Its layers are dense (a stream trained on the dense
model a MoEfied base was made from runs all the FFN neurons): they stay resident.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.backend import XLA
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.generate import GenerateConfig, Generator, pad_prompts, prefill, stop_tuple
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.modules import FastLayer
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.model.attention import CacheAttention, tree_draft_attention
from m2r2_jax.model.modules import Attention, DecoderLayer, residual_update
from m2r2_jax.model.moe import dense_experts, route

EXPERT_PARTS = ("gate", "up", "down")
ALIGNMENTS = ("floor", "nearest", "ceil")


def moe_layers(cfg: ModelConfig) -> tuple[int, ...]:
    """The decoder layers (0-based) whose MLP is an MoE, in order: MoE layer l is layer moe_layers[l]."""
    out = tuple(i for i in range(cfg.num_layers) if cfg.layer_mlp(i) == "moe") if cfg.mlp_type == "moe" else ()
    if not out:
        raise M2R2Error("expert offloading needs an MoE model (mlp_type moe); this one has no MoE layer")
    return out


def resident_params(cfg: ModelConfig, params: dict) -> dict:
    """The params with every MoE layer's routed experts (mlp gate / up / down) left out."""
    out = dict(params)
    out["layers"] = [
        {**lp, "mlp": {k: v for k, v in lp["mlp"].items() if k not in EXPERT_PARTS}} if i in moe_layers(cfg) else lp
        for i, lp in enumerate(params["layers"])
    ]
    return out


def ram_experts(cfg: ModelConfig, params: dict) -> list[dict[str, np.ndarray]]:
    """Per MoE layer, its experts as float32 numpy: gate / up [E, D, F], down [E, F, D]."""
    return [{p: np.asarray(params["layers"][i]["mlp"][p], np.float32) for p in EXPERT_PARTS} for i in moe_layers(cfg)]


# ----------------------------------------------------------------------------- the fast stream


@dataclasses.dataclass(frozen=True, eq=False)
class FastStream:
    """M2R2's fast layers as drafting runs them: `layers[m]` = base layer `mc.base_layers(N)[m]` with
    its adapters merged (stream.merge_fast_layer), run under `cfg` (the config their weights belong to:
    a dense one for a stream trained on the dense model a MoEfied base came from)."""

    cfg: ModelConfig
    mc: M2R2Config
    layers: list

    @property
    def resident_bytes(self) -> int:
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.layers)))

    def targets(self) -> list[int]:
        """t(m) of each state [h^0, h_f^1, ..., h_f^n]: the slow layer count it is aligned with."""
        return [0] + self.mc.targets_of(self.cfg.num_layers)


def merged_fast_stream(cfg: ModelConfig, mc: M2R2Config, base: dict, m2r2: dict) -> FastStream:
    """The fast stream of a checkpoint trained on the dense model (cfg, base): its layers' base weights
    with the adapters and gains merged (as M2R2Exit.prepare does)."""
    if cfg.mlp_type != "dense":
        raise M2R2Error(
            f"the fast stream's layers must be dense (merging adapters into a {cfg.mlp_type} MLP is not "
            "implemented): give the dense model the checkpoint was trained on"
        )
    from m2r2_jax.m2r2.stream import merge_fast_layer

    idx = mc.base_layers(cfg.num_layers)
    layers = jax.jit(lambda b, m: [merge_fast_layer(b["layers"][j], m["fast"][l]) for l, j in enumerate(idx)])(
        base, m2r2
    )
    return FastStream(cfg, mc, layers)


def aligned_state(targets: Sequence[int], j: int, how: str) -> int:
    """Which of the fast states [h^0, h_f^1, ...] (aligned with slow states h_s^targets[m]) stands in
    for the input of slow layer j (0-based; its MLP input lies between h_s^j and h_s^(j+1)):

      floor    the last with target <= j (as M2R2Exit.kv_sources picks K/V sources)
      nearest  the target closest to j, ties to the later state
      ceil     the first with target >= j + 1 (the first state past the layer; the last state if none)
    """
    m_all = range(len(targets))
    if how == "floor":
        return max(m for m in m_all if targets[m] <= j)
    if how == "nearest":
        return min(m_all, key=lambda m: (abs(targets[m] - j), -m))
    if how == "ceil":
        return next((m for m in m_all if targets[m] >= j + 1), len(targets) - 1)
    raise M2R2Error(f"unknown alignment {how!r}: choose from {', '.join(ALIGNMENTS)}")


# ----------------------------------------------------------------------------- jitted pieces


def _rope(cfg, pos):
    return L.rope_cos_sin(cfg, pos[:, None])


def _to_router(cfg: ModelConfig, lp, h, kc, vc, pos):
    """Layer lp's attention half for h [1, 1, D] at slot pos [1], then its router on the MLP input.
    -> (h after the attention residual, the MLP input x [1, 1, D], expert ids [k], combine weights [k], kc, vc)."""
    cos, sin = _rope(cfg, pos)
    x = L.rms_norm(h, lp["attn_norm"], cfg.rms_norm_eps)
    att = CacheAttention(cfg, XLA, kc, vc, pos, L.block_mask(pos, 1, kc.shape[2]))
    upd, (kc, vc) = Attention(cfg).apply({"params": lp["attn"]}, x, cos, sin, att)
    h = h + residual_update(cfg, upd, None)
    x = L.rms_norm(h, lp["mlp_norm"], cfg.rms_norm_eps)
    ids, w, _ = route(cfg, L.matmul(x.reshape(1, -1), lp["mlp"]["router"], cfg.mm_dtype).astype(jnp.float32))
    return h, x, ids[0], w[0], kc, vc


def _experts_ffn(cfg: ModelConfig, mlp, h, x, w, gate, up, down):
    """h + the MoE output for x: the k experts gate / up [k, D, F], down [k, F, D] (in the router's
    order), combined with its weights w [k] (+ the shared expert, resident)."""
    x2 = x.reshape(1, -1)
    k = gate.shape[0]
    y = dense_experts(x2, jnp.arange(k)[None], w[None], gate, up, down, cfg.mm_dtype).astype(x.dtype)
    if cfg.shared_expert_intermediate_size:
        from m2r2_jax.model.mlp import DenseMLP

        shared = DenseMLP(cfg, features=cfg.shared_expert_intermediate_size).apply({"params": mlp["shared"]}, x2)
        y = y + jax.nn.sigmoid(L.matmul(x2, mlp["shared_gate"], cfg.mm_dtype)) * shared
    return h + residual_update(cfg, y.reshape(h.shape), None)


def _dense_layer(cfg: ModelConfig, index: int, lp, h, kc, vc, pos):
    cos, sin = _rope(cfg, pos)
    att = CacheAttention(cfg, XLA, kc, vc, pos, L.block_mask(pos, 1, kc.shape[2]))
    h, (kc, vc) = DecoderLayer(cfg, index=index).apply({"params": lp}, h, cos, sin, att)
    return h, kc, vc


def _head_params(params: dict) -> dict:
    return {k: params[k] for k in ("embed", "final_norm", "lm_head") if k in params}


def _embed(cfg: ModelConfig, hp, tok):
    return D.embed(cfg, hp, tok.reshape(1, 1))


def _next_token(cfg: ModelConfig, hp, h):
    return jnp.argmax(D.logits_from_hidden(cfg, hp, h)[0, 0]).astype(jnp.int32)


def _prefill(cfg: ModelConfig, S: int, params, tokens, lengths):
    logits, cache = prefill(cfg, params, tokens, lengths, D.init_cache(cfg, 1, S))
    return jnp.argmax(logits[0]).astype(jnp.int32), cache


def _fast_states(cfg: ModelConfig, mc: M2R2Config, layers, h0, ks, vs, pos):
    """The fast stream for one token: -> [n + 1, D] = [h^0, h_f^1, ..., h_f^n]. ks / vs: the base's
    caches of layers mc.base_layers (slots < pos are the context)."""
    cos, sin = _rope(cfg, pos)
    none = jnp.zeros((1, cfg.num_kv_heads, 1, cfg.head_dim), cfg.jnp_dtype)
    no_anc = np.zeros((1, 1), bool)
    h, hs = h0, [h0]
    for m, lp in enumerate(layers):
        att = tree_draft_attention(cfg, XLA, ks[m], vs[m], pos, none, none, no_anc)
        h, _ = FastLayer(cfg, mc, merged=True).apply({"params": {}}, lp, h, cos, sin, att)
        hs.append(h)
    return jnp.concatenate(hs, axis=1)[0]


def _router_topk(cfg: ModelConfig, width: int, states, norms, routers):
    """Each MoE layer's router on stand-in states: states [L, N, D] (normalised by norms [L, D] first
    unless norms is None) @ routers [L, D, E] -> the `width` best experts [L, N, width], best first."""
    x = states.astype(cfg.jnp_dtype)
    if norms is not None:
        x = jax.vmap(lambda s, n: L.rms_norm(s, n, cfg.rms_norm_eps))(x, norms)
    logits = jax.vmap(lambda s, r: L.matmul(s, r, cfg.mm_dtype))(x, routers).astype(jnp.float32)
    return jax.lax.top_k(logits, width)[1]


@functools.lru_cache(maxsize=16)
def _jitted(cfg: ModelConfig):
    """One set of executables per config (decoders of the same model share their compiles)."""
    return dict(
        to_router=jax.jit(functools.partial(_to_router, cfg), donate_argnums=(2, 3)),
        ffn=jax.jit(functools.partial(_experts_ffn, cfg)),
        dense=jax.jit(functools.partial(_dense_layer, cfg), static_argnums=0, donate_argnums=(3, 4)),
        embed=jax.jit(functools.partial(_embed, cfg)),
        next_token=jax.jit(functools.partial(_next_token, cfg)),
        prefill=jax.jit(functools.partial(_prefill, cfg), static_argnums=0),
    )


@functools.lru_cache(maxsize=16)
def _jitted_fast(cfg: ModelConfig, mc: M2R2Config):
    return jax.jit(functools.partial(_fast_states, cfg, mc))


@functools.lru_cache(maxsize=16)
def _jitted_topk(cfg: ModelConfig, width: int):
    return jax.jit(functools.partial(_router_topk, cfg, width))


# ----------------------------------------------------------------------------- decoding


@dataclasses.dataclass
class SeqState:
    """One prompt's decoding: its KV cache (per layer, [1, KV, S, hd]), the last token (not yet in the
    cache) at slot `pos`, and every token generated so far (the last one is `out[-1]`)."""

    k: list
    v: list
    pos: int
    out: list[int]
    max_new: int
    stop: tuple[int, ...]

    @property
    def done(self) -> bool:
        return len(self.out) >= self.max_new or self.out[-1] in self.stop

    def copy(self) -> SeqState:
        """An independent copy (the cache is donated by decoding: a copy can be decoded again)."""
        return SeqState(
            [jnp.copy(x) for x in self.k],
            [jnp.copy(x) for x in self.v],
            self.pos,
            list(self.out),
            self.max_new,
            self.stop,
        )


@dataclasses.dataclass
class TokenStep:
    """Where a decode step stands between the pieces (see the module doc)."""

    seq: SeqState
    l: int  # the MoE layer whose experts come next
    h: jax.Array  # [1, 1, D]: after the attention half of MoE layer l
    x: jax.Array  # [1, 1, D]: MoE layer l's MLP input
    ids: np.ndarray  # [k] the experts MoE layer l's router chose, best first
    w: jax.Array  # [k] their combine weights
    fast_states: np.ndarray | None = None  # [n + 1, D] the fast stream's states, when it ran
    fast_pred: np.ndarray | None = None  # [L, width] its expert predictions per MoE layer
    fast_ms: float = 0.0  # wall time of the fast stream and its predictions (synchronised)


class MoEDecoder:
    """Host-driven greedy decoding (module doc). `params`: the model's params (prefill reads them all;
    the decode steps only the resident ones: the experts come through `layer`)."""

    def __init__(self, cfg: ModelConfig, params: dict, fast: FastStream | None = None):
        if cfg.jnp_dtype != jnp.float32:
            raise M2R2Error(f"host-driven MoE decoding runs float32 (the expert store's dtype), not {cfg.dtype}")
        self.cfg, self.params, self.fast = cfg, params, fast
        self.moe = moe_layers(cfg)
        self.resident = resident_params(cfg, params)
        self._head = _head_params(params)
        self._fn = _jitted(cfg)
        self.routers = jnp.stack([params["layers"][i]["mlp"]["router"] for i in self.moe])  # [L, D, E]
        self.norms = jnp.stack([params["layers"][i]["mlp_norm"] for i in self.moe])  # [L, D]
        if fast is not None:
            fc = fast.cfg
            same = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
            if any(getattr(fc, a) != getattr(cfg, a) for a in same):
                raise M2R2Error("the fast stream's config does not match the MoE model's (hidden size, layers, heads)")
            self._fast_fn = _jitted_fast(fc, fast.mc)
            self._fast_idx = fast.mc.base_layers(cfg.num_layers)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe)

    def state_index(self, how: str) -> np.ndarray:
        """[L]: for each MoE layer, which fast state stands in for its input (`aligned_state`)."""
        if self.fast is None:
            raise M2R2Error("no fast stream was given")
        t = self.fast.targets()
        return np.asarray([aligned_state(t, j, how) for j in self.moe], np.int32)

    def predict(self, states, src: np.ndarray, width: int) -> np.ndarray:
        """Fast states [n + 1, D] of one token -> [L, width] expert ids, best first: MoE layer l's router
        on its MLP norm of states[src[l]]. The one executable for the live and the recorded states."""
        x = jnp.asarray(states)[jnp.asarray(src)][:, None]
        return np.asarray(_jitted_topk(self.cfg, width)(x, self.norms, self.routers))[:, 0]

    def gate_predictions(self, x: np.ndarray, distance: int, width: int) -> np.ndarray:
        """MLP inputs x [T, L, D] -> [T, L, width]: MoE layer l's router on MoE layer (l - distance)'s
        MLP input (the next-layer gate at distance 1); rows l < distance are -1."""
        T, L_, _ = x.shape
        out = np.full((T, L_, width), -1, np.int64)
        if distance < L_:
            src = jnp.asarray(x[:, : L_ - distance].transpose(1, 0, 2))  # [L - d, T, D]
            got = _jitted_topk(self.cfg, width)(src, None, self.routers[distance:])
            out[:, distance:] = np.asarray(got).transpose(1, 0, 2)
        return out

    # ---- prefill -----------------------------------------------------------------------------

    def start(self, prompt: Sequence[int], max_new_tokens: int, stop_ids=None) -> SeqState:
        """Prefill (all experts resident) -> the sequence with its first generated token."""
        if max_new_tokens < 1:
            raise M2R2Error(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt = [int(t) for t in prompt]
        P, S = Generator(self.cfg).plan([len(prompt)], GenerateConfig(max_new_tokens=max_new_tokens))
        tokens = jnp.asarray(pad_prompts([prompt], P))
        first, cache = self._fn["prefill"](S, self.params, tokens, jnp.asarray([len(prompt)], jnp.int32))
        stop = stop_tuple(self.cfg, stop_ids)
        return SeqState(list(cache.k), list(cache.v), len(prompt), [int(first)], max_new_tokens, stop)

    # ---- one decode step, in pieces ------------------------------------------------------------

    def begin(self, seq: SeqState, fast_src: np.ndarray | None = None, width: int = 0) -> TokenStep:
        """Embed seq's last token; with `fast_src` run the fast stream and predict `width` experts per
        MoE layer from the states it picks; run up to MoE layer 0's router."""
        if seq.done:
            raise M2R2Error("the sequence has finished")
        pos = jnp.asarray([seq.pos], jnp.int32)
        h = self._fn["embed"](self._head, jnp.asarray(seq.out[-1], jnp.int32))
        states = pred = None
        fast_ms = 0.0
        if fast_src is not None:
            ks = [seq.k[j] for j in self._fast_idx]
            vs = [seq.v[j] for j in self._fast_idx]
            t0 = time.perf_counter()
            hs = self._fast_fn(self.fast.layers, h, ks, vs, pos)
            pred = self.predict(hs, fast_src, width)
            states, fast_ms = np.asarray(hs), (time.perf_counter() - t0) * 1e3
        step = TokenStep(seq, -1, h, h, np.zeros(0, np.int64), h, states, pred, fast_ms)
        self._advance(step, -1)
        return step

    def layer(self, step: TokenStep, l: int, weights: Mapping[int, Mapping[str, np.ndarray]]) -> None:
        """MoE layer l's FFN from `weights` {expert: {"gate" [D, F], "up" [D, F], "down" [F, D]}} (the
        experts its router chose), then on to the next MoE layer's router."""
        if l != step.l:
            raise M2R2Error(f"decode step is at MoE layer {step.l}, not {l}")
        ids = [int(e) for e in step.ids]
        if sorted(int(e) for e in weights) != sorted(ids):
            raise M2R2Error(f"MoE layer {l}: got the weights of experts {sorted(weights)}, the router chose {ids}")
        parts = [np.stack([weights[e][p] for e in ids]) for p in EXPERT_PARTS]
        mlp = self.resident["layers"][self.moe[l]]["mlp"]
        step.h = self._fn["ffn"](mlp, step.h, step.x, step.w, *parts)
        self._advance(step, l)

    def finish(self, step: TokenStep) -> int:
        """After the last MoE layer's `layer`: the final norm + LM head; appends the next token."""
        if step.l != self.num_moe_layers:
            raise M2R2Error(f"decode step is at MoE layer {step.l}: its experts have not all run")
        seq = step.seq
        tok = int(self._fn["next_token"](self._head, step.h))
        seq.out.append(tok)
        seq.pos += 1
        return tok

    def _advance(self, step: TokenStep, l: int) -> None:
        """From after MoE layer l's FFN (l = -1: the embedding) to MoE layer l+1's router (or the end)."""
        seq = step.seq
        pos = jnp.asarray([seq.pos], jnp.int32)
        lo = self.moe[l] + 1 if l >= 0 else 0
        hi = self.moe[l + 1] if l + 1 < len(self.moe) else self.cfg.num_layers
        for i in range(lo, hi):  # dense layers in between
            step.h, seq.k[i], seq.v[i] = self._fn["dense"](
                i, self.resident["layers"][i], step.h, seq.k[i], seq.v[i], pos
            )
        step.l = l + 1
        if step.l < len(self.moe):
            i = self.moe[step.l]
            step.h, step.x, ids, step.w, seq.k[i], seq.v[i] = self._fn["to_router"](
                self.resident["layers"][i], step.h, seq.k[i], seq.v[i], pos
            )
            step.ids = np.asarray(ids)  # waits for the piece: its time is this call's
        else:
            jax.block_until_ready(step.h)


def ram_provider(experts: list[dict[str, np.ndarray]]) -> Callable[[int, int], dict[str, np.ndarray]]:
    """experts(l, e) from `ram_experts`' arrays."""
    return lambda l, e: {p: experts[l][p][e] for p in EXPERT_PARTS}
