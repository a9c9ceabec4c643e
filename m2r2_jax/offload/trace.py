"""A recorded routing trace: which experts each decoded token used at each MoE layer, and what the
predictors said ahead of time. Model-independent: plain integer numpy arrays, validated once here so
the policies, the simulator and the real engine can trust them.

    needed      int [T, L, k]    the router's actual top-k expert ids of token t at MoE layer l;
                                 distinct within a row, each in [0, E)
    gate_pred   int [T, L, k']   next-layer-gate prediction FOR layer l, made at layer l-1 (layer l's
                                 router applied to layer l-1's input, as Mixtral-offloading and
                                 Pre-gated MoE do); row l = 0 has no earlier layer and is ignored
    m2r2_pred   int [T, L, m]    the fast stream's prediction for layer l (layer l's router applied to
                                 the fast stream's state), best first
    m2r2_avail  int [L] | [T, L] the layer step at which the prediction for layer l exists,
                                 0 <= avail <= l. Step s means "at the start of layer s of the same
                                 token, before its experts are fetched"; [L] is the same for all tokens
    m2r2_probs  float [T, L, E]  optional: the distribution m2r2_pred was read from (layer l's router
                                 softmax on the fast state), known with the prediction: a confidence
                                 for every expert, predicted or not

T tokens, L MoE layers (numbered 0..L-1 among the MoE layers only), E experts per layer. Predictions
may repeat an id or miss the truth: only `needed` must be exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m2r2_jax.errors import M2R2Error


def _ids(name: str, a, num_experts: int, lead: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3 or min(a.shape) < 1:
        raise M2R2Error(f"trace {name}: expected a non-empty int array [T, L, k], got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise M2R2Error(f"trace {name}: expected integer expert ids, got dtype {a.dtype}")
    if lead is not None and a.shape[:2] != lead:
        raise M2R2Error(f"trace {name}: shape {a.shape} does not match needed's [T, L] = {list(lead)}")
    if a.min() < 0 or a.max() >= num_experts:
        raise M2R2Error(f"trace {name}: expert ids must be in [0, {num_experts}), got [{a.min()}, {a.max()}]")
    return a.astype(np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingTrace:
    """See the module docstring for the arrays' meaning; `m2r2_avail` is stored as [T, L]."""

    num_experts: int
    needed: np.ndarray
    gate_pred: np.ndarray | None = None
    m2r2_pred: np.ndarray | None = None
    m2r2_avail: np.ndarray | None = None
    m2r2_probs: np.ndarray | None = None

    def __post_init__(self):
        if not isinstance(self.num_experts, (int, np.integer)) or self.num_experts < 1:
            raise M2R2Error(f"trace: num_experts must be a positive int, got {self.num_experts!r}")
        needed = _ids("needed", self.needed, self.num_experts)
        T, L, k = needed.shape
        if k > self.num_experts:
            raise M2R2Error(f"trace needed: top-{k} of {self.num_experts} experts is impossible")
        srt = np.sort(needed, axis=-1)
        if (srt[..., 1:] == srt[..., :-1]).any():
            t, l = np.argwhere((srt[..., 1:] == srt[..., :-1]).any(-1))[0]
            raise M2R2Error(f"trace needed: token {t} layer {l} repeats an expert id: {needed[t, l].tolist()}")
        object.__setattr__(self, "needed", needed)
        if self.gate_pred is not None:
            object.__setattr__(self, "gate_pred", _ids("gate_pred", self.gate_pred, self.num_experts, (T, L)))
        if (self.m2r2_pred is None) != (self.m2r2_avail is None):
            raise M2R2Error("trace: m2r2_pred and m2r2_avail come together (a prediction needs its time)")
        if self.m2r2_pred is not None:
            object.__setattr__(self, "m2r2_pred", _ids("m2r2_pred", self.m2r2_pred, self.num_experts, (T, L)))
            object.__setattr__(self, "m2r2_avail", self._avail(np.asarray(self.m2r2_avail), T, L))
        if self.m2r2_probs is not None:
            if self.m2r2_pred is None:
                raise M2R2Error("trace: m2r2_probs needs m2r2_pred (they are the same prediction)")
            object.__setattr__(self, "m2r2_probs", self._probs(np.asarray(self.m2r2_probs), T, L, self.num_experts))

    @staticmethod
    def _avail(a: np.ndarray, T: int, L: int) -> np.ndarray:
        if not np.issubdtype(a.dtype, np.integer) or a.shape not in ((L,), (T, L)):
            raise M2R2Error(f"trace m2r2_avail: expected int [L]={[L]} or [T, L]={[T, L]}, got {a.dtype} {a.shape}")
        a = np.broadcast_to(a, (T, L)).astype(np.int64)
        late = a > np.arange(L)
        if (a < 0).any() or late.any():
            bad = np.argwhere((a < 0) | late)[0]
            raise M2R2Error(
                f"trace m2r2_avail: the prediction for layer {bad[1]} must exist at a step in [0, {bad[1]}], "
                f"got {a[tuple(bad)]} (token {bad[0]})"
            )
        return a

    @staticmethod
    def _probs(a: np.ndarray, T: int, L: int, E: int) -> np.ndarray:
        if not np.issubdtype(a.dtype, np.floating) or a.shape != (T, L, E):
            raise M2R2Error(f"trace m2r2_probs: expected float [T, L, E]={[T, L, E]}, got {a.dtype} {a.shape}")
        a = a.astype(np.float64)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise M2R2Error("trace m2r2_probs: expected probabilities (finite, in [0, 1])")
        return a

    @property
    def num_tokens(self) -> int:
        return self.needed.shape[0]

    @property
    def num_layers(self) -> int:
        return self.needed.shape[1]

    @property
    def top_k(self) -> int:
        return self.needed.shape[2]
