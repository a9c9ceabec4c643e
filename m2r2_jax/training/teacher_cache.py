"""Teacher cache: the frozen base's slow-stream states for every training example,
computed once and read back each step instead of re-running the 30-layer forward.

The base never changes during training, so the slow pass of an example is the same at
every epoch: like the self-distilled answers, it is data. Cached per example:

  hid   [n, T, D]  the slow states `mc.cached_layers` at every position (the fast
                   layers' K/V are re-projected from them in the step; bf16 by default)
  final [M, D]     h_s^N at the M loss positions (float32: the teacher's logits come
                   from it, so its argmax is not perturbed by rounding)

Files: manifest.json (identity + progress), hid.npy, final.npy (NumPy memmaps). The
build is resumable (progress is committed after each flushed chunk) and refuses a
directory made for another base, data or layer set instead of overwriting it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.model import decoder as D

FORMAT = "m2r2-teacher-cache/1"
_STORE = {"bfloat16": (np.uint16, ml_dtypes.bfloat16), "float32": (np.float32, np.float32)}


def data_digest(tokens: np.ndarray, mask: np.ndarray) -> str:
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(tokens).tobytes())
    h.update(np.ascontiguousarray(mask).tobytes())
    return h.hexdigest()


def make_teacher_fn(cfg: ModelConfig, mc: M2R2Config, m: int, dtype: str):
    """-> jitted f(base, tokens [B, T], mask [B, T]) -> (hid [B, n, T, D] store dtype, final [B, m, D] f32)."""
    layers = mc.cached_layers(cfg.num_layers)
    store = _STORE[dtype][1]

    def f(base, tokens, mask):
        B, T = tokens.shape
        select, _ = S.loss_positions(mask, m)
        _, _, hs = D.forward_hidden(
            cfg, base, tokens, D.init_cache(cfg, B, T), jnp.zeros((B,), jnp.int32), collect=True
        )
        hid = (
            jnp.stack([hs[j - 1] for j in layers], 1).astype(store)
            if layers
            else jnp.zeros((B, 0, T, cfg.hidden_size), store)
        )
        return hid, S.gather_positions(hs[-1], select).astype(jnp.float32)

    return jax.jit(f)


class TeacherCache:
    """Read side: memmapped arrays, rows fetched by example index."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        n, T, D = manifest["num_examples"], manifest["seq_len"], manifest["hidden_size"]
        disk, self.view = _STORE[manifest["dtype"]]
        self.hid = np.lib.format.open_memmap(path / "hid.npy", mode="r")
        self.final = np.lib.format.open_memmap(path / "final.npy", mode="r")
        want_h = (n, len(manifest["layers"]), T, D)
        want_f = (n, manifest["loss_width"], D)
        if self.hid.shape != want_h or self.hid.dtype != disk or self.final.shape != want_f:
            raise M2R2Error(
                f"teacher cache {path} is corrupt: hid {self.hid.shape} {self.hid.dtype}, "
                f"final {self.final.shape}; expected {want_h} {np.dtype(disk)}, {want_f}"
            )

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(self.hid[idx]).view(self.view), np.asarray(self.final[idx])


def open_or_build(
    path: str | Path,
    cfg: ModelConfig,
    mc: M2R2Config,
    base: dict,
    base_id: dict,
    tokens: np.ndarray,
    mask: np.ndarray,
    dtype: str = "bfloat16",
    batch_size: int = 8,
    progress: bool = True,
) -> TeacherCache:
    """Open the cache at `path`, building (or finishing) it first when needed."""
    if dtype not in _STORE:
        raise M2R2Error(f"data.teacher_cache_dtype={dtype!r}: expected one of {sorted(_STORE)}")
    path = Path(path)
    N, T = tokens.shape
    m = mc.loss_width(T)
    ident = {
        "format": FORMAT,
        "base": base_id,
        "data": data_digest(tokens, mask),
        "num_examples": int(N),
        "seq_len": int(T),
        "loss_width": int(m),
        "hidden_size": int(cfg.hidden_size),
        "layers": mc.cached_layers(cfg.num_layers),
        "dtype": dtype,
    }
    man_path = path / "manifest.json"
    if man_path.is_file():
        try:
            man = json.loads(man_path.read_text())
        except json.JSONDecodeError as e:
            raise M2R2Error(f"teacher cache manifest {man_path} is corrupt: {e}") from None
        diff = [k for k in ident if man.get(k) != ident[k]]
        if diff:
            raise M2R2Error(
                f"teacher cache {path} was built for another {'/'.join(diff)}; "
                "point data.teacher_cache_dir elsewhere or delete it"
            )
        done = int(man.get("done", 0))
    elif path.exists() and any(path.iterdir()):
        raise M2R2Error(
            f"teacher cache directory {path} is not empty and has no manifest.json; refusing to overwrite it"
        )
    else:
        path.mkdir(parents=True, exist_ok=True)
        disk = _STORE[dtype][0]
        np.lib.format.open_memmap(
            path / "hid.npy", mode="w+", dtype=disk, shape=(N, len(ident["layers"]), T, cfg.hidden_size)
        ).flush()
        np.lib.format.open_memmap(
            path / "final.npy", mode="w+", dtype=np.float32, shape=(N, m, cfg.hidden_size)
        ).flush()
        done = 0
        _write_json(man_path, dict(ident, done=0))
    if done < N:
        fn = make_teacher_fn(cfg, mc, m, dtype)
        hid = np.lib.format.open_memmap(path / "hid.npy", mode="r+")
        fin = np.lib.format.open_memmap(path / "final.npy", mode="r+")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=N, initial=done, desc="teacher cache", unit="ex", dynamic_ncols=True)
        while done < N:
            hi = min(done + batch_size, N)
            tb, mb = tokens[done:hi], mask[done:hi]
            if hi - done < batch_size:  # pad the tail: one compiled shape
                pad = batch_size - (hi - done)
                tb = np.concatenate([tb, np.zeros((pad, T), tb.dtype)])
                mb = np.concatenate([mb, np.zeros((pad, T), mb.dtype)])
            h, f = fn(base, jnp.asarray(tb), jnp.asarray(mb))
            h = np.asarray(h)[: hi - done]
            hid[done:hi] = h.view(np.uint16) if dtype == "bfloat16" else h
            fin[done:hi] = np.asarray(f)[: hi - done]
            hid.flush()
            fin.flush()
            done = hi
            _write_json(man_path, dict(ident, done=done))
            if bar is not None:
                bar.update(hi - bar.n)
        if bar is not None:
            bar.close()
        del hid, fin
    return TeacherCache(path, dict(ident, done=done))


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
