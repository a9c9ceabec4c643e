"""Mesh construction, the one logical-axis rule table, and multi-host start.

Every array in the project names its dimensions with logical axes (see
model/params.py and decoder.CACHE_AXES); `RULES` maps them onto mesh axes.
A dimension that a mesh axis does not divide evenly stays replicated (e.g. 9
heads on a 4-way tensor axis) — correct everywhere, just less sharded.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from m2r2_jax.errors import M2R2Error

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated)
RULES: dict[str, Any] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": None,
    "act_embed": None,
    # weights
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    # MoE experts: expert parallelism, each tensor-axis device holds whole experts (E / tp of them). An
    # expert's own hidden axis then stays whole: a mesh axis may appear once in a spec, and splitting
    # both would shard one expert over devices that also split the experts.
    "expert": "tensor",
    "expert_mlp": None,
    "norm": None,
    "rank": None,  # low-rank adapter dimension
    "router": None,
    # KV cache
    "cache_batch": ("data", "fsdp"),
    "cache_heads": "tensor",
    "cache_seq": None,
    "head_dim": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices left over
    fsdp: int = 1
    tensor: int = 1
    # multi-host: set coordinator to call jax.distributed.initialize
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise M2R2Error(f"mesh.{name} must be an integer >= 1 (or -1 = all devices left), got {v!r}")


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Multi-host start: from the mesh config's coordinator fields (local multi-process runs), or with
    M2R2_DISTRIBUTED=1 from the environment (TPU VMs and SLURM set what `jax.distributed.initialize` reads).
    Runs before anything touches a JAX backend."""
    if jax.distributed.is_initialized():  # the caller started it already (e.g. before building its mesh)
        return
    if cfg.coordinator_address or os.environ.get("M2R2_DISTRIBUTED") == "1":
        kw = {}
        if cfg.coordinator_address:
            kw = dict(
                coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
            )
        # CPU devices of different processes talk over gloo (no effect on TPU/GPU collectives)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kw)


def make_mesh(cfg: MeshConfig | None = None, devices: Sequence | None = None) -> Mesh:
    cfg = cfg or MeshConfig()
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise M2R2Error("mesh: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise M2R2Error(f"mesh: {n} devices are not divisible by fsdp*tensor={known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) > n:
        raise M2R2Error(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {math.prod(sizes)} devices, have {n}"
        )
    # an explicit smaller mesh uses the first devices (e.g. data=1 on a forced 8-device host)
    return Mesh(np.asarray(devices[: math.prod(sizes)]).reshape(sizes), MESH_AXES)


def _mesh_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    if isinstance(axis, tuple):
        return math.prod(mesh.shape[a] for a in axis)
    return mesh.shape[axis]


def logical_to_pspec(axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh) -> P:
    out, used = [], set()
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in RULES:
            raise M2R2Error(f"no sharding rule for logical axis {name!r}")
        phys = RULES[name]
        if isinstance(phys, tuple):  # drop axes of size 1 and ones already used
            phys = tuple(a for a in phys if mesh.shape[a] > 1 and a not in used) or None
            if phys is not None and len(phys) == 1:
                phys = phys[0]
        elif phys is not None and (mesh.shape[phys] == 1 or phys in used):
            phys = None
        if phys is not None and shape is not None and shape[i] % _mesh_size(mesh, phys):
            phys = None  # uneven: replicate this dimension
        if phys is not None:
            used.update(phys if isinstance(phys, tuple) else (phys,))
        out.append(phys)
    return P(*out)


def named_sharding(mesh: Mesh, axes, shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_pspec(axes, shape, mesh))


def tree_shardings(mesh: Mesh, axes_tree, shapes_tree) -> Any:
    """Shardings for a tree given matching trees of logical axes and shapes (or arrays)."""
    is_axes = lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)
    flat_axes, treedef = jax.tree.flatten(axes_tree, is_leaf=is_axes)
    flat_shapes = treedef.flatten_up_to(shapes_tree)
    return jax.tree.unflatten(
        treedef, [named_sharding(mesh, a, getattr(s, "shape", s)) for a, s in zip(flat_axes, flat_shapes)]
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
