"""2-model speculative decoding (SpS; Leviathan et al. 2023, Chen et al. 2023): a small draft model of the
base's family, here made from the base and distilled to it.

The draft model is the project's own decoder (model/) at `ModelConfig(num_layers=n)`: the base's config
with n layers, initialised from n evenly spaced base layers (the first and the last among them) and the
base's final norm, sharing the base's token embedding and tied LM head (frozen: the same tokenizer and
vocabulary, and the embedding is 28M of SmolLM2's 135M parameters). Its layers and final norm are trained
with KL(full || draft) on the self-distilled answers (base frozen). It runs as a separate model with its
own KV cache (decoding/peer_drafters/sps.py).

    draft params   layers [n] (the base layer layout), final_norm [embed]  (+ embed / lm_head from the base)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2r2_jax.config import ModelConfig
from m2r2_jax.errors import M2R2Error
from m2r2_jax.m2r2 import stream as S
from m2r2_jax.model import decoder as D
from m2r2_jax.model.params import model_spec
from m2r2_jax.peers import common as C
from m2r2_jax.peers.draft_checkpoint import load_draft

KIND = "sps"


@dataclasses.dataclass(frozen=True)
class SPSConfig:
    num_layers: int = 3
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    positions: int = 160
    lr: float = 3e-4
    seed: int = 0

    def __post_init__(self):
        C.check_run(self, ("num_layers", "steps", "batch_size", "seq_len", "positions"), KIND, lr_max=1)

    def check(self, cfg: ModelConfig) -> None:
        if not 1 <= self.num_layers <= cfg.num_layers:
            raise M2R2Error(
                f"sps: the draft model's num_layers must be in [1, {cfg.num_layers}], got {self.num_layers}"
            )
        if cfg.mlp_type != "dense":
            raise M2R2Error(f"sps: a draft model from a {cfg.mlp_type} base is not implemented")

    def source_layers(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The base layers the draft model's layers start from: evenly spaced, first and last included."""
        return tuple(int(i) for i in np.round(np.linspace(0, cfg.num_layers - 1, self.num_layers)))


def draft_config(cfg: ModelConfig, n: int) -> ModelConfig:
    return dataclasses.replace(cfg, num_layers=n)


def init_draft(cfg: ModelConfig, base: dict, sc: SPSConfig) -> dict:
    """The trainable part: copies of the source layers and of the final norm."""
    sc.check(cfg)
    return C.copy_dense(
        {"layers": [base["layers"][j] for j in sc.source_layers(cfg)], "final_norm": base["final_norm"]}
    )


def draft_spec(cfg: ModelConfig, n: int) -> dict:
    """The trainable part's abstract params, from the model's own spec at n layers."""
    spec = model_spec(draft_config(cfg, n))
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), spec, is_leaf=lambda s: hasattr(s, "axes")
    )
    return {"layers": abstract["layers"], "final_norm": abstract["final_norm"]}


def draft_model(cfg: ModelConfig, base: dict, trained: dict) -> dict:
    """The draft model's full param tree (the project's layout at n layers): the trained layers and final
    norm, the base's embedding and LM head."""
    out = {"embed": base["embed"], "layers": list(trained["layers"]), "final_norm": trained["final_norm"]}
    if "lm_head" in base:
        out["lm_head"] = base["lm_head"]
    return out


def draft_logits(dcfg: ModelConfig, params: dict, tokens, select):
    """A model (the draft model, or the base) over whole sequences (causal), logits at `select` [B, M]
    -> f32 [B, M, V]."""
    B, T = tokens.shape
    h, _, _ = D.forward_hidden(dcfg, params, tokens, D.init_cache(dcfg, B, T), jnp.zeros((B,), jnp.int32))
    return D.logits_from_hidden(dcfg, params, S.gather_positions(h, select))


def optimizer(sc: SPSConfig) -> optax.GradientTransformation:
    return C.optimizer(sc, clip=True)


def make_step(cfg: ModelConfig, sc: SPSConfig, opt):
    """-> step(trained, opt_state, base, tokens, mask) -> (trained, opt_state, kl, soft_ce, top1)."""
    dcfg = draft_config(cfg, sc.num_layers)

    def loss_fn(tr, base, tokens, mask):
        sel, m = S.loss_positions(mask, min(sc.positions, tokens.shape[1]))
        full = jax.lax.stop_gradient(draft_logits(cfg, base, tokens, sel))  # the full model, same function
        draft = draft_logits(dcfg, draft_model(cfg, jax.lax.stop_gradient(base), tr), tokens, sel)
        ce, kl, agree = C.soft_ce(full, draft, m)
        return kl, (ce, agree)

    return C.train_step(loss_fn, opt)


def load_sps(path, cfg: ModelConfig, base: dict | None = None) -> tuple[dict, SPSConfig, dict]:
    """A trained small model's own part (layers, final norm) -> (params, its config, meta). With `base`,
    a checkpoint trained on another base model is refused (one line)."""
    return load_draft(path, KIND, SPSConfig, cfg, base, lambda sc: draft_spec(cfg, sc.num_layers))
