"""The sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, OLMoE, GraniteMoE): `MLP_SLOT["moe"]`.

    MoEMLP           router [embed, expert]
                     gate / up [expert, embed, expert_mlp], down [expert, expert_mlp, embed]
                     (+ Qwen2-MoE: shared (DenseMLP of shared_expert_intermediate_size), shared_gate [embed, 1])

Per token the router scores the E experts and keeps k (`route`); the token's output is the weighted sum
of its k experts' SwiGLU outputs (+ the shared expert, scaled by sigmoid(x shared_gate)). Dropless: every
(token, expert) pair is computed, none is dropped for capacity, so a token's output never depends on
the other tokens in the batch (padding rows cannot disturb real ones).

Compute (`ragged_experts`): the N*k (token, slot) pairs are sorted by expert, the expert matmuls run as
`jax.lax.ragged_dot` over the sorted rows with one group per expert (group sizes = tokens per expert),
and the rows are put back in (token, slot) order and combined with the routing weights. TPU and GPU run
ragged_dot as a grouped matmul; XLA:CPU (jax 0.10) expands it into a product masked per group, E times
the work: exact, not fast. The experts' leading axis is the logical axis `expert` (sharding.RULES:
expert parallelism). `dense_experts` runs every expert on every token and masks by the routing weights:
E/k times the work, the reference for tests, and on the CPU the faster of the two (ragged_dot there
costs k dense FFNs, this one, one): `impl="auto"`, the default, picks it on the CPU backend and
ragged_dot elsewhere (measured on XLA:CPU, N=2048, D=576, 8 experts of 192: top-2 1.14 s ragged vs
0.85 s dense, top-6 3.07 s vs 0.84 s).

Routing is recorded with `sow` in the "intermediates" collection (a no-op unless `apply` is given
`mutable=["intermediates"]`; decoder.forward_routing does that) under the layer's mlp:
    expert_ids      [..., k] int32  the experts each token used, best first
    expert_weights  [..., k] f32    their combine weights
    router_probs    [..., E] f32    softmax of the router logits over all experts
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import layers as L
from m2r2_jax.model.declare import Adapters, declare
from m2r2_jax.model.mlp import DenseMLP

IMPLS = ("auto", "ragged", "dense")


def route(cfg: ModelConfig, logits: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [N, E] (f32) -> (expert ids [N, k] int32, combine weights [N, k] f32, probs [N, E])."""
    k = cfg.experts_per_token
    probs = jax.nn.softmax(logits, axis=-1)
    if cfg.router in ("topk_softmax", "topk_unit"):
        top, ids = lax.top_k(logits, k)
        if cfg.router == "topk_unit":  # a MoEfied dense FFN: a chosen expert's slice counts in full
            return ids, jnp.ones_like(top), probs
        return ids, jax.nn.softmax(top, axis=-1), probs
    w, ids = lax.top_k(probs, k)
    if cfg.norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return ids, w, probs


def _grouped(x: jax.Array, w: jax.Array, sizes: jax.Array, mm) -> jax.Array:
    """Rows of x [M, a] grouped by expert (`sizes` [E] rows each, in expert order) times w [E, a, b]."""
    if mm is None:
        return lax.ragged_dot(x, w.astype(x.dtype), sizes)
    return lax.ragged_dot(x.astype(mm), w.astype(mm), sizes, preferred_element_type=jnp.float32).astype(x.dtype)


def ragged_experts(x, ids, weights, gate, up, down, mm=None) -> jax.Array:
    """x [N, D]; ids / weights [N, k] -> [N, D] f32: sum_j weights[n, j] * expert_{ids[n, j]}(x[n])."""
    N, k = ids.shape
    E = gate.shape[0]
    flat = ids.reshape(-1)  # the expert of (token n, slot j) at n * k + j
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert, in token order within a group
    sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
    xs = jnp.take(x, order // k, axis=0)  # [N*k, D]
    h = jax.nn.silu(_grouped(xs, gate, sizes, mm)) * _grouped(xs, up, sizes, mm)
    ys = _grouped(h, down, sizes, mm)  # [N*k, D], sorted order
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(N, k, -1)  # back to (token, slot) order
    return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights.astype(jnp.float32))


def _einsum(spec: str, a, b, mm):
    if mm is None:
        return jnp.einsum(spec, a, b.astype(a.dtype))
    return jnp.einsum(spec, a.astype(mm), b.astype(mm), preferred_element_type=jnp.float32).astype(a.dtype)


def dense_experts(x, ids, weights, gate, up, down, mm=None) -> jax.Array:
    """The reference for `ragged_experts`: every expert on every token, weighted by the routing weights
    scattered into [N, E] (zero for the experts a token did not pick)."""
    N, E = x.shape[0], gate.shape[0]
    comb = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], ids].add(weights.astype(jnp.float32))
    h = jax.nn.silu(_einsum("nd,edf->enf", x, gate, mm)) * _einsum("nd,edf->enf", x, up, mm)
    y = _einsum("enf,efd->end", h, down, mm)
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), comb)


class MoEMLP(nn.Module):
    """The sparse MLP. `impl`: "ragged" (ragged_dot over expert-sorted tokens), "dense" (every expert on
    every token, masked) or "auto" (dense on the CPU backend, ragged elsewhere: see the module doc)."""

    cfg: ModelConfig
    impl: str = "auto"

    @nn.compact
    def __call__(self, x, adapters: Adapters | None = None):
        c = self.cfg
        if adapters and any(t in adapters for t in ("gate", "up", "down")):
            raise M2R2Error("accelerator adapters on gate / up / down are not implemented for an MoE MLP")
        if self.impl not in IMPLS:
            raise M2R2Error(f"MoEMLP impl {self.impl!r}: expected one of {', '.join(IMPLS)}")
        D, E, F, k = c.hidden_size, c.num_experts, c.moe_intermediate_size, c.experts_per_token
        dt, mm = c.jnp_param_dtype, c.mm_dtype
        router = declare(self, "router", (D, E), ("embed", "expert"), dt)
        gate = declare(self, "gate", (E, D, F), ("expert", "embed", "expert_mlp"), dt)
        up = declare(self, "up", (E, D, F), ("expert", "embed", "expert_mlp"), dt)
        down = declare(self, "down", (E, F, D), ("expert", "expert_mlp", "embed"), dt)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, D)
        # the router's product in the activations' dtype, its softmax in f32 (as HF's routers do)
        ids, weights, probs = route(c, L.matmul(x2, router, mm).astype(jnp.float32))
        self.sow("intermediates", "expert_ids", ids.reshape(lead + (k,)))
        self.sow("intermediates", "expert_weights", weights.reshape(lead + (k,)))
        self.sow("intermediates", "router_probs", probs.reshape(lead + (E,)))
        impl = self.impl if self.impl != "auto" else "dense" if jax.default_backend() == "cpu" else "ragged"
        experts = ragged_experts if impl == "ragged" else dense_experts
        y = experts(x2, ids, weights, gate, up, down, mm).astype(x.dtype)
        if c.shared_expert_intermediate_size:
            shared = DenseMLP(c, features=c.shared_expert_intermediate_size, name="shared")(x2)
            g = L.matmul(x2, declare(self, "shared_gate", (D, 1), ("embed", None), dt), mm)
            y = y + jax.nn.sigmoid(g) * shared
        return y.reshape(lead + (D,))
