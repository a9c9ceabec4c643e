"""The compute side of the expert-offload sim (moe_offload.py): per decode step, the time of each MoE
layer, of the rest of the token and of the fast stream, either measured on this CPU while recording
the traces or projected for an accelerator by a roofline model of the decoder's shape (`ModelShape`,
which a trace file keeps, so a replay needs no model)."""

from __future__ import annotations

import dataclasses

from m2r2_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Times:
    """Per decode step: layer_ms[l] = MoE layer l's experts' FFN + everything up to the next MoE
    layer's router; token_ms = the rest (embedding, the first layer's attention, head); fast_ms = the
    fast stream and its predictions (charged to m2r2_aot only)."""

    source: str
    layer_ms: tuple[float, ...]
    token_ms: float
    fast_ms: float

    def as_dict(self) -> dict:
        return dict(
            source=self.source,
            layer_ms=list(self.layer_ms),
            token_ms=self.token_ms,
            fast_ms=self.fast_ms,
            per_token_ms=sum(self.layer_ms) + self.token_ms,
        )


def measured_times(ms: dict) -> Times:
    """`ms`: Collected.ms (mean per decode step: begin, fast, layer [L], finish)."""
    return Times(
        "measured on this CPU (float32, host-driven pieces, RAM-resident experts)",
        tuple(ms["layer"]),
        ms["begin"] + ms["finish"],
        ms["fast"],
    )


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the projected compute needs of a decoder: its config, its MoE layers (decoder indices), and
    the fast stream's config and layer count (None, 0 without one)."""

    cfg: ModelConfig
    moe: tuple[int, ...]
    fast_cfg: ModelConfig | None
    fast_layers: int

    @classmethod
    def of(cls, dec) -> ModelShape:
        """From an moe_decode.MoEDecoder."""
        f = dec.fast
        return cls(dec.cfg, tuple(dec.moe), None if f is None else f.cfg, 0 if f is None else len(f.layers))


def projected_times(shape, chip_name: str, context: float, b: int, launch_us: float = 0.0) -> Times:
    """A roofline model of each piece on `chip_name` at `b` bytes per weight and KV element: per piece
    max(FLOPs / peak, bytes / HBM bandwidth), pieces summed; plus `launch_us` per decoder layer (slow
    or fast) and one for the head: the fixed cost of launching a layer's kernels and, with experts
    offloaded, the host learning its router's choice. An assumption, stated with the results.
    `shape`: a ModelShape or an moe_decode.MoEDecoder."""
    from m2r2_jax.roofline import CHIPS, step_ms

    if not isinstance(shape, ModelShape):
        shape = ModelShape.of(shape)
    chip, cfg = CHIPS[chip_name], shape.cfg
    o = launch_us / 1e3
    Dm, q, kv, hd = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.head_dim

    def t(params: float, extra_flops: float = 0.0, extra_bytes: float = 0.0) -> float:
        return step_ms(2 * params + extra_flops, params * b + extra_bytes, chip)["ms"]

    def attention(c) -> float:  # projections + scores / values over the context; K/V read and one slot written
        return t(Dm * (q + 2 * kv) + q * Dm, 4 * c.num_heads * hd * context, 2 * kv * (context + 1) * b)

    router = Dm * cfg.num_experts
    experts = cfg.experts_per_token * 3 * Dm * cfg.moe_intermediate_size + 3 * Dm * cfg.shared_expert_intermediate_size
    moe = shape.moe
    layer = []
    for l, i in enumerate(moe):  # every decoder layer's launch is counted once: where its attention runs
        nxt = moe[l + 1] if l + 1 < len(moe) else cfg.num_layers
        dense = sum(attention(cfg) + t(3 * Dm * cfg.intermediate_size) for _ in range(i + 1, nxt))
        started = nxt - i if l + 1 < len(moe) else nxt - i - 1
        layer.append(t(experts) + dense + (attention(cfg) + t(router) if l + 1 < len(moe) else 0.0) + o * started)
    head = t(cfg.vocab_size * Dm)
    lead = sum(attention(cfg) + t(3 * Dm * cfg.intermediate_size) for _ in range(moe[0]))
    token = t(0, 0, Dm * b) + lead + attention(cfg) + t(router) + head + o * (moe[0] + 2)
    fast = 0.0
    if shape.fast_cfg is not None:
        fc = shape.fast_cfg
        fast = sum(attention(fc) + t(3 * Dm * fc.intermediate_size) for _ in range(shape.fast_layers))
        fast += t(len(moe) * router) + o * shape.fast_layers
    over = f"+ {launch_us:g} us per layer launched (assumed)" if launch_us else "no launch or host overhead"
    return Times(
        f"projected: roofline model of {chip.name} ({b}-byte weights and KV; {over}; not measured)",
        tuple(layer),
        token,
        fast,
    )
