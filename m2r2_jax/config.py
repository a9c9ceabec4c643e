"""Configs as frozen dataclasses with `key=value` overrides.

`ModelConfig` describes a Llama-family decoder (Llama 2/3, SmolLM2, Qwen2,
Mistral) and its sparse mixture-of-experts relatives (Mixtral, Qwen2-MoE, OLMoE,
GraniteMoE). It is built from an HF `config.json` dict or from GGUF metadata by
the loaders; anything we cannot compute exactly is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from m2r2_jax.errors import M2R2Error

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "smollm2", "mixtral", "qwen2_moe", "olmoe", "granitemoe")
ROUTERS = ("softmax_topk", "topk_softmax", "topk_unit")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type == "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None  # Mistral: exact only while cache <= window
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    # dtype policy: params stored in param_dtype, matmuls/activations in dtype
    param_dtype: str = "float32"
    dtype: str = "float32"
    # matmul inputs (weights and activations) cast to this dtype, products accumulated and
    # returned in f32 (the TPU default precision, done explicitly): "" = same as dtype. The
    # M2R2 train step sets it for the fast stream only (m2r2.train_matmul_dtype).
    matmul_dtype: str = ""
    # MLP slot: "dense" (SwiGLU of intermediate_size) or "moe" (model/moe.py: a router picks
    # experts_per_token of num_experts SwiGLU experts of moe_intermediate_size per token)
    mlp_type: str = "dense"
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one always-on expert, sigmoid-gated; 0 = none
    norm_topk_prob: bool = False  # softmax_topk: renormalise the k kept probabilities to sum to 1
    # "softmax_topk": softmax over all experts, keep the top k (Mixtral, Qwen2-MoE, OLMoE);
    # "topk_softmax": keep the top k logits, softmax over those (GraniteMoE);
    # "topk_unit": keep the top k logits, each combine weight 1 (a MoEfied dense FFN, training/moefy.py:
    # the experts are slices of one SwiGLU, so all experts at weight 1 sum to the dense output)
    router: str = "softmax_topk"
    dense_layers: tuple[int, ...] = ()  # moe: layers with a dense MLP instead (Qwen2-MoE mlp_only_layers)
    qk_norm: bool = False  # OLMoE: RMSNorm over the whole q and k projections, before the head split
    # GraniteMoE's scalars (1.0 / None: absent): embeddings * embedding_multiplier, each residual update
    # * residual_multiplier, attention scores * attention_multiplier (None: head_dim**-0.5), logits / logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attn_scale(self) -> float:
        """The factor on q.k scores: head_dim**-0.5 unless the model sets its own (GraniteMoE)."""
        return self.head_dim**-0.5 if self.attention_multiplier is None else self.attention_multiplier

    def layer_mlp(self, layer: int | None) -> str:
        """The MLP kind of layer `layer` ("dense" or "moe"). None: the same for every layer, which a
        model mixing dense and sparse layers cannot answer."""
        if self.mlp_type != "moe" or not self.dense_layers:
            return self.mlp_type
        if layer is None:
            raise M2R2Error("this model mixes dense and MoE layers: the decoder layer needs its index")
        return "dense" if layer in self.dense_layers else "moe"

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def mm_dtype(self):
        """The matmul input dtype, or None for "the activations' own dtype"."""
        return jnp.dtype(self.matmul_dtype) if self.matmul_dtype else None

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    def validate(self) -> ModelConfig:
        if self.arch not in SUPPORTED_ARCHS:
            raise M2R2Error(f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        if self.num_heads % self.num_kv_heads:
            raise M2R2Error(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise M2R2Error(f"head_dim={self.head_dim} must be even for RoPE")
        self._validate_moe()
        for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
            v = getattr(self, k)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise M2R2Error(f"{k}={v!r}: expected a finite number > 0")
        for k, v in (
            ("dtype", self.dtype),
            ("param_dtype", self.param_dtype),
            ("matmul_dtype", self.matmul_dtype or "float32"),
        ):  # "" = no matmul cast
            if v not in ("float32", "bfloat16", "float16"):
                raise M2R2Error(f"{k}={getattr(self, k)!r}: expected float32, bfloat16 or float16")
        return self

    def _validate_moe(self) -> None:
        if self.mlp_type not in ("dense", "moe"):
            raise M2R2Error(f"mlp_type {self.mlp_type!r}: expected 'dense' or 'moe'")
        if self.mlp_type == "dense":
            for k in ("num_experts", "experts_per_token", "moe_intermediate_size", "shared_expert_intermediate_size"):
                if getattr(self, k):
                    raise M2R2Error(f"{k}={getattr(self, k)} is set but mlp_type is 'dense' (use mlp_type=moe)")
            if self.dense_layers:
                raise M2R2Error(
                    "dense_layers is set but mlp_type is 'dense' (it names the dense layers of an MoE model)"
                )
            return
        for k in ("num_experts", "experts_per_token", "moe_intermediate_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise M2R2Error(f"{k}={v!r}: an MoE model needs a positive integer")
        if self.experts_per_token > self.num_experts:
            raise M2R2Error(f"experts_per_token={self.experts_per_token} exceeds num_experts={self.num_experts}")
        s = self.shared_expert_intermediate_size
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise M2R2Error(f"shared_expert_intermediate_size={s!r}: expected an integer >= 0 (0 = no shared expert)")
        if self.router not in ROUTERS:
            raise M2R2Error(f"router {self.router!r}: expected one of {', '.join(ROUTERS)}")
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.dense_layers)) != len(self.dense_layers):
            raise M2R2Error(
                f"dense_layers={list(self.dense_layers)}: expected distinct layer indices in [0, {self.num_layers})"
            )

    def check_cache_len(self, cache_len: int) -> None:
        """Refuse cache lengths where our full attention would differ from the model's."""
        if self.sliding_window is not None and cache_len > self.sliding_window:
            raise M2R2Error(
                f"sliding-window attention is not supported: cache length {cache_len} exceeds "
                f"sliding_window={self.sliding_window} (full attention is exact only up to the window)"
            )

    def record(self) -> dict:
        """The config as recorded in checkpoints' base identity and distillation manifests: the fields
        added since records began (the MoE and GraniteMoE ones) are left out at their defaults, so a
        dense model's record, and every record already written, stays as it was."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in _RECORDED_SINCE_MOE and d[f.name] == f.default:
                del d[f.name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.record(), sort_keys=True)


_RECORDED_SINCE_MOE = frozenset(
    (
        "num_experts",
        "experts_per_token",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "norm_topk_prob",
        "router",
        "dense_layers",
        "qk_norm",
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "logits_scaling",
    )
)


_HF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "OlmoeForCausalLM": "olmoe",
    "GraniteMoeForCausalLM": "granitemoe",
}


def model_config_from_hf(cfg: Mapping[str, Any], **overrides) -> ModelConfig:
    """Build a ModelConfig from an HF config.json dict (strict about what we can't do)."""
    if not isinstance(cfg, Mapping):
        raise M2R2Error(f"HF config.json must be a JSON object, got {type(cfg).__name__}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        _hf_int(cfg, key)
    for key in ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        if cfg.get(key) is not None:
            _hf_int(cfg, key)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, (list, tuple)):
        archs = [archs]
    model_type = cfg.get("model_type", "")
    arch = None
    for a in archs:
        arch = _HF_ARCH.get(a, arch)
    if arch is None and model_type in _HF_ARCH.values():
        arch = model_type
    if arch is None:
        raise M2R2Error(
            f"unsupported architecture {archs or model_type!r}; supported HF classes: {', '.join(_HF_ARCH)}"
        )
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    rope_scaling = None
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if rs:
        rtype = rs.get("rope_type", rs.get("type", "default"))
        if rtype == "llama3":
            rope_scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
            )
        elif rtype != "default":
            raise M2R2Error(f"unsupported rope_scaling type {rtype!r} (supported: default, llama3)")
    theta = cfg.get("rope_theta")
    if theta is None and rs and "rope_theta" in rs:
        theta = rs["rope_theta"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise M2R2Error(f"unsupported hidden_act {cfg.get('hidden_act')!r} (only silu)")
    if cfg.get("mlp_bias"):
        raise M2R2Error("unsupported: mlp_bias=True")
    if arch in ("llama", "olmoe", "granitemoe") and cfg.get("attention_bias"):
        # their attention_bias also adds a bias to o_proj, which we do not implement
        raise M2R2Error(f"unsupported: {arch} attention_bias=True (o_proj bias)")
    if arch == "qwen2_moe":
        qkv_bias = bool(cfg.get("qkv_bias", True))
    else:  # Mixtral's attention has no bias whatever its config says
        qkv_bias = arch == "qwen2" or (arch != "mixtral" and bool(cfg.get("attention_bias", False)))
    sliding = None
    if arch in ("mistral", "mixtral") and cfg.get("sliding_window"):
        sliding = int(cfg["sliding_window"])
    if arch in ("qwen2", "qwen2_moe") and cfg.get("use_sliding_window"):
        sliding = int(cfg.get("sliding_window") or 0) or None
    if arch in ("olmoe", "granitemoe") and cfg.get("sliding_window"):
        raise M2R2Error(f"unsupported: sliding_window={cfg['sliding_window']!r} in a {arch} config")
    layer_types = cfg.get("layer_types") or ()
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise M2R2Error(f"unsupported layer_types {sorted(set(layer_types))} (full_attention, sliding_attention)")
    eos = cfg.get("eos_token_id", 2)
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    mc = ModelConfig(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta or 10000.0),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        sliding_window=sliding,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos,
        **_moe_from_hf(arch, cfg),
    )
    return replace(mc, **overrides).validate()


