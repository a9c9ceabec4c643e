"""Ahead-of-time compilation for a device topology we do not have: lower and compile the project's
programs (the M2R2 train step, prefill, the AR decode loop, the speculative decode loop) for a TPU
slice described by `jax.experimental.topologies.get_topology_desc`, with abstract (shape-only) params
sharded over a mesh of that slice's devices, and read back what the compiler says: per-device memory,
FLOPs, bytes accessed and the collectives in the compiled HLO.

Nothing runs and no weights are needed: every argument is a `jax.ShapeDtypeStruct` carrying its
`NamedSharding`. On a machine without a TPU this needs libtpu (the `tpu` extra: `jax[tpu]` matched to
the pinned jax).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error

# HBM per chip, bytes (public specs)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
PROGRAMS = ("train", "prefill", "decode", "speculative")


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology such as "v5e:2x2" or "v4:2x2x2", for compilation only."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server: this is not a TPU VM
    try:
        from jax.experimental.topologies import get_topology_desc

        # v4 chips have two TensorCores; JAX uses them as one device per chip (megacore), as on a v4 VM
        kw = {"chip_config_name": "megacore"} if topology.lower().startswith("v4") else {}
        desc = get_topology_desc(platform="tpu", topology_name=topology, **kw)
    except Exception as e:  # noqa: BLE001 - libtpu missing, unknown topology name, ...
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise M2R2Error(
            f"cannot describe TPU topology {topology!r} (is libtpu installed? `pip install -e '.[tpu]'`): {msg}"
        ) from None
    return list(desc.devices)


def hbm_bytes(topology: str) -> int:
    """HBM per chip of a topology's TPU generation (the roofline's chip table)."""
    from m2r2_jax.roofline import ALIASES, CHIPS

    kind = topology.split(":")[0].lower()
    kind = ALIASES.get(kind, kind)
    if kind not in CHIPS or CHIPS[kind].topology is None:
        known = ", ".join(k for k, c in CHIPS.items() if c.topology)
        raise M2R2Error(f"unknown TPU generation {kind!r} in {topology!r}; known: {known}")
    return CHIPS[kind].hbm_bytes


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective ops in compiled HLO text (async start/done pairs counted once)."""
    out = {}
    for name in COLLECTIVES:
        n = len(re.findall(rf"\b{name}(?:-start)?\(", hlo))
        if n:
            out[name] = n
    return out


