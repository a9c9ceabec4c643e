"""Routing traces of an MoE model's greedy decoding and the expert predictions made ahead of use:
the host-driven decode of moe_decode.py, recorded per decode step and MoE layer l (T steps in all,
prompts back to back):

    needed     the router's top-k experts, best first (what the layer computed with)
    x          the layer's MLP input rms_norm(h after its attention, mlp_norm): what its router reads
    states     the fast stream's states [h^0, h_f^1, ..., h_f^n] of the step's token (run first)

Predictions (`predictions`), each a layer's router on a stand-in for its MLP input:
    gate at distance d   layer l's router on MoE layer l-d's MLP input x (d = 1: the next-layer gate of
                         Mixtral-offloading / Pre-gated MoE, available one layer ahead)
    m2r2 per alignment   layer l's router on its mlp_norm of the fast state aligned with it
                         (moe_decode.aligned_state: floor / nearest / ceil by the states' target
                         layers; or `calibrated`: per MoE layer the fast state whose prediction had
                         the best recall@k on calibration prompts, `calibrate_alignment`), available
                         before layer 0; with the router's softmax over all experts (`m2r2_probs`,
                         the prediction's confidence)

and their recall@k by look-ahead distance (`recall_report`), plus the previous token's experts at the
same layer as a baseline (what an LRU cache lives on). `build_trace` makes the offload package's
RoutingTrace of them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.errors import M2R2Error
from m2r2_jax.evaluation.moe_decode import ALIGNMENTS, MoEDecoder, ram_experts, ram_provider
from m2r2_jax.model import layers as LY
from m2r2_jax.offload import RoutingTrace


@dataclasses.dataclass
class Collected:
    """The host-driven decode of every prompt, concatenated over their decode steps (T in all)."""

    prompts: list[list[int]]
    tokens: list[list[int]]  # generated tokens per prompt (the first from prefill)
    steps: list[int]  # decode steps per prompt (sum = T)
    needed: np.ndarray  # [T, L, k]
    x: np.ndarray  # [T, L, D] each MoE layer's MLP input
    states: np.ndarray | None  # [T, n + 1, D] the fast stream's states
    context: np.ndarray  # [T] the slot each decode step's token sits at
    ms: dict  # mean per decode step: begin, fast, layer [L], finish (this CPU, float32)


def collect(
    dec: MoEDecoder, prompts: Sequence[Sequence[int]], max_new_tokens: int, progress: bool = False
) -> Collected:
    """Greedy-decode every prompt (experts from RAM), recording the routing, the MLP inputs, the fast
    states (with a fast stream) and the pieces' wall times (after an untimed warm-up step per cache length)."""
    from tqdm import tqdm

    provider = ram_provider(ram_experts(dec.cfg, dec.params))
    src = dec.state_index("floor") if dec.fast is not None else None
    k = dec.cfg.experts_per_token
    L_ = dec.num_moe_layers

    def one_step(seq, rec):
        t0 = time.perf_counter()
        st = dec.begin(seq, src, k)
        t1 = time.perf_counter()
        ids, xs, lay = [], [], []
        for l in range(L_):
            ids.append(st.ids)
            xs.append(np.asarray(st.x).reshape(-1))
            c0 = time.perf_counter()
            dec.layer(st, l, {int(e): provider(l, int(e)) for e in st.ids})
            lay.append(time.perf_counter() - c0)
        f0 = time.perf_counter()
        dec.finish(st)
        f1 = time.perf_counter()
        if rec is not None:
            rec["needed"].append(np.stack(ids))
            rec["x"].append(np.stack(xs))
            rec["states"].append(st.fast_states)
            rec["context"].append(seq.pos - 1)
            rec["begin"].append((t1 - t0) * 1e3 - st.fast_ms)
            rec["fast"].append(st.fast_ms)
            rec["layer"].append(np.asarray(lay) * 1e3)
            rec["finish"].append((f1 - f0) * 1e3)

    rec = {k_: [] for k_ in ("needed", "x", "states", "context", "begin", "fast", "layer", "finish")}
    tokens, steps, warm = [], [], set()
    for p in tqdm(prompts, desc="routing traces", disable=not progress):
        seq = dec.start(p, max_new_tokens)
        S = seq.k[0].shape[2]
        if S not in warm and not seq.done:  # compile every piece for this cache length, untimed
            one_step(seq.copy(), None)
            warm.add(S)
        n = 0
        while not seq.done:
            one_step(seq, rec)
            n += 1
        tokens.append(list(seq.out))
        steps.append(n)
    if not rec["needed"]:
        raise M2R2Error("no decode step to trace: every prompt stopped at its first token")
    ms = dict(
        begin=float(np.mean(rec["begin"])),
        fast=float(np.mean(rec["fast"])),
        layer=[float(x) for x in np.mean(rec["layer"], axis=0)],
        finish=float(np.mean(rec["finish"])),
    )
    return Collected(
        prompts=[list(map(int, p)) for p in prompts],
        tokens=tokens,
        steps=steps,
        needed=np.stack(rec["needed"]).astype(np.int64),
        x=np.stack(rec["x"]),
        states=np.stack(rec["states"]) if dec.fast is not None else None,
        context=np.asarray(rec["context"]),
        ms=ms,
    )