def _hf_int(cfg: Mapping[str, Any], key: str, default: Any = None, minimum: int = 1) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise M2R2Error(f"HF config.json: {key!r} must be {what}, got {v!r}")
    return v


def _hf_float(cfg: Mapping[str, Any], key: str, default: float) -> float:
    v = cfg.get(key)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise M2R2Error(f"HF config.json: {key!r} must be a number, got {v!r}")
    return float(v)


def _moe_from_hf(arch: str, cfg: Mapping[str, Any]) -> dict:
    """The MoE / GraniteMoE fields of an HF config (router aux-loss and jitter settings only act in
    training and are ignored)."""
    if arch in ("mixtral", "granitemoe"):
        num_experts, expert_size = _hf_int(cfg, "num_local_experts", 8), cfg["intermediate_size"]
    elif arch in ("qwen2_moe", "olmoe"):
        num_experts = _hf_int(cfg, "num_experts", 60 if arch == "qwen2_moe" else 64, minimum=0)
        expert_size = _hf_int(cfg, "moe_intermediate_size", 1408) if arch == "qwen2_moe" else cfg["intermediate_size"]
    else:
        return {}
    out: dict[str, Any] = dict(
        mlp_type="moe",
        num_experts=num_experts,
        experts_per_token=_hf_int(
            cfg, "num_experts_per_tok", 4 if arch == "qwen2_moe" else 8 if arch == "olmoe" else 2
        ),
        moe_intermediate_size=expert_size,
        # Mixtral always renormalises the kept probabilities; GraniteMoE's softmax over the kept logits sums to 1
        norm_topk_prob=arch == "mixtral" or bool(cfg.get("norm_topk_prob", False)),
        router="topk_softmax" if arch == "granitemoe" else "softmax_topk",
    )
    if arch == "qwen2_moe":
        step = _hf_int(cfg, "decoder_sparse_step", 1)
        only = cfg.get("mlp_only_layers") or []
        if not isinstance(only, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in only):
            raise M2R2Error(f"HF config.json: 'mlp_only_layers' must be a list of layer indices, got {only!r}")
        n = cfg["num_hidden_layers"]
        dense = tuple(i for i in range(n) if i in only or num_experts == 0 or (i + 1) % step)
        if len(dense) == n:  # no sparse layer at all: a dense model
            return {}
        out.update(
            dense_layers=dense, shared_expert_intermediate_size=_hf_int(cfg, "shared_expert_intermediate_size", 5632, 0)
        )
    if arch == "olmoe":
        if cfg.get("clip_qkv") is not None:
            raise M2R2Error(f"unsupported: OLMoE clip_qkv={cfg['clip_qkv']!r}")
        out.update(qk_norm=True)
    if arch == "granitemoe":
        out.update(
            embedding_multiplier=_hf_float(cfg, "embedding_multiplier", 1.0),
            residual_multiplier=_hf_float(cfg, "residual_multiplier", 1.0),
            attention_multiplier=_hf_float(cfg, "attention_multiplier", 1.0),  # HF's default: 1.0, not hd**-0.5
            logits_scaling=_hf_float(cfg, "logits_scaling", 1.0),
        )
    return out


