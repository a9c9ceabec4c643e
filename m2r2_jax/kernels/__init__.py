"""A CPU kernel for decoding's small-row matmuls, reached through the XLA FFI.

Decoding multiplies 1..8 rows by each weight matrix; on XLA:CPU a product of
two or more rows repacks the weight on every call, so verifying T tokens costs
far more than one plain step even though the weights are read once either way.
`pack_decode_params` lays every matmul weight out once as 64-column panels
(`PackedWeight`) and `layers.matmul` sends products with a packed weight to
`cpu_matmul.cc`, which streams each panel once for all rows (bit-identical per
row whatever the number of rows, see the source).

The kernel is compiled with the system C++ compiler on first use (cached under
`$M2R2_KERNEL_CACHE`, default `~/.cache/m2r2_jax/kernels`). Where it cannot be
built, or off the CPU backend, nothing is packed and XLA's dot is used.
`M2R2_CPU_KERNEL=0` turns it off.

`packed_argmax` is the same product reduced to each row's argmax on the fly (a greedy verification's
LM head: the M x V logits are never written).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from m2r2_jax.errors import M2R2Error

PANEL = 64
HEAD_DIMS = (16, 32, 64, 128)  # block_attention's specialisations
TARGETS = {
    "m2r2_packed_matmul": "M2R2PackedMatmul",
    "m2r2_packed_argmax": "M2R2PackedArgmax",
    "m2r2_block_attention": "M2R2BlockAttention",
}
_SRC = Path(__file__).with_name("cpu_matmul.cc")
_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A [D, N] matmul weight stored as panels [ceil(N/64), D, 64] (zero-padded columns)."""

    data: jax.Array
    n: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[1], self.n)

    @property
    def dtype(self):
        return self.data.dtype


def pack(w: jax.Array) -> PackedWeight:
    """[D, N] -> PackedWeight (float32)."""
    D, N = w.shape
    P = -(-N // PANEL)
    w = jnp.asarray(w, jnp.float32)
    if P * PANEL != N:
        w = jnp.pad(w, ((0, 0), (0, P * PANEL - N)))
    return PackedWeight(w.reshape(D, P, PANEL).transpose(1, 0, 2), N)


def pack_rows(w: jax.Array) -> PackedWeight:
    """A row-major head [V, D] (x @ w.T, e.g. a tied embedding) -> PackedWeight of w.T."""
    return pack(jnp.asarray(w).T)


def unpack(pw: PackedWeight) -> jax.Array:
    P, D, _ = pw.data.shape
    return pw.data.transpose(1, 0, 2).reshape(D, P * PANEL)[:, : pw.n]


def add_dense(pw: PackedWeight, delta: jax.Array) -> PackedWeight:
    """pw + delta ([D, N] dense), in the packed layout."""
    return PackedWeight(pw.data + pack(delta).data, pw.n)


def scale_columns(pw: PackedWeight, g: jax.Array) -> PackedWeight:
    """pw * g[None, :] (g [N]), in the packed layout."""
    P = pw.data.shape[0]
    g = jnp.pad(jnp.asarray(g, jnp.float32), (0, P * PANEL - pw.n)).reshape(P, 1, PANEL)
    return PackedWeight(pw.data * g, pw.n)


def packed_matmul(x: jax.Array, pw: PackedWeight) -> jax.Array:
    """x [..., D] @ the packed weight -> [..., N] float32 (inputs cast to float32)."""
    lead, D = x.shape[:-1], x.shape[-1]
    if D != pw.data.shape[1]:
        raise M2R2Error(f"packed matmul: x has {D} features, the weight {pw.data.shape[1]}")
    _require()
    x2 = x.reshape(-1, D).astype(jnp.float32)
    P = pw.data.shape[0]
    y = jax.ffi.ffi_call("m2r2_packed_matmul", jax.ShapeDtypeStruct((x2.shape[0], P * PANEL), jnp.float32))(x2, pw.data)
    if P * PANEL != pw.n:
        y = y[:, : pw.n]
    return y.reshape(lead + (pw.n,))


def packed_argmax(x: jax.Array, pw: PackedWeight) -> jax.Array:
    """argmax(x @ pw, -1) -> [...] int32, without the [..., N] products: each 64-column panel is reduced as
    it is computed. Equal to jnp.argmax(packed_matmul(x, pw), -1) (the same products bit for bit; ties to
    the lowest index, a NaN wins), so a greedy verification can skip the [T, V] float32 logits."""
    lead, D = x.shape[:-1], x.shape[-1]
    if D != pw.data.shape[1]:
        raise M2R2Error(f"packed argmax: x has {D} features, the weight {pw.data.shape[1]}")
    _require()
    x2 = x.reshape(-1, D).astype(jnp.float32)
    call = jax.ffi.ffi_call("m2r2_packed_argmax", jax.ShapeDtypeStruct((x2.shape[0],), jnp.int32))
    return call(x2, pw.data, n=np.int64(pw.n)).reshape(lead)


def block_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    prefix_len: jax.Array,
    k_local: jax.Array,
    v_local: jax.Array,
    local_mask: jax.Array,
) -> jax.Array:
    """Attention of T queries per row over the first prefix_len[b] cache slots and a local K/V set.

    q [B, T, H, hd]; k_cache, v_cache [B, KV, S, hd]; prefix_len [B]; k_local, v_local [B, KV, L, hd];
    local_mask [T, L] (query t sees local key j). -> [B, T, H * hd] float32. Keys are taken in order
    (prefix, then local) and each query is computed alone, so a query's result does not depend on how
    many others share the call (one-token decode and a T-token verification agree bit for bit)."""
    _require()
    B, T, H, hd = q.shape
    f32 = jnp.float32
    out = jax.ffi.ffi_call("m2r2_block_attention", jax.ShapeDtypeStruct((B, T, H, hd), f32))(
        q.astype(f32),
        k_cache.astype(f32),
        v_cache.astype(f32),
        prefix_len.astype(jnp.int32),
        k_local.astype(f32),
        v_local.astype(f32),
        jnp.asarray(local_mask).astype(jnp.int8),
    )
    return out.reshape(B, T, H * hd)


