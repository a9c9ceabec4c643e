"""The compute backend, decided in one place: XLA's own ops, or the project's CPU kernels.

A `Backend` is a static setting (hashable, part of every jitted decode function's closure):

  xla          XLA's dot and attention everywhere (any device, any dtype, any mesh).
  cpu_kernels  decoding's matmuls and attention through `m2r2_jax.kernels` (XLA FFI): weights packed
               once as 64-column panels, a block attention over the cache prefix + the block's own
               K/V. CPU backend, float32, one device.
  pallas       XLA's matmuls, and the attention of a block over the cache prefix + its own K/V (a
               draft tree's verification, a decode step) as a Pallas kernel (kernels/pallas_attention):
               TPU; with `interpret=True` it runs anywhere (tests on the CPU).

`resolve` picks the backend for a model (the `--cpu-kernel auto|on|off` flag); `Backend.prepare`
lays the params out for it (packs the matmul weights). After that, the only weight-type dispatch is
inside `model.layers.matmul` / `rows_logits`, and the only attention dispatch is `Backend.kernels`
read by the attention contexts (model/attention.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from m2r2_jax.errors import M2R2Error

MODES = ("auto", "on", "off")


NAMES = ("xla", "cpu_kernels", "pallas")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str = "xla"  # xla | cpu_kernels | pallas
    interpret: bool = False  # pallas: run the kernel in interpret mode (any device; for tests)
    mesh: Any = None  # pallas: the mesh decoding runs over (the kernel is mapped over its shards)

    def __post_init__(self):
        if self.name not in NAMES:
            raise M2R2Error(f"unknown backend {self.name!r}: expected one of {', '.join(NAMES)}")

    @property
    def kernels(self) -> bool:
        """The CPU kernels: packed matmul weights and their block attention."""
        return self.name == "cpu_kernels"

    @property
    def block_attention(self):
        """The attention of a block over a cache prefix + its own K/V under a local mask
        (q, k_cache, v_cache, prefix_len, k_local, v_local, local_mask) -> [B, T, H*hd], or None for XLA's."""
        if self.name == "cpu_kernels":
            from m2r2_jax import kernels as K

            return K.block_attention
        if self.name == "pallas":
            import functools

            from m2r2_jax.kernels.pallas_attention import sharded_tree_attention, tree_attention

            if self.mesh is not None and self.mesh.size > 1:
                return sharded_tree_attention(self.mesh, self.interpret)
            return functools.partial(tree_attention, interpret=self.interpret)
        return None

    def prepare(self, cfg, params: dict) -> dict:
        """The params decoding reads on this backend: packed for the kernels, else as they are."""
        if not self.kernels:
            return params
        from m2r2_jax import kernels as K

        return params if K.is_packed(params) else K.pack_decode_params(cfg, params)


XLA = Backend("xla")
CPU_KERNELS = Backend("cpu_kernels")
PALLAS = Backend("pallas")


def resolve(cfg, mode: str = "auto", mesh=None) -> Backend:
    """`auto`: on TPU the Pallas attention; on the CPU the CPU kernels where they apply (float32, no
    mesh, kernels built) and pay (an AVX-512 CPU: `kernels.preferred`);
    else XLA. `on`: the CPU kernels or a one-line error saying why not; `off`: XLA."""
    if mode not in MODES:
        raise M2R2Error(f"--cpu-kernel {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return XLA
    import jax

    if mode == "auto" and jax.default_backend() == "tpu":
        return Backend("pallas", mesh=mesh)
    from m2r2_jax import kernels as K

    why = K.why_not(cfg, mesh)
    if why is None and (mode == "on" or K.preferred()):
        return CPU_KERNELS
    if mode == "on":
        raise M2R2Error(f"--cpu-kernel on: {why}")
    return XLA
