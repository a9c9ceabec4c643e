"""Training config: a frozen dataclass read from YAML (configs/*.yaml) with
`key=value` overrides (`m2r2.rank=16`, `lr=3e-4`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from m2r2_jax.config import apply_overrides, from_dict, load_yaml, to_dict
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.sharding import MeshConfig


def _at_least(cfg, names, lo: int, prefix: str = "") -> None:
    for n in names:
        v = getattr(cfg, n)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise M2R2Error(f"{prefix}{n} must be an integer >= {lo}, got {v!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ()  # empty -> the default training prompt sources
    num_prompts: int = 2000  # prompts to self-distill (deterministic shuffle, then limit)
    seed: int = 0
    distill_dir: str = "runs/distill/smollm2-135m"
    # the model that answers the prompts (the cache's identity); "" = the trained base. Another model of the
    # same tokenizer makes the answers the inputs only: the losses' teacher stays the trained base (e.g. the
    # MoE-ified SmolLM2 trained on the dense model's answers, whose own greedy text degenerates)
    distill_model: str = ""
    max_prompt_tokens: int = 192
    max_new_tokens: int = 192
    distill_batch_size: int = 16
    distill_shard_size: int = 64  # answers per shard file: what an interrupted run can lose at most
    distill_pack: str = ""  # non-empty: the cache's answers also kept there without prompt text (a folder
    # committed to git: training/distill_pack.py), restored from it first, so a run carries across checkouts
    heldout_prompts: int = 64  # the last N prompts are kept out of training (alignment eval)
    loss_on_prompt: bool = False  # also train on prompt positions (the teacher is defined there too)
    teacher_cache_dir: str = ""  # non-empty: cache the frozen base's slow states per example there
    # (built once, resumable) and skip the slow forward in every step
    teacher_cache_dtype: str = "bfloat16"  # bfloat16 | float32 (storage of the cached intermediate states)

    def __post_init__(self):
        _at_least(
            self,
            ("num_prompts", "max_prompt_tokens", "max_new_tokens", "distill_batch_size", "distill_shard_size"),
            1,
            "data.",
        )
        _at_least(self, ("heldout_prompts",), 0, "data.")
        if self.teacher_cache_dtype not in ("bfloat16", "float32"):
            raise M2R2Error(f"data.teacher_cache_dtype={self.teacher_cache_dtype!r}: expected bfloat16 or float32")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "smollm2-135m"
    m2r2: M2R2Config = M2R2Config()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 300
    lr: float = 1e-3
    warmup_steps: int = 20
    end_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    out_dir: str = "runs/train"
    checkpoint_dir: str = ""  # "" = out_dir/checkpoints; may be a gs:// path (Orbax, through etils.epath)
    save_every: int = 50
    save_minutes: float = 10.0  # also save when this much wall clock passed since the last save (0 = off)
    keep: int = 2
    log_every: int = 1
    async_save: bool = True

    @property
    def checkpoints(self) -> str:
        return self.checkpoint_dir or str(Path(self.out_dir) / "checkpoints")

    def __post_init__(self):
        _at_least(self, ("batch_size", "steps", "save_every", "keep", "log_every"), 1)
        _at_least(self, ("warmup_steps",), 0)
        if self.seq_len < 2:
            raise M2R2Error(f"seq_len must be >= 2, got {self.seq_len}")
        if not self.lr > 0:
            raise M2R2Error(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.end_lr_ratio <= 1:
            raise M2R2Error(f"end_lr_ratio must be in [0, 1], got {self.end_lr_ratio}")
        if not 0 <= self.save_minutes < float("inf"):
            raise M2R2Error(f"save_minutes must be a finite number >= 0, got {self.save_minutes}")
        if self.weight_decay < 0 or self.clip_norm <= 0:
            raise M2R2Error(f"need weight_decay >= 0 and clip_norm > 0 (got {self.weight_decay}, {self.clip_norm})")


def load_train_config(path: str | None, overrides=()) -> TrainConfig:
    """A YAML file (or a run dir holding config.yaml) + `key=value` overrides, through the one parser."""
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if p.is_dir():
            p = p / "config.yaml"
        if not p.is_file() and not p.suffix and Path(str(p) + ".yaml").is_file():
            p = Path(str(p) + ".yaml")
        if not p.is_file():
            raise M2R2Error(f"config file not found: {path}")
        cfg = from_dict(TrainConfig, load_yaml(p))
    return apply_overrides(cfg, list(overrides))


def config_to_dict(cfg) -> dict:
    return to_dict(cfg)


def config_from_dict(d: dict) -> TrainConfig:
    return from_dict(TrainConfig, d)
