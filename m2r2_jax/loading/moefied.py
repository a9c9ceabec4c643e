"""A dense SwiGLU model turned into a mixture of experts (MoEfication, Zhang et al. 2022): the asset and its loader.

The asset is what `training/moefy.py` (the split and the routers) and `training/moe_retrain.py` (the
retrained experts) learned, never the base weights: per layer a neuron permutation (expert e starts as
neurons perm[e*Fe : (e+1)*Fe], Fe = intermediate_size / E), a router [embed, expert] and, from format /2
on, optionally the retrained experts. It is an Orbax checkpoint (one step, 0) with two items:

    moe    {"perm": [L, F] int32, "router": [L, D, E] float32, + the expert weights by `experts.kind`:
            "split"  nothing more: each expert is its slice of the dense FFN (all of format /1)
            "full"   gate / up [L, E, D, Fe], down [L, E, Fe, D]: the experts themselves
            "delta"  gate_a [L, E, D, r], gate_b [L, E, r, Fe] (up, down alike): rank-r deltas per expert,
                     added to the dense split}
    meta   JSON: format, base model identity (alias, config, fingerprint), experts, top_k, dense_layers,
           experts {kind, rank, dtype: how the expert tensors are stored}, the build settings and metrics

Expert tensors may be stored in float16 / bfloat16 (`experts.dtype`) to keep the asset small; they are
widened to float32 on load. `moefy_params` re-lays the dense weights out as experts (gate / up [E, D, Fe],
down [E, Fe, D]) and applies the stored experts; `moe_config` sets the "topk_unit" router (combine weight
1): with every expert on, the unretrained split is the dense FFN exactly, because each expert is a slice
of the same SwiGLU sum. `load_moefied` builds a normal `LoadedModel` from a dense base + an asset; the
registry's alias `smollm2-135m-moe` calls it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from m2r2_jax.config import ModelConfig, replace
from m2r2_jax.errors import M2R2Error
from m2r2_jax.orbax_paths import ckpt_path, restore_error

FORMAT = "m2r2-moefied/2"
FORMATS = ("m2r2-moefied/1", FORMAT)  # /1: perm + router only (read as kind "split")
KINDS = ("split", "full", "delta")
WEIGHTS = ("gate", "up", "down")
STORE_DTYPES = ("float32", "float16", "bfloat16")
STEP = 0
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def moe_config(cfg: ModelConfig, experts: int, top_k: int, dense_layers=()) -> ModelConfig:
    """The dense config with its MLP slot made an MoE of `experts` equal slices, `top_k` of them per token."""
    F = cfg.intermediate_size
    if experts < 1 or F % experts:
        raise M2R2Error(f"{experts} experts do not split the {F} FFN neurons into equal experts")
    if not 1 <= top_k <= experts:
        raise M2R2Error(f"top_k={top_k}: expected 1 <= top_k <= experts={experts}")
    return replace(
        cfg,
        mlp_type="moe",
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=F // experts,
        router="topk_unit",
        dense_layers=tuple(int(i) for i in dense_layers),
    ).validate()


def expert_weights(gate, up, down, perm, experts: int):
    """One layer's dense gate / up [D, F], down [F, D] and its permutation [F] -> the experts' gate / up
    [E, D, Fe] and down [E, Fe, D] (expert e = neurons perm[e*Fe : (e+1)*Fe])."""
    D, F = gate.shape
    Fe = F // experts
    g = np.asarray(gate)[:, perm].reshape(D, experts, Fe).transpose(1, 0, 2)
    u = np.asarray(up)[:, perm].reshape(D, experts, Fe).transpose(1, 0, 2)
    return g, u, np.asarray(down)[perm].reshape(experts, Fe, D)


# a stored delta of weight n, per layer: gate / up  a [D, r] (shared by the layer's experts) @ b [E, r, Fe];
# down  a [E, Fe, r] @ b [r, D] (shared). The shared factor is on the model-dimension side, so a layer's
# deltas are one rank-r update of the whole dense matrix, cut into the experts' slices.
DELTA_EINSUM = {"gate": "dr,erf->edf", "up": "dr,erf->edf", "down": "efr,rd->efd"}


def expert_names(kind: str, weights=WEIGHTS) -> tuple[str, ...]:
    """The expert tensors an asset of this kind stores for `weights` (a subset of gate / up / down)."""
    if kind == "full":
        return tuple(n for n in WEIGHTS if n in weights)
    if kind == "delta":
        return tuple(f"{n}_{x}" for n in WEIGHTS if n in weights for x in "ab")
    return ()


def expert_shapes(cfg: ModelConfig, experts: int, kind: str, rank: int = 0, weights=WEIGHTS) -> dict:
    """The stored expert tensors, each stacked over the L layers: {name: shape}."""
    L, D, Fe = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size // experts
    full = {"gate": (experts, D, Fe), "up": (experts, D, Fe), "down": (experts, Fe, D)}
    delta = {
        "gate": ((D, rank), (experts, rank, Fe)),
        "up": ((D, rank), (experts, rank, Fe)),
        "down": ((experts, Fe, rank), (rank, D)),
    }
    out = {}
    for n in expert_names(kind, weights):
        w, _, x = n.partition("_")
        out[n] = (L, *(full[w] if kind == "full" else delta[w]["ab".index(x)]))
    return out


def apply_experts(split: dict, stored: dict) -> dict:
    """One layer's split experts {gate, up, down} and its stored tensors (no layer axis) -> the experts:
    a full weight replaces its split, a delta adds a @ b (DELTA_EINSUM). numpy float32."""
    out = {}
    for n in WEIGHTS:
        if n in stored:
            out[n] = np.asarray(stored[n], np.float32)
        elif f"{n}_a" in stored:
            d = np.einsum(
                DELTA_EINSUM[n], np.asarray(stored[f"{n}_a"], np.float32), np.asarray(stored[f"{n}_b"], np.float32)
            )
            out[n] = (np.asarray(split[n], np.float32) + d).astype(np.float32)
        else:
            out[n] = split[n]
    return out


def moefy_params(cfg: ModelConfig, params: dict, perm, router, dense_layers=(), experts: dict | None = None) -> dict:
    """Dense params (numpy, model_spec layout) -> the MoE's params: the same tree with each MoE layer's
    mlp {router, gate, up, down}; layers in `dense_layers` keep their dense MLP. `experts`: the asset's
    stored expert tensors ([L, ...] each, `expert_shapes`), applied by `apply_experts`. The input is not
    changed."""
    E = int(np.shape(router)[-1])
    experts = experts or {}
    layers = []
    for i, layer in enumerate(params["layers"]):
        layer = dict(layer)
        if i not in dense_layers:
            m = layer["mlp"]
            w = dict(zip(WEIGHTS, expert_weights(m["gate"], m["up"], m["down"], np.asarray(perm[i]), E)))
            w = apply_experts(w, {n: v[i] for n, v in experts.items()})
            layer["mlp"] = {"router": np.asarray(router[i], np.float32), **w}
        layers.append(layer)
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- the asset


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def np_store_dtype(name: str):
    import ml_dtypes

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def save_moe_asset(path, perm, router, meta: dict, experts: dict | None = None, dtype: str = "float32") -> Path:
    """Write the asset (replacing one already at `path`). `experts`: full weights (some of gate / up /
    down) or deltas ({down_a, down_b}, ...), each stacked over the layers (`expert_shapes`), stored in
    `dtype`; None: the split alone. `meta` needs base / experts / top_k; the format and the
    `experts_stored` record are added."""
    import shutil

    experts = dict(experts or {})
    if dtype not in STORE_DTYPES:
        raise M2R2Error(f"expert dtype {dtype!r}: expected one of {', '.join(STORE_DTYPES)}")
    weights = [n for n in WEIGHTS if n in experts or f"{n}_a" in experts]
    kind = "full" if any(n in experts for n in WEIGHTS) else "delta" if weights else "split"
    rank = int(np.shape(experts[f"{weights[0]}_a"])[-1]) if kind == "delta" else 0
    if set(experts) != set(expert_names(kind, weights)):
        raise M2R2Error(f"expert tensors {sorted(experts)}: expected {sorted(expert_names(kind, weights))}")
    ocp = _ocp()
    p = Path(path).expanduser().absolute()
    if p.exists():
        shutil.rmtree(p)
    tree = {"perm": np.asarray(perm, np.int32), "router": np.asarray(router, np.float32)}
    tree.update({n: np.asarray(v, np.float32).astype(np_store_dtype(dtype)) for n, v in experts.items()})
    record = {"kind": kind, "rank": rank, "dtype": dtype, "weights": weights}
    with ocp.CheckpointManager(ckpt_path(p), options=ocp.CheckpointManagerOptions(create=True)) as mngr:
        mngr.save(
            STEP,
            args=ocp.args.Composite(
                moe=ocp.args.StandardSave(tree),
                meta=ocp.args.JsonSave({**meta, "format": FORMAT, "experts_stored": record}),
            ),
        )
        mngr.wait_until_finished()
    return p


def stored_experts(meta: dict) -> dict:
    """The asset's record of its expert tensors: {kind, rank, dtype, weights} (format /1: the split alone)."""
    return meta.get("experts_stored", {"kind": "split", "rank": 0, "dtype": "float32", "weights": []})


