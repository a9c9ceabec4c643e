"""One compile cache for the decoders: an executable per static key (shape bucket, options)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any


class CompileCache:
    """`get(key, make_fn, args, **jit_kw)` -> (compiled executable, compile seconds, 0.0 when cached).
    `make_fn()` builds the Python function to jit; it is only called on a miss."""

    def __init__(self):
        self._compiled: dict[Hashable, Any] = {}
        self.compiles = 0

    def get(self, key: Hashable, make_fn: Callable[[], Callable], args: tuple, **jit_kw) -> tuple[Any, float]:
        if key in self._compiled:
            return self._compiled[key], 0.0
        import jax

        t0 = time.perf_counter()
        exe = jax.jit(make_fn(), **jit_kw).lower(*args).compile()
        dt = time.perf_counter() - t0
        self._compiled[key] = exe
        self.compiles += 1
        return exe, dt