def _cache_dir() -> Path:
    return Path(os.environ.get("M2R2_KERNEL_CACHE", Path.home() / ".cache" / "m2r2_jax" / "kernels"))


def _flags() -> list[str]:
    """The compiler flags: software prefetch for products of up to M2R2_KERNEL_PREFETCH_ROWS rows (default:
    1 on an AMD CPU, where several rows' prefetches cost more than they hide; all rows elsewhere)."""
    rows = os.environ.get("M2R2_KERNEL_PREFETCH_ROWS")
    if rows is None and "AuthenticAMD" in _cpu_info():
        rows = "1"
    if rows is None:
        return list(_FLAGS)
    try:
        n = int(rows)
    except ValueError:
        raise M2R2Error(f"M2R2_KERNEL_PREFETCH_ROWS must be an integer, got {rows!r}") from None
    return _FLAGS + [f"-DM2R2_PREFETCH_MAX_ROWS={n}"]


def _build() -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (set CXX)")
    flags = _flags()
    inc = jax.ffi.include_dir()
    key = hashlib.sha256(
        b"\0".join(
            [_SRC.read_bytes(), " ".join(flags).encode(), cxx.encode(), jax.__version__.encode(), _cpu_id().encode()]
        )
    ).hexdigest()[:16]
    out = _cache_dir() / f"cpu_matmul-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        r = subprocess.run([cxx, *flags, f"-I{inc}", str(_SRC), "-o", str(tmp_so)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"compiling {_SRC.name} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders agree on the result
    return out


@functools.cache
def _cpu_info() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_id() -> str:
    """-march=native code is tied to the CPU: key the cache by its model and flags."""
    info = _cpu_info()
    if info:
        lines = [l for l in info.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    import platform

    return platform.processor() or platform.machine()


@functools.cache
def preferred() -> bool:
    """Whether `--cpu-kernel auto` should pick the kernels on this CPU: with AVX-512 they beat XLA's
    ops (a one-token SmolLM2 forward 23.8 vs 35.3 ms on a 2-core Xeon); with AVX2 only they do not
    (58.9 vs 49.5 ms on a 2-core EPYC; BENCHMARKS.md "Component benchmarks"). `on` forces them anywhere."""
    return "avx512f" in _cpu_id().split()


@functools.cache
def available() -> bool:
    """True when the kernel is built and registered for the CPU backend (built on first call)."""
    if os.environ.get("M2R2_CPU_KERNEL", "1") == "0":
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        return True
    except Exception as e:  # noqa: BLE001 - any failure means "use XLA's dot"
        warnings.warn(f"m2r2_jax CPU matmul kernel unavailable, using XLA's dot: {e}", stacklevel=2)
        return False


def _require() -> None:
    if not available():
        raise M2R2Error("the CPU kernels are unavailable (see the warning above); decode with unpacked params")


def why_not(cfg, mesh=None) -> str | None:
    """Why decoding with `cfg` cannot use the CPU kernels, or None when it can."""
    if jax.default_backend() != "cpu":
        return f"the kernels run on the CPU backend only (this is {jax.default_backend()})"
    if mesh is not None:
        return "the kernels run on one device without a mesh (--mesh was given)"
    if cfg.param_dtype != "float32" or cfg.dtype != "float32" or cfg.matmul_dtype not in ("", "float32"):
        return "the kernels need float32 params, activations and matmuls"
    if cfg.head_dim not in HEAD_DIMS:
        return f"head_dim {cfg.head_dim} is not one of {HEAD_DIMS}"
    if cfg.mlp_type != "dense":
        return f"the {cfg.mlp_type} MLP is not supported"
    if not available():
        return "the kernel library could not be built (see the warning above)"
    return None


def wanted(cfg, mesh=None) -> bool:
    """Whether decoding with `cfg` should pack its weights for the CPU kernels."""
    return why_not(cfg, mesh) is None


_MATMUL_WEIGHTS = {"attn": ("wq", "wk", "wv", "wo"), "mlp": ("gate", "up", "down")}


def pack_decode_params(cfg, params: dict) -> dict:
    """The decode-time params: every layer matmul weight and the LM head as `PackedWeight`
    (a tied head is packed as `lm_head`; `embed` stays for the token lookup). Raises when the
    kernel is unavailable; use `wanted` first."""
    _require()
    if cfg.mlp_type != "dense":
        raise M2R2Error(f"packing a {cfg.mlp_type} MLP for the CPU kernel is not implemented")
    pack_j = jax.jit(pack)
    layers = []
    for lp in params["layers"]:
        new = {k: (dict(v) if isinstance(v, dict) else v) for k, v in lp.items()}
        for blk, names in _MATMUL_WEIGHTS.items():
            for n in names:
                new[blk][n] = pack_j(lp[blk][n])
        layers.append(new)
    out = dict(params, layers=layers)
    out["lm_head"] = pack_j(params["lm_head"]) if "lm_head" in params else jax.jit(pack_rows)(params["embed"])
    return out


def is_packed(params: dict) -> bool:
    return isinstance(params.get("lm_head"), PackedWeight)
