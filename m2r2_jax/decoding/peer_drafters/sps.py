"""2-model speculative decoding in the shared loop: a small draft model (peers/sps.py: the project's decoder
at n layers, distilled from the base) drafts a chain of `gamma` tokens greedily; the base verifies it.

The small model is a separate model with its own KV cache, the drafter's carried state (shadow.py): its
own prefill of the prompt after the base's (inside the timed loop), then each step a catch-up block (the
tokens accepted last step and `cur`, written at their positions) and the chain, each chain token written
into its cache at its position; after verification the cache's valid length becomes pos + 1, so what the
chain wrote past the accepted prefix is masked and overwritten by the next catch-up (rolled back).
Acceptance is the loop's (greedy, or rejection sampling of the one-hot draft tokens: exact at any
temperature). `threshold` > 0 adds a confidence stop (off by default, as in plain SpS).
"""

from __future__ import annotations

import dataclasses

from m2r2_jax import kernels as K
from m2r2_jax.backend import XLA, Backend
from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.peer_drafters.shadow import ShadowChain, check_chain_knobs
from m2r2_jax.errors import M2R2Error
from m2r2_jax.model import decoder as D
from m2r2_jax.model import layers as L
from m2r2_jax.peers.sps import draft_config, draft_model

_MATMULS = {"attn": ("wq", "wk", "wv", "wo"), "mlp": ("gate", "up", "down")}


@dataclasses.dataclass(frozen=True, eq=True)
class Sps(ShadowChain):
    cfg: ModelConfig  # the base's
    num_layers: int = 3  # the draft model's
    max_steps: int = 4  # gamma
    threshold: float = 0.0
    backend: Backend = XLA

    def __post_init__(self):
        if not 1 <= self.num_layers <= self.cfg.num_layers:
            raise M2R2Error(f"sps: draft model layers must be in [1, {self.cfg.num_layers}], got {self.num_layers}")
        check_chain_knobs("sps", self.max_steps, self.threshold)

    @property
    def dcfg(self) -> ModelConfig:
        return draft_config(self.cfg, self.num_layers)

    @property
    def kinds(self):
        return ("sps",)

    def prepare(self, base, trained):
        """{"small": the draft model's param tree (the base's embedding and head), laid out for the backend}."""
        small = draft_model(self.cfg, base, trained)
        if self.backend.kernels:
            layers = []
            for lp in small["layers"]:
                lp = {k: (dict(x) if isinstance(x, dict) else x) for k, x in lp.items()}
                for blk, names in _MATMULS.items():
                    for n in names:
                        lp[blk][n] = K.pack(L.dense(lp[blk][n]))
                layers.append(lp)
            head = base.get("lm_head")
            if not isinstance(head, K.PackedWeight):
                head = K.pack(head) if head is not None else K.pack_rows(base["embed"])
            small = dict(small, layers=layers, lm_head=head)
        return {"small": small}

    def shadow_shape(self, B: int, S: int):
        c = self.dcfg
        return c.num_layers, (B, c.num_kv_heads, S, c.head_dim)

    def catch_up(self, dparams, base, cache, k, v, toks, start):
        h, kv, _ = D.forward_hidden(self.dcfg, dparams["small"], toks, D.KVCache(k, v), start, backend=self.backend)
        return kv.k, kv.v, h, None

    def logits(self, dparams, base, h):
        return D.logits_from_hidden(self.dcfg, dparams["small"], h)

    def chain_step(self, dparams, base, view, k, v, local, tok, d: int):
        h, kv, _ = D.forward_hidden(
            self.dcfg, dparams["small"], tok, D.KVCache(k, v), view.pos + d, backend=self.backend
        )
        return h, kv.k, kv.v, None
