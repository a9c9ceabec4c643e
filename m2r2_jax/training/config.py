"""Training config: a frozen dataclass read from YAML (configs/*.yaml) with
`key=value` overrides (`m2r2.rank=16`, `lr=3e-4`)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from m2r2_jax.config import apply_overrides
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ()        # empty -> the default training prompt sources
    num_prompts: int = 2000               # prompts to self-distill (deterministic shuffle, then limit)
    seed: int = 0
    distill_dir: str = "runs/distill/smollm2-135m"
    max_prompt_tokens: int = 192
    max_new_tokens: int = 192
    distill_batch_size: int = 16
    heldout_prompts: int = 64             # the last N prompts are kept out of training (alignment eval)
    loss_on_prompt: bool = False          # also train on prompt positions (the teacher is defined there too)
    teacher_cache_dir: str = ""           # non-empty: cache the frozen base's slow states per example there
                                          # (built once, resumable) and skip the slow forward in every step
    teacher_cache_dtype: str = "bfloat16"  # bfloat16 | float32 (storage of the cached intermediate states)


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
    save_every: int = 50
    keep: int = 2
    log_every: int = 1
    async_save: bool = True


def _from_dict(cls, d: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in (d or {}).items():
        if k not in fields:
            raise M2R2Error(f"unknown config key {where + k!r} ({cls.__name__} has: {', '.join(sorted(fields))})")
        sub = {"m2r2": M2R2Config, "data": DataConfig, "mesh": MeshConfig}.get(k) if cls is TrainConfig else None
        if sub is not None:
            v = _from_dict(sub, v, f"{where}{k}.")
        elif isinstance(v, list):
            v = tuple(v)
        kw[k] = v
    return cls(**kw)


def load_train_config(path: str | None, overrides=()) -> TrainConfig:
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if p.is_dir():
            p = p / "config.yaml"
        if not p.is_file() and not p.suffix and Path(str(p) + ".yaml").is_file():
            p = Path(str(p) + ".yaml")
        if not p.is_file():
            raise M2R2Error(f"config file not found: {path}")
        import yaml

        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise M2R2Error(f"corrupt config file {p}: {str(e).splitlines()[0]}") from None
        cfg = _from_dict(TrainConfig, d, "")
    return apply_overrides(cfg, list(overrides))


def config_to_dict(cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(d: dict) -> TrainConfig:
    return _from_dict(TrainConfig, d, "")