def read_moe_meta(path) -> dict:
    """The asset's metadata, checked for what a reader needs (one clear error otherwise)."""
    if not Path(path).is_dir():
        raise M2R2Error(f"MoE asset not found: {path}")
    f = Path(path) / str(STEP) / "meta" / "metadata"
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise M2R2Error(f"not an MoE asset (no {STEP}/meta/metadata): {path}") from None
    except (OSError, ValueError) as e:
        raise M2R2Error(f"corrupt MoE asset metadata {f}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise M2R2Error(f"{path} is not an MoE asset ({' or '.join(FORMATS)})")
    for k in ("experts", "top_k"):
        if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int):
            raise M2R2Error(f"corrupt MoE asset metadata {f}: no integer {k!r}")
    if not isinstance(meta.get("base"), dict) or not isinstance(meta.get("dense_layers", []), list):
        raise M2R2Error(f"corrupt MoE asset metadata {f}: no 'base' object")
    rec = stored_experts(meta)
    rank = rec.get("rank") if isinstance(rec, dict) else None
    if (
        not isinstance(rec, dict)
        or rec.get("kind") not in KINDS
        or rec.get("dtype") not in STORE_DTYPES
        or isinstance(rank, bool)
        or not isinstance(rank, int)
        or (rank < 1 if rec.get("kind") == "delta" else rank != 0)
        or not isinstance(rec.get("weights"), list)
        or not set(rec["weights"]) <= set(WEIGHTS)
        or (rec["kind"] != "split") != bool(rec["weights"])
    ):
        raise M2R2Error(
            f"corrupt MoE asset metadata {f}: experts_stored {rec!r} (expected kind in {KINDS}, "
            f"dtype in {STORE_DTYPES}, rank >= 1 for deltas, else 0, weights: some of {WEIGHTS} unless split)"
        )
    return meta


