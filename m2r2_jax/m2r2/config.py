"""M2R2 knobs: rate, branch layer, adapters, ARLA router, losses, draft vocab."""

from __future__ import annotations

import dataclasses
import math

from m2r2_jax.errors import M2R2Error

ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LAYER_MAPS = ("prefix", "strided", "skip")


@dataclasses.dataclass(frozen=True)
class M2R2Config:
    rate: int = 3  # r: the fast stream covers r slow layers per fast layer
    branch: int = 0  # b: fast stream branches off slow state h_s^b
    num_fast_layers: int = 0  # L_f; 0 -> ceil((N - b) / r)
    layer_map: str = "prefix"  # which base weights fast layer l runs: prefix (b+l-1) |
    # strided (t(l)-1, last of its group) | skip (t(l-1), first of its group)
    rank: int = 32  # accelerator adapter rank (adapter=lowrank)
    adapter: str = "lowrank"  # lowrank: W + A B (rank `rank`) | full: W + D, D a full trainable [in, out] delta
    targets: tuple[str, ...] = ALL_TARGETS
    gain: bool = True  # per-layer, per-channel gain on each residual update
    router_dim: int = 64  # ARLA width
    router_input: str = "delta"  # latents | delta (per-layer changes, the "velocities")
    align_weight: float = 1.0
    align_metric: str = "cosine"  # cosine | mse (of RMS-normalised states)
    align_final_weight: float = 1.0  # extra weight on the last fast layer's alignment
    kd_weight: float = 1.0
    kd_temperature: float = 1.0
    kd_layers: str = "final"  # final | all (KD on every fast layer's logits)
    kd_vocab: str = "full"  # full | draft (KD over the draft head's vocabulary only)
    router_weight: float = 0.1
    draft_vocab: int = 8192  # draft head scores the most frequent tokens; 0 = full vocab
    train_positions: int = 0  # > 0: the fast stream trains on the first M loss positions of
    # each row only (exact when no row has more; much cheaper)
    train_matmul_dtype: str = ""  # "bfloat16": the train step's fast stream, draft/KD heads and
    # router labels multiply in bf16 with f32 accumulation (params,
    # residual stream, optimizer and the teacher stay f32); "" = off

    def __post_init__(self):
        for name, lo in (
            ("rate", 1),
            ("branch", 0),
            ("num_fast_layers", 0),
            ("rank", 1),
            ("router_dim", 1),
            ("draft_vocab", 0),
            ("train_positions", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise M2R2Error(f"m2r2.{name} must be an integer >= {lo}, got {v!r}")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad:
            raise M2R2Error(f"unknown adapter target(s) {bad}; choose from {ALL_TARGETS}")
        choices = (
            ("layer_map", LAYER_MAPS),
            ("align_metric", ("cosine", "mse")),
            ("router_input", ("latents", "delta")),
            ("kd_layers", ("final", "all")),
            ("kd_vocab", ("full", "draft")),
            ("train_matmul_dtype", ("", "float32", "bfloat16")),
        )
        for name, ok in choices:
            if getattr(self, name) not in ok:
                raise M2R2Error(f"m2r2.{name}={getattr(self, name)!r}: expected one of {', '.join(map(repr, ok))}")
        for name in ("align_weight", "align_final_weight", "kd_weight", "router_weight"):
            if not getattr(self, name) >= 0:
                raise M2R2Error(f"m2r2.{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.kd_temperature > 0:
            raise M2R2Error(f"m2r2.kd_temperature must be > 0, got {self.kd_temperature!r}")

    def validate(self, num_layers: int) -> M2R2Config:
        """The checks that need the base's depth."""
        if not 0 <= self.branch < num_layers:
            raise M2R2Error(f"m2r2.branch={self.branch} must be in [0, {num_layers})")
        if self.n_fast(num_layers) > num_layers - self.branch:
            raise M2R2Error(
                f"m2r2.num_fast_layers={self.num_fast_layers} exceeds the {num_layers - self.branch} "
                "layers after the branch"
            )
        return self

    def for_base(self, cfg) -> M2R2Config:
        """`validate` plus the checks that need the base's layers: on a fast layer whose base layer has a
        sparse (MoE) MLP, adapters go on the attention projections only (the experts stay frozen and
        shared with the slow stream; the gains still scale both residual updates)."""
        self.validate(cfg.num_layers)
        moe = [j for j in self.base_layers(cfg.num_layers) if cfg.layer_mlp(j) == "moe"]
        mlp = [t for t in self.targets if t in ("gate", "up", "down")]
        if moe and mlp:
            raise M2R2Error(
                f"m2r2.targets: {', '.join(mlp)} cannot adapt an MoE MLP (fast layers on base layers "
                f"{moe} are sparse): use m2r2.targets=[q,k,v,o]"
            )
        return self

    def n_fast(self, num_layers: int) -> int:
        return self.num_fast_layers or math.ceil((num_layers - self.branch) / self.rate)

    def targets_of(self, num_layers: int) -> list[int]:
        """t(l) for l = 1..L_f: the slow layer (1-based) fast layer l aligns with; t(L_f) = N."""
        n = self.n_fast(num_layers)
        span = num_layers - self.branch
        return [min(self.branch + round(span * l / n), num_layers) for l in range(1, n + 1)]

    def loss_width(self, seq_len: int) -> int:
        """Loss positions per row the fast stream trains on: `train_positions` when it gathers
        (0 < M < T), else all T."""
        return self.train_positions if 0 < self.train_positions < seq_len else seq_len

    def cached_layers(self, num_layers: int) -> list[int]:
        """Slow states a teacher cache keeps at every position: the inputs h_s^j of the fast layers'
        base layers (their K/V are re-projected from them), the aligned targets and the branch;
        not h_s^0 (= the embedding, recomputed) and not h_s^N (kept at the loss positions, f32)."""
        need = set(self.base_layers(num_layers)) | set(self.targets_of(num_layers)) | {self.branch}
        return sorted(need - {0, num_layers})

    def base_layers(self, num_layers: int) -> list[int]:
        """0-based index of the base layer whose (frozen) weights fast layer l runs."""
        if self.layer_map == "prefix":
            return [self.branch + l for l in range(self.n_fast(num_layers))]
        t = self.targets_of(num_layers)
        if self.layer_map == "skip":  # input of fast layer l is aligned to h_s^{t(l-1)}: run that layer
            return [self.branch] + t[:-1]
        return [x - 1 for x in t]
