"""`--drafter NAME` and its knobs: one registry, validated in one place.

Each drafter's options are a frozen dataclass (validated in __post_init__, one error line each) with
  name, needs_m2r2      its `--drafter` name; whether it drafts with a trained M2R2 checkpoint
  drafter(cfg, mc, backend) -> Drafter
  prepare(spec, base, m2r2) -> its jit argument (via `SpeculativeDecoder.prepare`)
  describe() -> its knobs, for the result's config and the journal header
`DRAFTERS` maps the name to (options class, {knob: field}); `KNOBS` declares the peers' command-line
knobs (the M2R2 ones live in eval.speculative as before). A new drafter is one options class, one
DRAFTERS entry and its KNOBS.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.decoding.drafters import DraftOptions, PromptLookup
from m2r2_jax.decoding.peer_drafters.draft_verify import DraftVerify, check_knobs, parse_layers
from m2r2_jax.decoding.peer_drafters.eagle import Eagle2Options, EagleOptions
from m2r2_jax.decoding.peer_drafters.lookahead import Lookahead
from m2r2_jax.decoding.peer_drafters.medusa import MedusaOptions
from m2r2_jax.decoding.peer_drafters.rest import Datastore, Rest
from m2r2_jax.decoding.peer_drafters.trained import KangarooOptions, SpsOptions
from m2r2_jax.errors import M2R2Error


class _Peer:
    needs_m2r2 = False

    def sources(self) -> tuple:
        return ()

    def prepare(self, spec, base, m2r2=None) -> Any:
        return spec.prepare(base, *self.sources())

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PLDOptions(_Peer):
    """Prompt lookup alone: the `k` tokens after the latest earlier occurrence of the last n-gram."""

    k: int = 4
    ngram: int = 3
    min_ngram: int = 2
    name = "pld"

    def __post_init__(self):
        self.drafter(None)

    def drafter(self, cfg, mc=None, backend: Backend = XLA):
        return PromptLookup(self.k, self.ngram, self.min_ngram)


def default_skip(num_layers: int) -> tuple[int, ...]:
    """Every other layer of the upper half, the last layer kept (it shapes the logits most)."""
    return tuple(range(num_layers // 2, num_layers - 1, 2))


@dataclasses.dataclass(frozen=True)
class DraftVerifyOptions(_Peer):
    """skip: the skipped layers ("3,5,7", "10-19", a list, or search_skip's JSON; None: `default_skip`);
    or exit_layer E: skip every layer from E on. k: max draft length; threshold: the confidence stop."""

    skip: Any = None
    exit_layer: int | None = None
    k: int = 5
    threshold: float = 0.5
    name = "draft_verify"

    def __post_init__(self):
        if self.skip is not None and self.exit_layer is not None:
            raise M2R2Error("draft_verify: give skip layers or an exit layer, not both")
        if self.skip is not None:  # the syntax now; the range once the model's depth is known
            object.__setattr__(self, "skip", parse_layers(self.skip, 1 << 30))
        e = self.exit_layer
        if e is not None and (isinstance(e, bool) or not isinstance(e, int) or e < 1):
            raise M2R2Error(f"draft_verify: exit layer must be an integer >= 1, got {e!r}")
        check_knobs(self.k, self.threshold)

    def drafter(self, cfg, mc=None, backend: Backend = XLA) -> DraftVerify:
        kw = dict(k=self.k, threshold=self.threshold, backend=backend)
        if self.exit_layer is not None:
            return DraftVerify.exit_at(cfg, self.exit_layer, **kw)
        skip = default_skip(cfg.num_layers) if self.skip is None else parse_layers(list(self.skip), cfg.num_layers)
        return DraftVerify(cfg, skip, **kw)

    def describe(self) -> dict:
        return dict(dataclasses.asdict(self), skip=None if self.skip is None else list(self.skip))


@dataclasses.dataclass(frozen=True)
class LookaheadOptions(_Peer):
    """Window W, n-gram size N, guess-set size G (a 1 + (W + G)(N - 1)-node verification block)."""

    window: int = 5
    ngram: int = 4
    guesses: int = 5
    name = "lookahead"

    def __post_init__(self):
        self.drafter(None)

    def drafter(self, cfg, mc=None, backend: Backend = XLA) -> Lookahead:
        return Lookahead(cfg.vocab_size if cfg is not None else 1, self.window, self.ngram, self.guesses)


@functools.lru_cache(maxsize=4)
def _datastore(path: str, key_len: int, limit: int | None) -> Datastore:
    return Datastore.from_distill_cache(path, key_len, limit)


@dataclasses.dataclass(frozen=True)
class RestOptions(_Peer):
    """datastore: a self-distillation cache directory (its answers are the corpus; the first `limit`);
    tree: the template (a preset or JSON file); suffixes of max_ngram down to min_ngram tokens;
    `candidates` continuations retrieved per step."""

    datastore: str | None = None
    tree: Any = "tree16"
    max_ngram: int = 8
    min_ngram: int = 2
    candidates: int = 32
    limit: int | None = None
    name = "rest"

    def __post_init__(self):
        if not self.datastore:
            raise M2R2Error("rest: a datastore is required (a self-distillation cache directory, --rest-datastore)")
        from m2r2_jax.distill_cache import read_manifest

        if not Path(self.datastore).is_dir() or read_manifest(self.datastore) is None:
            raise M2R2Error(f"rest: no self-distillation cache at {self.datastore}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise M2R2Error(f"rest: datastore limit must be an integer >= 1, got {self.limit!r}")
        object.__setattr__(self, "tree", self.drafter(None).tree)

    def drafter(self, cfg, mc=None, backend: Backend = XLA) -> Rest:
        return Rest(self.tree, self.max_ngram, self.min_ngram, self.candidates)

    def sources(self) -> tuple:
        return (_datastore(str(Path(self.datastore).resolve()), self.drafter(None).key_len, self.limit),)

    def describe(self) -> dict:
        return dict(dataclasses.asdict(self), tree=self.tree.name)


@dataclasses.dataclass(frozen=True)
class Knob:
    dest: str  # the argparse dest (`--dest-with-dashes`)
    type: type
    help: str


# name -> (options class, {knob: field}); m2r2's knobs are eval.speculative's existing flags
DRAFTERS: dict[str, tuple[type, dict[str, str]]] = {
    "m2r2": (
        DraftOptions,
        {
            "tree": "tree",
            "draft_layers": "draft_layers",
            "lookup": "lookup",
            "lookup_ngram": "lookup_ngram",
            "lookup_min_ngram": "lookup_min_ngram",
            "lookup_extend": "extend",
            "draft_stop": "draft_stop",
            "draft_dtype": "draft_dtype",
        },
    ),
    "pld": (PLDOptions, {"lookup": "k", "lookup_ngram": "ngram", "lookup_min_ngram": "min_ngram"}),
    "draft_verify": (
        DraftVerifyOptions,
        {"skip_layers": "skip", "exit_layer": "exit_layer", "dv_max_draft": "k", "dv_threshold": "threshold"},
    ),
    "lookahead": (LookaheadOptions, {"la_window": "window", "la_ngram": "ngram", "la_guesses": "guesses"}),
    "rest": (
        RestOptions,
        {
            "rest_datastore": "datastore",
            "rest_tree": "tree",
            "rest_max_ngram": "max_ngram",
            "rest_min_ngram": "min_ngram",
            "rest_candidates": "candidates",
            "rest_limit": "limit",
        },
    ),
    "medusa": (
        MedusaOptions,
        {
            "medusa_checkpoint": "checkpoint",
            "medusa_tree": "tree",
            "lookup": "lookup",
            "lookup_ngram": "lookup_ngram",
            "lookup_min_ngram": "lookup_min_ngram",
        },
    ),
    "eagle": (
        EagleOptions,
        {
            "eagle_checkpoint": "checkpoint",
            "eagle_tree": "tree",
            "lookup": "lookup",
            "lookup_ngram": "lookup_ngram",
            "lookup_min_ngram": "lookup_min_ngram",
        },
    ),
    "eagle2": (
        Eagle2Options,
        {
            "eagle_checkpoint": "checkpoint",
            "eagle2_topk": "topk",
            "eagle2_depth": "depth",
            "eagle2_nodes": "nodes",
            "lookup": "lookup",
            "lookup_ngram": "lookup_ngram",
            "lookup_min_ngram": "lookup_min_ngram",
        },
    ),
    "kangaroo": (
        KangarooOptions,
        {
            "kangaroo_checkpoint": "checkpoint",
            "kangaroo_max_draft": "max_steps",
            "kangaroo_threshold": "threshold",
            "lookup": "lookup",
            "lookup_ngram": "lookup_ngram",
            "lookup_min_ngram": "lookup_min_ngram",
        },
    ),
    "sps": (
        SpsOptions,
        {
            "sps_checkpoint": "checkpoint",
            "sps_gamma": "max_steps",
            "sps_threshold": "threshold",
            "lookup": "lookup",
            "lookup_ngram": "lookup_ngram",
            "lookup_min_ngram": "lookup_min_ngram",
        },
    ),
}

KNOBS = (
    Knob(
        "skip_layers",
        str,
        "draft_verify: layers the draft skips, e.g. 15,17,19 or 15-27 or a JSON file "
        "from eval.search_skip (default: every other layer of the upper half, the last kept)",
    ),
    Knob("exit_layer", int, "draft_verify: draft with the first E layers only (LayerSkip's exit, untrained)"),
    Knob("dv_max_draft", int, "draft_verify: max draft chain length (default 5)"),
    Knob("dv_threshold", float, "draft_verify: stop drafting below this top-1 probability (default 0.5; 0 = never)"),
    Knob("la_window", int, "lookahead: Jacobi window W (default 5)"),
    Knob("la_ngram", int, "lookahead: n-gram size N (default 4)"),
    Knob("la_guesses", int, "lookahead: guesses verified per step G (default 5)"),
    Knob("rest_datastore", str, "rest: self-distillation cache directory whose answers are the datastore"),
    Knob("rest_tree", str, "rest: template draft tree, a preset or JSON file (default tree16)"),
    Knob("rest_max_ngram", int, "rest: longest context suffix matched (default 8)"),
    Knob("rest_min_ngram", int, "rest: shortest context suffix matched (default 2)"),
    Knob("rest_candidates", int, "rest: continuations retrieved per step (default 32)"),
    Knob("rest_limit", int, "rest: use the first N answers of the cache (default all)"),
    Knob("medusa_checkpoint", str, "medusa: the trained heads (train.train_medusa's --out)"),
    Knob("medusa_tree", str, "medusa: static tree, a preset or JSON file of rank paths (default medusa20)"),
    Knob("eagle_checkpoint", str, "eagle, eagle2: the trained draft layer (train.train_eagle's --out)"),
    Knob("eagle_tree", str, "eagle: static tree, a preset or JSON file of rank paths (default tree16)"),
    Knob("eagle2_topk", int, "eagle2: children expanded per frontier node, and the frontier's width (default 4)"),
    Knob("eagle2_depth", int, "eagle2: draft tree depth (default 4)"),
    Knob("eagle2_nodes", int, "eagle2: drafted nodes kept for verification, by cumulative score (default 15)"),
    Knob("kangaroo_checkpoint", str, "kangaroo: the trained adapter (train.train_kangaroo's --out)"),
    Knob("kangaroo_max_draft", int, "kangaroo: max draft chain length (default 6)"),
    Knob("kangaroo_threshold", float, "kangaroo: stop drafting below this top-1 probability (default 0.6)"),
    Knob("sps_checkpoint", str, "sps: the distilled draft model (train.train_sps's --out)"),
    Knob("sps_gamma", int, "sps: draft tokens per step (default 4)"),
    Knob("sps_threshold", float, "sps: stop drafting below this top-1 probability (default 0 = never)"),
)


def draft_options(name: str, **knobs):
    """The options of drafter `name` from its knobs (None = not given: the default). A knob of another
    drafter is refused, so a mistyped combination never silently does nothing."""
    if name not in DRAFTERS:
        raise M2R2Error(f"unknown drafter {name!r}; choose from {', '.join(DRAFTERS)}")
    cls, fields = DRAFTERS[name]
    given = {k: v for k, v in knobs.items() if v is not None}
    for k in given:
        if k not in fields:
            owners = [n for n, (_, f) in DRAFTERS.items() if k in f]
            where = f"--drafter {'/'.join(owners)}" if owners else "no drafter"
            raise M2R2Error(f"--{k.replace('_', '-')} applies to {where}, not --drafter {name}")
    return cls(**{fields[k]: v for k, v in given.items()})


def add_drafter_args(p) -> None:
    """--drafter and the peers' knobs (argparse; every default None = the options' own default)."""
    p.add_argument(
        "--drafter",
        default="m2r2",
        help=f"what drafts: {', '.join(DRAFTERS)} (default m2r2: the trained fast stream, with --lookup; "
        "pld: prompt lookup alone; the others are training-free peers)",
    )
    for k in KNOBS:
        p.add_argument("--" + k.dest.replace("_", "-"), dest=k.dest, type=k.type, default=None, help=k.help)