class MoeAsset(NamedTuple):
    perm: np.ndarray  # [L, F] int32
    router: np.ndarray  # [L, D, E] float32
    meta: dict
    experts: dict  # {name: [L, ...] float32}: empty for the split alone (expert_shapes)


def read_moe_asset(path, cfg: ModelConfig, base_fingerprint: str) -> MoeAsset:
    """The asset made for this base (its fingerprint), expert tensors widened to float32; a missing,
    corrupt or foreign asset is refused with one line."""
    import jax

    meta = read_moe_meta(path)
    fp = meta["base"].get("fingerprint")
    if fp != base_fingerprint:
        raise M2R2Error(
            f"MoE asset {path} was made for another base model (fingerprint {fp} there, {base_fingerprint} here)"
        )
    L, D, F, E = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, meta["experts"]
    if not 1 <= E <= F or F % E:
        raise M2R2Error(f"MoE asset {path}: {E} experts do not split the {F} FFN neurons into equal experts")
    rec = stored_experts(meta)
    shapes = expert_shapes(cfg, E, rec["kind"], rec["rank"], rec["weights"])
    sd = np_store_dtype(rec["dtype"])
    abstract = {
        "perm": jax.ShapeDtypeStruct((L, F), np.int32),
        "router": jax.ShapeDtypeStruct((L, D, E), np.float32),
        **{n: jax.ShapeDtypeStruct(s, sd) for n, s in shapes.items()},
    }
    ocp = _ocp()
    try:
        with ocp.CheckpointManager(ckpt_path(Path(path).expanduser().absolute())) as mngr:
            tree = mngr.restore(STEP, args=ocp.args.Composite(moe=ocp.args.StandardRestore(abstract))).moe
    except Exception as e:
        raise M2R2Error(f"cannot restore the MoE asset {path}: {restore_error(e)}") from None
    perm, router = np.asarray(tree["perm"]), np.asarray(tree["router"], np.float32)
    if perm.shape != (L, F) or router.shape != (L, D, E):
        raise M2R2Error(f"MoE asset {path}: perm {perm.shape} / router {router.shape}, expected {(L, F)} / {(L, D, E)}")
    experts = {n: np.asarray(tree[n]).astype(np.float32) for n in shapes}
    for n, s in shapes.items():
        if experts[n].shape != s:
            raise M2R2Error(f"MoE asset {path}: expert tensor {n} {experts[n].shape}, expected {s}")
    bad = [i for i in range(L) if not np.array_equal(np.sort(perm[i]), np.arange(F))]
    if bad:
        raise M2R2Error(
            f"MoE asset {path}: the expert assignment of layers {bad[:4]} is not a permutation of the neurons"
        )
    if not np.isfinite(router).all():
        raise M2R2Error(f"MoE asset {path}: its routers hold non-finite values")
    bad = [n for n, v in experts.items() if not np.isfinite(v).all()]
    if bad:
        raise M2R2Error(f"MoE asset {path}: its expert tensors {bad} hold non-finite values")
    return MoeAsset(perm, router, meta, experts)


