"""All experts' weights in one file at known offsets, read back cold: the slow tier of the real mode.

File layout (little-endian, 4096-byte aligned):
    [0, 4096)                   MAGIC, then a JSON header {num_layers, num_experts, hidden,
                                intermediate, dtype: "float32"}, zero padded
    offset(l, e) = 4096 + (l * E + e) * stride
                                one record per expert, layer-major: gate [hidden, intermediate],
                                up [hidden, intermediate], down [intermediate, hidden], float32 C order,
                                zero padded to `stride` (the payload rounded up to 4096)

Cold reads. We drop the record's pages from the OS page cache with posix_fadvise(POSIX_FADV_DONTNEED)
before each read (so the read really goes to the disk) and again after it (so the bytes do not linger
in RAM beside the cache slot, as they would not on a real device), and open the file with
POSIX_FADV_RANDOM so readahead does not pull the next record in for free. We chose this over
O_DIRECT: O_DIRECT needs 4096-aligned user buffers, offsets and lengths, and some filesystems
(tmpfs; some overlay and network mounts) refuse it, whereas fadvise works on any file and reads
straight into the cache's numpy slot. The price: fadvise is advice, and DONTNEED does nothing on
tmpfs (which IS the page cache) or for dirty pages (we fsync after writing). `measure_cold_warm`
tells whether a cold read is actually slower on a given path.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from m2r2_jax.errors import M2R2Error

MAGIC = b"M2R2-EXPERTS-1\n"
ALIGN = 4096
PARTS = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    num_layers: int
    num_experts: int
    hidden: int
    intermediate: int

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise M2R2Error(f"expert store: {f.name} must be a positive int, got {v!r}")

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden, self.intermediate
        return {"gate": (h, i), "up": (h, i), "down": (i, h)}

    @property
    def payload_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * 4

    @property
    def stride(self) -> int:
        return math.ceil(self.payload_bytes / ALIGN) * ALIGN

    @property
    def file_bytes(self) -> int:
        return ALIGN + self.num_layers * self.num_experts * self.stride

    def offset(self, layer: int, expert: int) -> int:
        if not (0 <= layer < self.num_layers and 0 <= expert < self.num_experts):
            raise M2R2Error(f"expert store: no expert ({layer}, {expert}) in {self.num_layers} x {self.num_experts}")
        return ALIGN + (layer * self.num_experts + expert) * self.stride

    def views(self, record: np.ndarray) -> dict[str, np.ndarray]:
        """gate / up / down as views into one record buffer (float32 [stride // 4])."""
        out, at = {}, 0
        for name, shape in self.shapes.items():
            n = shape[0] * shape[1]
            out[name] = record[at : at + n].reshape(shape)
            at += n
        return out


class ExpertStore:
    """Reads experts from a file written by `ExpertStore.write`. Thread-safe: reads are positional
    (os.preadv), and release the GIL while the disk works."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise M2R2Error(f"expert store {self.path}: {e.strerror}") from None
        try:
            self.layout = self._read_header()
            if os.fstat(self._fd).st_size < self.layout.file_bytes:
                raise M2R2Error(f"expert store {self.path}: truncated (shorter than its header says)")
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> ExpertLayout:
        head = os.pread(self._fd, ALIGN, 0)
        if not head.startswith(MAGIC):
            raise M2R2Error(f"expert store {self.path}: not an expert store (bad magic)")
        try:
            meta = json.loads(head[len(MAGIC) :].rstrip(b"\0"))
            if meta.pop("dtype") != "float32":
                raise ValueError("dtype")
            return ExpertLayout(**meta)
        except (ValueError, TypeError, KeyError) as e:
            raise M2R2Error(f"expert store {self.path}: corrupt header ({e})") from None

    @classmethod
    def write(
        cls,
        path: str | Path,
        layout: ExpertLayout,
        weights: Callable[[int, int], Mapping[str, np.ndarray]],
    ) -> ExpertStore:
        """`weights(layer, expert)` -> {"gate", "up", "down"} float32 arrays of layout.shapes."""
        header = MAGIC + json.dumps({**dataclasses.asdict(layout), "dtype": "float32"}).encode()
        pad = bytes(layout.stride - layout.payload_bytes)
        with open(path, "wb") as f:
            f.write(header.ljust(ALIGN, b"\0"))
            for layer in range(layout.num_layers):
                for expert in range(layout.num_experts):
                    parts = weights(layer, expert)
                    for name, shape in layout.shapes.items():
                        a = np.asarray(parts[name]) if name in parts else None
                        if a is None or a.shape != shape or a.dtype != np.float32:
                            got = "missing" if a is None else f"{a.dtype} {a.shape}"
                            raise M2R2Error(f"expert ({layer}, {expert}) {name}: expected float32 {shape}, got {got}")
                        f.write(np.ascontiguousarray(a).tobytes())
                    f.write(pad)
            f.flush()
            os.fsync(f.fileno())  # dirty pages cannot be dropped: make them clean first
        return cls(path)

    def read_into(self, layer: int, expert: int, out: np.ndarray, cold: bool = True) -> None:
        """Read one expert's record into `out` (float32 [stride // 4], C-contiguous)."""
        off, n = self.layout.offset(layer, expert), self.layout.stride
        if out.dtype != np.float32 or out.nbytes != n or not out.flags.c_contiguous:
            want = f"C-contiguous float32 [{n // 4}]"
            raise M2R2Error(f"expert store: read buffer must be {want}, got {out.dtype} {out.shape}")
        if cold:
            os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_DONTNEED)
        mv, done = memoryview(out).cast("B"), 0
        while done < n:
            got = os.preadv(self._fd, [mv[done:]], off + done)
            if got == 0:
                raise M2R2Error(f"expert store {self.path}: truncated at expert ({layer}, {expert})")
            done += got
        if cold:
            os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_DONTNEED)

    def read(self, layer: int, expert: int, cold: bool = True) -> dict[str, np.ndarray]:
        buf = np.empty(self.layout.stride // 4, np.float32)
        self.read_into(layer, expert, buf, cold)
        return self.layout.views(buf)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_cold_warm(store: ExpertStore, repeats: int = 5, layer: int = 0, expert: int = 0) -> dict[str, float]:
    """Median time of a cold read (pages dropped first) and a warm one (pages cached) of one expert.
    A benchmark, not a test: on tmpfs, or with a tiny record, the two can be equal."""

    def timed(cold: bool) -> float:
        t0 = time.perf_counter()
        store.read_into(layer, expert, buf, cold=cold)
        return time.perf_counter() - t0

    buf = np.empty(store.layout.stride // 4, np.float32)
    cold = [timed(True) for _ in range(repeats)]
    timed(False)  # fill the page cache
    warm = [timed(False) for _ in range(repeats)]
    store.read_into(layer, expert, buf, cold=True)  # leave the record cold again
    n = store.layout.stride
    c, w = statistics.median(cold), statistics.median(warm)
    return {"bytes": n, "cold_ms": c * 1e3, "warm_ms": w * 1e3, "cold_gb_s": n / c / 1e9, "warm_gb_s": n / w / 1e9}
