"""Roofline projections: compiled FLOPs and bytes accessed -> step times on a chip -> a projected
speculative speed-up. Projections, not measurements: a step takes max(FLOPs / peak FLOP/s, bytes /
HBM bandwidth) on one chip, with no launch, host or collective overhead, and the acceptance measured on
this CPU is assumed to carry over (it depends on the weights and prompts, not on the chip).

Chip figures are the vendors' public specs (dense bf16 peak; HBM bandwidth and size per chip).
"""

from __future__ import annotations

import dataclasses

from m2r2_jax.errors import M2R2Error


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bw: float  # bytes/s
    hbm_bytes: int
    topology: str | None  # a TPU topology to compile for; None: counts borrowed from another chip's compile


CHIPS = {
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 << 30, "v5e:2x2"),
    "v4": Chip("TPU v4", 275e12, 1228e9, 32 << 30, "v4:2x2x1"),
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95 << 30, "v5p:2x2x1"),
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32 << 30, "v6e:2x2"),
    "h100": Chip("NVIDIA H100 SXM", 989e12, 3350e9, 80 * 10**9, None),
}


ALIASES = {"v5litepod": "v5e"}  # topology names that use another name for the same chip


def chips(names: str) -> list[str]:
    out = [n.strip().lower() for n in names.split(",") if n.strip()]
    bad = [n for n in out if n not in CHIPS]
    if bad or not out:
        raise M2R2Error(f"unknown chip {', '.join(bad) or names!r}; known: {', '.join(CHIPS)}")
    return out


def step_ms(flops: float, bytes_accessed: float, chip: Chip) -> dict:
    """One program's roofline time (ms) and which roof binds."""
    t_c, t_m = flops / chip.peak_flops, bytes_accessed / chip.hbm_bw
    return {
        "ms": 1e3 * max(t_c, t_m),
        "bound": "compute" if t_c >= t_m else "memory",
        "arithmetic_intensity": flops / max(bytes_accessed, 1.0),
    }


def projected_speedup(
    t_ar: float, t_draft: float, t_verify: float, tau_m2r2: float, lookup_share: float = 0.0, tau_lookup: float = 0.0
) -> float:
    """Tokens per unit time of speculative decoding over AR decoding. M2R2-drafted steps cost a draft
    and a verification and emit tau_m2r2 tokens; prompt-lookup steps (a share of the steps) cost a
    verification and emit tau_lookup tokens."""
    if min(t_ar, t_draft, t_verify) <= 0 or tau_m2r2 <= 0:
        raise M2R2Error("step times and tau must be positive")
    s = lookup_share
    tokens = s * tau_lookup + (1 - s) * tau_m2r2
    time = s * t_verify + (1 - s) * (t_draft + t_verify)
    return tokens * t_ar / time


def acceptance(result: dict) -> dict:
    """The acceptance statistics a projection needs, from an `eval.speculative` result JSON."""
    try:
        lk = result.get("lookup") or {}
        if lk.get("tokens"):
            out = {
                "tau_m2r2": float(lk["tau_m2r2"]),
                "lookup_share": float(lk["share_of_steps"]),
                "tau_lookup": float(lk["tau"]),
                "tau": float(result["tau"]),
            }
        else:
            out = {
                "tau_m2r2": float(result["tau"]),
                "lookup_share": 0.0,
                "tau_lookup": 0.0,
                "tau": float(result["tau"]),
            }
        out["lookup_tokens"] = int(lk.get("tokens") or 0)  # the drafter's lookup setting (0: M2R2 alone)
        out["tree"] = result["config"]["tree"]
        out["dataset"] = result["config"].get("dataset")
        out["measured_speedup_cpu"] = float(result["overall_speedup"])
    except (KeyError, TypeError, ValueError) as e:
        raise M2R2Error(f"not an eval.speculative result (missing or bad {e})") from None
    return out
