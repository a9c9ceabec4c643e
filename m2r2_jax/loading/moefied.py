"""A dense SwiGLU model turned into a mixture of experts (MoEfication, Zhang et al. 2022): the asset and its loader.

The asset is what `training/moefy.py` learned, never the base weights: per layer a neuron permutation
(expert e owns neurons perm[e*Fe : (e+1)*Fe], Fe = intermediate_size / E) and a router [embed, expert].
It is an Orbax checkpoint (one step, 0) with two items:

    moe    {"perm": [L, F] int32, "router": [L, D, E] float32}
    meta   JSON: format, base model identity (alias, config, fingerprint), experts, top_k, dense_layers,
           the build settings and its held-out metrics

`moefy_params` re-lays the dense weights out as experts (gate / up [E, D, Fe], down [E, Fe, D]), and
`moe_config` sets the "topk_unit" router (combine weight 1): with every expert on, the MoE is the dense
FFN exactly, because each expert is a slice of the same SwiGLU sum. `load_moefied` builds a normal
`LoadedModel` from a dense base + an asset; the registry's alias `smollm2-135m-moe` calls it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from m2r2_jax.config import ModelConfig, replace
from m2r2_jax.errors import M2R2Error
from m2r2_jax.orbax_paths import ckpt_path, restore_error

FORMAT = "m2r2-moefied/1"
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


def moefy_params(cfg: ModelConfig, params: dict, perm, router, dense_layers=()) -> dict:
    """Dense params (numpy, model_spec layout) -> the MoE's params: the same tree with each MoE layer's
    mlp {router, gate, up, down}; layers in `dense_layers` keep their dense MLP. The input is not changed."""
    E = int(np.shape(router)[-1])
    layers = []
    for i, layer in enumerate(params["layers"]):
        layer = dict(layer)
        if i not in dense_layers:
            m = layer["mlp"]
            g, u, d = expert_weights(m["gate"], m["up"], m["down"], np.asarray(perm[i]), E)
            layer["mlp"] = {"router": np.asarray(router[i], np.float32), "gate": g, "up": u, "down": d}
        layers.append(layer)
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- the asset


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def save_moe_asset(path, perm, router, meta: dict) -> Path:
    """Write the asset (replacing one already at `path`)."""
    import shutil

    ocp = _ocp()
    p = Path(path).expanduser().absolute()
    if p.exists():
        shutil.rmtree(p)
    tree = {"perm": np.asarray(perm, np.int32), "router": np.asarray(router, np.float32)}
    with ocp.CheckpointManager(ckpt_path(p), options=ocp.CheckpointManagerOptions(create=True)) as mngr:
        mngr.save(
            STEP,
            args=ocp.args.Composite(
                moe=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave({"format": FORMAT, **meta})
            ),
        )
        mngr.wait_until_finished()
    return p


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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise M2R2Error(f"{path} is not an MoE asset ({FORMAT})")
    for k in ("experts", "top_k"):
        if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), int):
            raise M2R2Error(f"corrupt MoE asset metadata {f}: no integer {k!r}")
    if not isinstance(meta.get("base"), dict) or not isinstance(meta.get("dense_layers", []), list):
        raise M2R2Error(f"corrupt MoE asset metadata {f}: no 'base' object")
    return meta


def read_moe_asset(path, cfg: ModelConfig, base_fingerprint: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (perm [L, F] int32, router [L, D, E] float32, meta) of an asset made for this base (its
    fingerprint); a missing, corrupt or foreign asset is refused with one line."""
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
    abstract = {
        "perm": jax.ShapeDtypeStruct((L, F), np.int32),
        "router": jax.ShapeDtypeStruct((L, D, E), np.float32),
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
    bad = [i for i in range(L) if not np.array_equal(np.sort(perm[i]), np.arange(F))]
    if bad:
        raise M2R2Error(
            f"MoE asset {path}: the expert assignment of layers {bad[:4]} is not a permutation of the neurons"
        )
    if not np.isfinite(router).all():
        raise M2R2Error(f"MoE asset {path}: its routers hold non-finite values")
    return perm, router, meta


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
    perm, router, meta = read_moe_asset(asset_path(asset), cfg, params_fingerprint(dense, as_dtype="float32"))
    dense_layers = tuple(meta.get("dense_layers", []))
    mcfg = moe_config(cfg, meta["experts"], meta["top_k"] if top_k is None else int(top_k), dense_layers)
    params_np = moefy_params(cfg, dense, perm, router, dense_layers)
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