# ----------------------------------------------------------------------------- parsing
# One parser for every config dataclass: mappings (YAML files, checkpoint metadata) through
# `from_dict`, `key=value` strings through `apply_overrides`, both through `_coerce`. Unknown keys,
# wrong types and non-finite numbers are refused with the key's full name; each dataclass's own
# `__post_init__` then checks ranges.


def _type_name(typ) -> str:
    return getattr(typ, "__name__", str(typ))


def _coerce(value: Any, typ: Any, key: str):
    """`value` (a parsed YAML/JSON value, or a raw string from the command line) as `typ`."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or isinstance(typ, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except M2R2Error as e:
                errors.append(str(e))
        raise M2R2Error(errors[0] if errors else f"config key {key!r}: cannot parse {value!r}")
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, key + ".")
    if origin in (tuple, list, Sequence) or typ in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("()[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise M2R2Error(f"config key {key!r}: expected a list, got {value!r}")
        inner = args[0] if args else str
        return tuple(_coerce(v, inner, key) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "0", "false", "no"):
            return value.lower() in ("1", "true", "yes")
        raise M2R2Error(f"config key {key!r}: expected a boolean, got {value!r}")
    if typ in (int, float):
        if isinstance(value, str):
            try:
                value = int(value) if typ is int else float(value)
            except ValueError:
                raise M2R2Error(f"config key {key!r}: expected {typ.__name__}, got {value!r}") from None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (typ is int and not isinstance(value, int))
        ):
            raise M2R2Error(f"config key {key!r}: expected {typ.__name__}, got {value!r}")
        if not math.isfinite(value):
            raise M2R2Error(f"config key {key!r}: expected a finite number, got {value!r}")
        return typ(value)
    if typ is str:
        if not isinstance(value, str):
            raise M2R2Error(f"config key {key!r}: expected a string, got {value!r}")
        return value
    if typ is Any:
        return value
    raise M2R2Error(f"config key {key!r}: cannot set a value of type {_type_name(typ)}")


def from_dict(cls, d: Mapping | None, where: str = ""):
    """A config dataclass from a mapping; missing keys keep their defaults."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        name = where.rstrip(".") or cls.__name__
        raise M2R2Error(f"config {name!r}: expected a mapping of keys to values, got {type(d).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in d.items():
        if k not in fields:
            raise M2R2Error(f"unknown config key {where + str(k)!r} ({cls.__name__} has: {', '.join(sorted(fields))})")
        kw[k] = _coerce(v, hints[k], where + k)
    return cls(**kw)


def to_dict(cfg) -> dict:
    """A config dataclass as plain JSON-able values (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def replace(cfg, **kw):
    """dataclasses.replace that names an unknown key in a clear error."""
    names = {f.name for f in dataclasses.fields(cfg)}
    for k in kw:
        if k not in names:
            raise M2R2Error(f"unknown config key {k!r} for {type(cfg).__name__}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(cfg, **kw)


def apply_overrides(cfg, overrides: Sequence[str]):
    """Apply `key=value` (nested: `a.b=value`) strings to a frozen dataclass."""
    for item in overrides:
        if "=" not in item:
            raise M2R2Error(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), value.strip(), key.strip())
    return cfg


def _set(cfg, path, value, full_key):
    fields = {f.name for f in dataclasses.fields(cfg)}
    head = path[0]
    if head not in fields:
        raise M2R2Error(f"unknown config key {full_key!r} ({type(cfg).__name__} has: {', '.join(sorted(fields))})")
    if len(path) > 1:
        sub = getattr(cfg, head)
        if not dataclasses.is_dataclass(sub):
            raise M2R2Error(f"unknown config key {full_key!r}: {head!r} has no sub-keys")
        return dataclasses.replace(cfg, **{head: _set(sub, path[1:], value, full_key)})
    return dataclasses.replace(cfg, **{head: _coerce(value, typing.get_type_hints(type(cfg))[head], full_key)})


def load_yaml(path: str | Path) -> Any:
    """A YAML file's data (safe loader); one clear error for a missing, unreadable or malformed file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise M2R2Error(f"config file not found: {path}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise M2R2Error(f"config file {p} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise M2R2Error(f"corrupt config file {p}: {str(e).splitlines()[0]}") from None


def rope_inv_freq(cfg: ModelConfig):
    """Inverse RoPE frequencies as a numpy array (Llama-3 scaling applied)."""
    import numpy as np

    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs is not None:
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        wl = 2 * math.pi / inv
        scaled = np.where(wl > low_wl, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = (wl >= high_wl) & (wl <= low_wl)
        inv = np.where(is_medium, smoothed, scaled)
    return inv.astype(np.float32)
