"""The compute backend, decided in one place: XLA's own ops, or the project's CPU kernels.

A `Backend` is a static setting (hashable, part of every jitted decode function's closure):

  xla          XLA's dot and attention everywhere (any device, any dtype, any mesh).
  cpu_kernels  decoding's matmuls and attention through `m2r2_jax.kernels` (XLA FFI): weights packed
               once as 64-column panels, a block attention over the cache prefix + the block's own
               K/V. CPU backend, float32, one device.

`resolve` picks the backend for a model (the `--cpu-kernel auto|on|off` flag); `Backend.prepare`
lays the params out for it (packs the matmul weights). After that, the only weight-type dispatch is
inside `model.layers.matmul` / `rows_logits`, and the only attention dispatch is `Backend.kernels`
read by the attention contexts (model/attention.py).
"""

from __future__ import annotations

import dataclasses

from m2r2_jax.errors import M2R2Error

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str = "xla"  # xla | cpu_kernels

    def __post_init__(self):
        if self.name not in ("xla", "cpu_kernels"):
            raise M2R2Error(f"unknown backend {self.name!r}: expected xla or cpu_kernels")

    @property
    def kernels(self) -> bool:
        return self.name == "cpu_kernels"

    def prepare(self, cfg, params: dict) -> dict:
        """The params decoding reads on this backend: packed for the kernels, else as they are."""
        if not self.kernels:
            return params
        from m2r2_jax import kernels as K

        return params if K.is_packed(params) else K.pack_decode_params(cfg, params)


XLA = Backend("xla")
CPU_KERNELS = Backend("cpu_kernels")


def resolve(cfg, mode: str = "auto", mesh=None) -> Backend:
    """`auto`: the CPU kernels where they apply (CPU backend, float32, no mesh, kernels built), else
    XLA; `on`: the kernels or a one-line error saying why not; `off`: XLA."""
    if mode not in MODES:
        raise M2R2Error(f"--cpu-kernel {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "off":
        return XLA
    from m2r2_jax import kernels as K

    why = K.why_not(cfg, mesh)
    if why is None:
        return CPU_KERNELS
    if mode == "on":
        raise M2R2Error(f"--cpu-kernel on: {why}")
    return XLA