@dataclasses.dataclass
class ProgramReport:
    fits: bool
    per_device_bytes: int
    hbm_bytes: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compile_report(fn: Callable, args: tuple, hbm: int, **jit_kw) -> ProgramReport:
    compiled = jax.jit(fn, **jit_kw).lower(*args).compile()
    mem = compiled.memory_analysis()
    arg, out, tmp, alias = (
        int(getattr(mem, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "temp", "alias")
    )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    per_dev = arg + out + tmp - alias
    return ProgramReport(
        per_dev <= hbm,
        per_dev,
        hbm,
        arg,
        out,
        tmp,
        alias,
        float(cost.get("flops", 0.0)),
        float(cost.get("bytes accessed", 0.0)),
        count_collectives(compiled.as_text()),
    )


def abstract_model(cfg: ModelConfig, mesh) -> Any:
    """The model's params as sharded shape-only arrays."""
    from m2r2_jax.model.params import abstract_params, logical_axes, model_spec
    from m2r2_jax.sharding import tree_shardings

    spec = model_spec(cfg)
    ab = abstract_params(spec)
    return _abstract(ab, tree_shardings(mesh, logical_axes(spec), ab))


def programs(
    cfg: ModelConfig,
    mc,
    mesh,
    batch: int,
    seq_len: int,
    prompt_len: int,
    max_new: int,
    tree: str = "star4",
    backend: Backend = XLA,
) -> dict[str, Callable[[], tuple]]:
    """name -> a thunk returning (fn, args, jit kwargs) for each program, built lazily. `backend`: the
    decode loops' attention (`PALLAS`: the Pallas tree attention, compiled for the TPU)."""
    from m2r2_jax.sharding import named_sharding, replicated

    rep = replicated(mesh)
    base = abstract_model(cfg, mesh)

    def train():
        import optax

        from m2r2_jax.m2r2.params import init_m2r2
        from m2r2_jax.training.config import TrainConfig
        from m2r2_jax.training.step import make_optimizer, make_train_step, train_shardings

        m2 = jax.eval_shape(lambda: init_m2r2(cfg, mc, jax.random.key(0)))
        sh = train_shardings(mesh, cfg, mc, base, m2, (batch, seq_len))
        opt = make_optimizer(TrainConfig(m2r2=mc, seq_len=seq_len, batch_size=batch))
        m2a = _abstract(m2, sh["m2r2"])
        opt_abs = jax.eval_shape(opt.init, m2a)
        opt_sh = jax.tree.map(lambda x: getattr(x, "sharding", None) or rep, opt_abs)
        opt_abs = _abstract(opt_abs, opt_sh)
        del optax
        step = make_train_step(cfg, mc, opt, sh, opt_sh)
        tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sh["batch"])
        mask = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32, sharding=sh["batch"])
        n_draft = mc.draft_vocab or cfg.vocab_size
        ids = jax.ShapeDtypeStruct((n_draft,), jnp.int32, sharding=rep)
        return step, (m2a, opt_abs, base, tok, mask, ids), {}

    def prefill():
        from m2r2_jax.decoding.generate import prefill as pf
        from m2r2_jax.model import decoder as D

        S = prompt_len + max_new

        def fn(p, t, lengths):
            return pf(cfg, p, t, lengths, D.init_cache(cfg, batch, S))

        tok = jax.ShapeDtypeStruct(
            (batch, prompt_len), jnp.int32, sharding=named_sharding(mesh, ("batch", "seq"), (batch, prompt_len))
        )
        ln = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=named_sharding(mesh, ("batch",), (batch,)))
        return fn, (base, tok, ln), {}

    def _loop_args():
        tok = jax.ShapeDtypeStruct(
            (batch, prompt_len), jnp.int32, sharding=named_sharding(mesh, ("batch", "seq"), (batch, prompt_len))
        )
        ln = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=named_sharding(mesh, ("batch",), (batch,)))
        scalars = (
            jax.ShapeDtypeStruct((1,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
        )
        return tok, ln, scalars

    def decode():
        from m2r2_jax.decoding.generate import generate_fn, round_cache

        tok, ln, sc = _loop_args()
        fn = generate_fn(cfg, True, max_new, round_cache(prompt_len + max_new), backend=backend)
        return fn, (base, tok, ln) + sc, {}

    def speculative():
        from m2r2_jax.decoding.drafters import DraftOptions
        from m2r2_jax.decoding.generate import round_cache
        from m2r2_jax.decoding.speculative import speculative_fn

        drafter = DraftOptions(tree=tree, lookup=4).drafter(cfg, mc, backend)
        dparams = abstract_draft_params(cfg, mc, mesh, base)
        tok, ln, sc = _loop_args()
        S_ = round_cache(prompt_len + max_new + drafter.block_size + 1)
        fn = speculative_fn(cfg, drafter, True, False, max_new, S_, backend)
        return fn, (base, dparams, tok, ln) + sc, {}

    return {"train": train, "prefill": prefill, "decode": decode, "speculative": speculative}


def abstract_draft_params(cfg: ModelConfig, mc, mesh, base) -> dict:
    """The drafter's prepared params (merged fast layers, final norm, draft head, draft ids) as sharded
    shape-only arrays, laid out as the base layers they are merged from."""
    from m2r2_jax.m2r2 import stream as S
    from m2r2_jax.m2r2.params import init_m2r2
    from m2r2_jax.model.params import logical_axes, model_spec
    from m2r2_jax.sharding import named_sharding, replicated, tree_shardings

    rep = replicated(mesh)
    n_draft = mc.draft_vocab or cfg.vocab_size
    m2 = jax.eval_shape(lambda: init_m2r2(cfg, mc, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((n_draft,), jnp.int32, sharding=rep)
    dp = jax.eval_shape(lambda b, m, d: S.draft_params(cfg, mc, b, m, d), base, m2, ids)
    layer_axes = logical_axes(model_spec(cfg))["layers"][0]
    dp_sh = {
        "layers": [tree_shardings(mesh, layer_axes, lp) for lp in dp["layers"]],
        "final_norm": named_sharding(mesh, ("norm",), dp["final_norm"].shape),
        "head": named_sharding(mesh, ("vocab", "embed"), dp["head"].shape),
    }
    return {"dp": _abstract(dp, dp_sh), "draft_ids": ids}


STEPS = ("ar", "verify", "draft")


def step_programs(
    cfg: ModelConfig,
    mc,
    mesh,
    tree: str = "star4",
    lookup: int = 4,
    cache_len: int = 512,
    fill: int = 256,
    batch: int = 1,
    backend: Backend = XLA,
) -> dict[str, Callable[[], tuple]]:
    """The three pieces a speculative step is made of, each alone, as in
    `SpeculativeDecoder.cost_breakdown`: one AR decode step (a one-token forward over a cache filled to
    `fill`), one block verification (the drafter's Tv nodes under their tree mask) and one M2R2 draft
    (the whole static tree: one fast-stream pass per tree depth). name -> thunk -> (fn, args, jit kw)."""
    from m2r2_jax.decoding.drafters import DraftOptions
    from m2r2_jax.decoding.state import DraftView
    from m2r2_jax.decoding.verify import TreeTables, verify
    from m2r2_jax.model import decoder as D
    from m2r2_jax.sharding import named_sharding, replicated

    rep = replicated(mesh)
    base = abstract_model(cfg, mesh)
    drafter = DraftOptions(tree=tree, lookup=lookup).drafter(cfg, mc, backend)
    tt = TreeTables.of(drafter.trees, drafter.block_size)
    cache = jax.eval_shape(lambda: D.init_cache(cfg, batch, cache_len))
    cache_sh = jax.tree.map(
        lambda x: (
            named_sharding(mesh, ("cache_batch", "cache_heads", "cache_seq", None), x.shape) if x.ndim == 4 else rep
        ),
        cache,
    )
    cache = _abstract(cache, cache_sh)
    pos = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rep)

    def toks(n):
        return jax.ShapeDtypeStruct((batch, n), jnp.int32, sharding=rep)

    def ar():
        def fn(b, t, c, p):
            return D.forward(cfg, b, t, c, p, backend=backend)

        return fn, (base, toks(1), cache, pos), {"donate_argnums": 2}

    def verify_block():
        def fn(b, t, c, p):
            return verify(cfg, backend, b, tt, 0, t, c, p)

        return fn, (base, toks(tt.block), cache, pos), {"donate_argnums": 2}

    def draft():
        first = getattr(drafter, "m2r2", drafter)
        dparams = abstract_draft_params(cfg, mc, mesh, base)

        def fn(b, q, c, p, cur):
            view = DraftView(
                cache=c,
                pos=p,
                cur=cur,
                text=jnp.zeros((batch, fill + 64), jnp.int32),
                text_len=p,
                active=jnp.ones((batch,), bool),
            )
            return first.propose(q, b, view).tokens

        return fn, (base, dparams, cache, pos, pos), {}

    return {
        "ar": ar,
        "verify": verify_block,
        "draft": draft,
        "_block": tt.block,
        "_depth": max(t.max_depth for t in getattr(drafter, "m2r2", drafter).trees),  # fast-stream passes
    }


def mesh_for(devices: list, spec: str | None):
    from m2r2_jax.config import apply_overrides
    from m2r2_jax.sharding import MeshConfig, make_mesh

    cfg = apply_overrides(MeshConfig(), [s for s in (spec or "").split(",") if s])
    return make_mesh(cfg, devices)


def np_bytes(x) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