# ----------------------------------------------------------------------------- loading


def asset_path(asset) -> Path:
    """An asset directory, or a name under m2r2_jax/assets (where the shipped assets live)."""
    p = Path(asset).expanduser()
    return p if p.is_absolute() or p.exists() else ASSETS / str(asset)


def load_moefied(
    base: str,
    asset,
    *,
    top_k: int | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    matmul_dtype: str | None = None,
    mesh=None,
    tokenizer: bool = True,
) -> Any:
    """A `LoadedModel` of the dense model `base` (any load_model name) MoEfied by `asset` (a directory,
    or a name under m2r2_jax/assets); `top_k` overrides the asset's experts per token."""
    from m2r2_jax.loading.registry import LoadedModel, _read, load_tokenizer, place_params, resolve
    from m2r2_jax.model.params import params_fingerprint

    kind, path = resolve(base)
    cfg, dense = _read(kind, path)  # float32 numpy, cached: moefy_params never writes into it
    perm, router, meta, experts = read_moe_asset(asset_path(asset), cfg, params_fingerprint(dense, as_dtype="float32"))
    dense_layers = tuple(meta.get("dense_layers", []))
    mcfg = moe_config(cfg, meta["experts"], meta["top_k"] if top_k is None else int(top_k), dense_layers)
    params_np = moefy_params(cfg, dense, perm, router, dense_layers, experts)
    kw = {k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype), ("matmul_dtype", matmul_dtype)) if v}
    mcfg = replace(mcfg, **kw).validate()
    return LoadedModel(
        cfg=mcfg,
        params=place_params(mcfg, params_np, mesh),
        tokenizer=load_tokenizer(kind, path) if tokenizer else None,
        source=path,
        kind=kind,
        fingerprint=params_fingerprint(params_np, as_dtype="float32"),
        derived_from=base,
    )