def _recall(pred: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """[..., m] predictions vs [..., k] truth -> [...] share of the truth predicted."""
    hit = (pred[..., :, None] == needed[..., None, :]).any(-2)
    return hit.mean(-1)


def _by_distance(rec: np.ndarray, dist: np.ndarray, valid: np.ndarray) -> list[dict]:
    out = []
    for d in sorted(set(dist[valid].tolist())):
        sel = valid & (dist == d)
        out.append(dict(distance=int(d), recall=float(rec[sel].mean()), needs=int(sel.sum())))
    return out


@functools.lru_cache(maxsize=16)
def _jitted_probs(cfg):
    def probs(states, norms, routers):  # as moe_decode's _router_topk, to the softmax instead of the top-k
        x = jax.vmap(lambda s, n: LY.rms_norm(s, n, cfg.rms_norm_eps))(states.astype(cfg.jnp_dtype), norms)
        logits = jax.vmap(lambda s, r: LY.matmul(s, r, cfg.mm_dtype))(x, routers).astype(jnp.float32)
        return jax.nn.softmax(logits, axis=-1)

    return jax.jit(probs)


def m2r2_probs(dec: MoEDecoder, states: np.ndarray, src) -> np.ndarray:
    """Fast states [T, n + 1, D] -> [T, L, E]: MoE layer l's router softmax on its mlp_norm of
    states[:, src[l]] (the distribution `dec.predict` takes its top experts from)."""
    x = jnp.asarray(states)[:, jnp.asarray(np.asarray(src, np.int32))].transpose(1, 0, 2)  # [L, T, D]
    return np.asarray(_jitted_probs(dec.cfg)(x, dec.norms, dec.routers)).transpose(1, 0, 2)


def predictions(dec: MoEDecoder, col: Collected, width: int, extra: dict[str, np.ndarray] | None = None) -> dict:
    """{"gate": {d: [T, L, width]}, "m2r2": {alignment: [T, L, width]}, "m2r2_probs": {alignment:
    [T, L, E]}} (the m2r2 parts with a fast stream): the fixed alignments, and `extra` {name: [L]
    fast-state index per MoE layer}."""
    L_ = dec.num_moe_layers
    out = {"gate": {d: dec.gate_predictions(col.x, d, width) for d in range(1, L_)}, "m2r2": {}, "m2r2_probs": {}}
    if col.states is not None:
        maps = {how: dec.state_index(how) for how in ALIGNMENTS} | dict(extra or {})
        for how, src in maps.items():
            out["m2r2"][how] = np.stack([dec.predict(s, np.asarray(src, np.int32), width) for s in col.states])
            out["m2r2_probs"][how] = m2r2_probs(dec, col.states, src)
    return out


def state_recall(dec: MoEDecoder, col: Collected, k: int) -> np.ndarray:
    """[S, L]: recall@k of MoE layer l's router on each fast state s = 0..n (h^0, h_f^1, ...)."""
    if col.states is None:
        raise M2R2Error("no fast states were recorded (the decoder has no fast stream)")
    S, L_ = col.states.shape[1], dec.num_moe_layers
    out = np.zeros((S, L_))
    for s in range(S):
        pred = np.stack([dec.predict(x, np.full(L_, s, np.int32), k) for x in col.states])
        out[s] = _recall(pred, col.needed).mean(0)
    return out


def calibrate_alignment(dec: MoEDecoder, col: Collected, k: int) -> tuple[np.ndarray, np.ndarray]:
    """-> ([L] the fast state with the best recall@k per MoE layer on these (calibration) traces,
    ties to the earlier state; the [S, L] recalls it was chosen by)."""
    rec = state_recall(dec, col, k)
    return rec.argmax(0).astype(np.int32), rec


def recall_report(col: Collected, preds: dict, k: int, num_experts: int) -> dict:
    """Recall@k (the top-k predictions against the k experts used) by look-ahead distance; `chance` is
    a uniformly random k-subset's expected recall, k / E."""
    T, L_, _ = col.needed.shape
    layer = np.broadcast_to(np.arange(L_), (T, L_))
    rep: dict = {"k": k, "chance": k / num_experts}
    gate_rows, gate_mean = [], {}
    for d, p in preds["gate"].items():
        r = _recall(p[..., :k], col.needed)
        gate_rows += _by_distance(r, np.full((T, L_), d), layer >= d)
        gate_mean[d] = float(r[layer >= d].mean())
    rep["gate"] = dict(by_distance=gate_rows, next_layer=gate_mean.get(1))
    first = np.zeros(T, bool)
    first[np.cumsum([0, *col.steps[:-1]])] = True  # a prompt's first decode step has no previous token
    prev = np.concatenate([col.needed[:1], col.needed[:-1]])
    r = _recall(prev, col.needed)
    rep["previous_token"] = float(r[~first].mean()) if (~first).any() else None
    if preds["m2r2"]:  # distance = the layer: every prediction exists before layer 0
        means = {how: float(_recall(p[..., :k], col.needed).mean()) for how, p in preds["m2r2"].items()}
        rep["m2r2_alignments"] = means
        rep["m2r2"] = {
            how: _by_distance(_recall(p[..., :k], col.needed), layer, np.ones((T, L_), bool))
            for how, p in preds["m2r2"].items()
        }
        rep["m2r2_vs_previous_token"] = {
            how: predicted_vs_previous(p[..., :k], col.needed, prev, ~first, num_experts)
            for how, p in preds["m2r2"].items()
        }
    return rep


def predicted_vs_previous(pred, needed, prev, valid, num_experts: int) -> dict:
    """How a prediction and the previous token's experts (at the same layer) combine: over the steps
    `valid` (those with a previous token), per MoE layer and expert, P(used | named by both / by the
    prediction only / by the previous token only / by neither) and how many experts per layer fall in
    each class. What a cache can gain from a predictor beyond recency is the `predicted only` row."""

    def onehot(a):
        o = np.zeros(a.shape[:2] + (num_experts,), bool)
        np.put_along_axis(o, a, True, -1)
        return o

    used, p, q = onehot(needed)[valid], onehot(pred)[valid], onehot(prev)[valid]
    steps = max(int(valid.sum()) * needed.shape[1], 1)
    out = {}
    for name, m in (("both", p & q), ("predicted_only", p & ~q), ("previous_only", ~p & q), ("neither", ~p & ~q)):
        out[name] = dict(p_used=float(used[m].mean()) if m.any() else None, per_layer=float(m.sum() / steps))
    return out


def build_trace(dec: MoEDecoder, col: Collected, preds: dict, alignment: str | None, width: int) -> RoutingTrace:
    E = dec.cfg.num_experts
    gate = np.where(preds["gate"][1] >= 0, preds["gate"][1], 0) if 1 in preds["gate"] else None
    kw = {}
    if alignment is not None:
        kw = dict(m2r2_pred=preds["m2r2"][alignment][..., :width], m2r2_avail=np.zeros(dec.num_moe_layers, np.int64))
        if alignment in preds.get("m2r2_probs", {}):
            kw["m2r2_probs"] = preds["m2r2_probs"][alignment]
    if gate is not None:
        gate = gate[..., :width]
    return RoutingTrace(E, col.needed, gate_pred=gate, **kw)
