"""How every Flax module of the model declares a param: with its logical axes (mapped onto a mesh by
`sharding.RULES`), and tolerant of the CPU kernels' packed decode-time weights. Its own module so
that the layer modules (modules.py), the MLPs (mlp.py, moe.py) and the M2R2 / peer modules share it
without importing each other."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp

from m2r2_jax.errors import M2R2Error

INIT_STD = 0.02  # random init of a fresh model (tests, tiny configs)

Adapters = Mapping[str, Callable]  # projection name (q k v o gate up down) -> delta(x2d, mm)


def declare(mod: nn.Module, name: str, shape, axes, dtype=jnp.float32, init=None):
    """A param with its logical axes. At decode time a matmul weight may arrive in the CPU kernels'
    packed layout (`kernels.PackedWeight`, the same [in, out] matrix as 64-column panels), which
    linen's own shape check cannot read: an existing value is checked here by its logical shape."""
    shape = tuple(int(s) for s in shape)
    if not mod.is_initializing() and mod.has_variable("params", name):
        w = mod.get_variable("params", name)
        if tuple(w.shape) != shape:
            raise M2R2Error(f"param {mod.path}/{name}: shape {tuple(w.shape)}, expected {shape}")
        return w
    init = init or nn.initializers.normal(INIT_STD)
    return mod.param(name, nn.with_logical_partitioning(init, tuple(axes)), shape, dtype)


def ones(mod, name, shape, axes, dtype=jnp.float32):
    return declare(mod, name, shape, axes, dtype, nn.initializers.ones)


def zeros(mod, name, shape, axes, dtype=jnp.float32):
    return declare(mod, name, shape, axes, dtype, nn.initializers.zeros)
