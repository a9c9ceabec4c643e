"""Early exit against the full model, in one run on the same prompts: per exit method and threshold,
wall-clock speed-up over our own AR decode (same backend), FLOPs-based speed-up, layers per token,
ROUGE-L against the full model's greedy output and against the dataset's reference answer, exact match.

Every prompt is the chat template over the item's first turn. For each prompt the plain AR loop runs
first, then every method at every threshold, back to back (compilation excluded: an executable is
compiled before its first timed call; the threshold is a jit argument, so one executable per method
and shape bucket serves the whole sweep).

speedup      = (method tokens / method seconds) / (AR tokens / AR seconds), summed over prompts
flops_speedup = AR weight MACs per token / the method's (decoding.early_exit.Costs)
layers_per_token: decoder layers run per decided token (fast-stream layers count as layers)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from m2r2_jax.backend import XLA, Backend
from m2r2_jax.data.eval_sets import EvalItem
from m2r2_jax.decoding.early_exit import Costs, DynamicDecoder, ExitMethod
from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.tokenizer import encode_chat

METHODS = ("m2r2", "m2r2_deferred", "static", "static_trained", "layerskip", "skipdecode", "calm", "specee")
DEFAULT_THRESHOLDS = {
    "m2r2": (0.6, 0.75, 0.85, 0.92, 0.97),
    "m2r2_deferred": (0.6, 0.75, 0.85, 0.92, 0.97),
    "static": (20, 24, 27, 29),
    "static_trained": (20, 24, 27, 29),  # must be layers the exit heads were trained for
    "layerskip": (20, 24, 27, 29),  # the exit layer E, on the LayerSkip-adapted weights
    "skipdecode": (8, 12, 16, 20),  # d_min, on the SkipDecode-adapted weights (peers/skipdecode.py)
    "calm": (0.8, 0.9, 0.95, 0.99),
    "specee": (0.5, 0.7, 0.85, 0.95),
}


@dataclasses.dataclass(frozen=True)
class DynamicEvalConfig:
    methods: tuple[str, ...] = ("m2r2", "static", "calm")
    thresholds: Any = None  # {method: (t, ...)}; None -> DEFAULT_THRESHOLDS
    max_new_tokens: int = 128
    max_pending: int = 4  # m2r2_deferred: exited tokens that may wait for exact K/V
    min_layer: int = 1  # m2r2: first fast layer (1-based) where a token may exit
    calm_checks: tuple[int, ...] = ()  # calm: check layers; () -> every 2nd layer from N/2
    exit_heads: str = ""  # static_trained: the exit heads' directory (train.train_exit_heads)
    specee: str = ""  # specee: the predictors' directory (train.train_specee)
    layerskip: str = ""  # layerskip: the adapters' directory (train.train_layerskip)
    skipdecode: str = ""  # skipdecode: the adapters' directory (train.train_skipdecode)

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise M2R2Error(f"unknown method(s) {bad or '(none)'}: choose from {', '.join(METHODS)}")
        th = dict(DEFAULT_THRESHOLDS)
        for k, v in (self.thresholds or {}).items():
            if k not in METHODS:
                raise M2R2Error(f"--thresholds {k}=...: unknown method (choose from {', '.join(METHODS)})")
            vals = tuple(v)
            if not vals or not all(isinstance(x, (int, float)) and np.isfinite(x) for x in vals):
                raise M2R2Error(f"--thresholds for {k} must be finite numbers, got {list(v)}")
            th[k] = vals
        object.__setattr__(self, "thresholds", {m: th[m] for m in self.methods})
        if "static_trained" in self.methods and not self.exit_heads:
            raise M2R2Error("static_trained needs --exit-heads DIR (trained by python -m train.train_exit_heads)")
        if "layerskip" in self.methods and not self.layerskip:
            raise M2R2Error("layerskip needs --layerskip DIR (trained by python -m train.train_layerskip)")
        if "skipdecode" in self.methods and not self.skipdecode:
            raise M2R2Error("skipdecode needs --skipdecode DIR (trained by python -m train.train_skipdecode)")
        if "specee" in self.methods and not self.specee:
            raise M2R2Error("specee needs --specee DIR (trained by python -m train.train_specee)")
        for name, lo in (("max_new_tokens", 1), ("max_pending", 1), ("min_layer", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise M2R2Error(f"{name} must be an integer >= {lo}, got {v!r}")


def build_methods(
    cfg, mc, ec: DynamicEvalConfig, backend: Backend = XLA, specee=None, skipdecode=None
) -> dict[str, DynamicDecoder]:
    """`specee`: the predictors' SpecEEConfig (its check layers and candidate count); `skipdecode`: the
    adapters' SkipDecodeConfig (its span)."""
    from m2r2_jax.decoding.early_exit import CalmExit, M2R2Exit, SkipDecodeExit, SpecEEExit, StaticExit

    N = cfg.num_layers
    out: dict[str, DynamicDecoder] = {}
    for name in ec.methods:
        if name in ("m2r2", "m2r2_deferred"):
            meth: ExitMethod = M2R2Exit(cfg, mc, min(ec.min_layer, mc.n_fast(N)), backend)
            kv = "deferred" if name == "m2r2_deferred" else "propagate"
        elif name == "specee":
            meth, kv = SpecEEExit(cfg, mc, tuple(specee.layers), specee.k, backend), "propagate"
        elif name == "layerskip":
            meth, kv = StaticExit(cfg, backend), "propagate"
        elif name == "skipdecode":
            meth, kv = SkipDecodeExit(cfg, skipdecode.span, backend), "propagate"
        elif name in ("static", "static_trained"):
            meth, kv = StaticExit(cfg, backend, trained=name == "static_trained"), "propagate"
        else:
            checks = ec.calm_checks or tuple(range(max(1, N // 2), N, 2))
            meth, kv = CalmExit(cfg, tuple(checks), backend), "propagate"
        out[name] = DynamicDecoder(cfg, meth, kv, ec.max_pending, backend)
    return out


def _rouge():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise M2R2Error("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"])


def run_dynamic_eval(
    m,
    bundle,
    items: Sequence[EvalItem],
    ec: DynamicEvalConfig,
    backend: Backend = XLA,
    decode_params=None,
    journal=None,
    resume: bool = False,
    progress: bool = True,
    journal_key: dict | None = None,
    peers: dict | None = None,
) -> dict:
    """m: a LoadedModel (cfg, params, tokenizer); bundle: spec_eval.M2R2Bundle (the checkpoint); peers:
    the trained peers' parts, {"static_trained": (heads, layers), "specee": (predictors, SpecEEConfig),
    "layerskip": (adapters, LayerSkipConfig), "skipdecode": (adapters, SkipDecodeConfig)}
    (training.peers.load_exit_heads / load_specee / load_layerskip / load_skipdecode)."""
    from tqdm import tqdm

    from m2r2_jax.evaluation.spec_eval import Journal

    cfg, tok = m.cfg, m.tokenizer
    params = m.params if decode_params is None else decode_params
    scorer = _rouge()
    peers = peers or {}
    for name in ("static_trained", "specee", "layerskip", "skipdecode"):
        if name in ec.methods and name not in peers:
            raise M2R2Error(f"{name}: its trained parts were not given (training.peers.load_* -> peers={{...}})")
    sp = peers.get("specee")
    sd = peers.get("skipdecode")
    decoders = build_methods(cfg, bundle.mc, ec, backend, sp[1] if sp else None, sd[1] if sd else None)
    prepared, weights = {}, {}
    for name, dec in decoders.items():
        if name.startswith("m2r2"):
            prepared[name] = (
                prepared.get("m2r2") or prepared.get("m2r2_deferred") or dec.method.prepare(params, bundle.params)
            )
        elif name == "calm":
            prepared[name] = dec.method.prepare(params, bundle.draft_ids)
        elif name == "specee":
            prepared[name] = dec.method.prepare(params, bundle.params, bundle.draft_ids, sp[0])
        elif name in ("layerskip", "skipdecode"):
            from m2r2_jax.peers.layerskip import merged_base

            ads, _ = peers[name]
            prepared[name] = None
            weights[name] = jax.jit(merged_base)(params, ads)  # the method runs on the adapted weights
        elif name == "static_trained":
            heads, layers = peers["static_trained"]
            bad = [t for t in ec.thresholds[name] if round(t) not in layers and round(t) < cfg.num_layers]
            if bad:
                raise M2R2Error(f"static_trained: no exit head for layer(s) {bad}; the heads cover {list(layers)}")
            prepared[name] = dec.method.prepare(params, heads, layers)
        else:
            prepared[name] = None
    gen = Generator(cfg, backend=backend)
    header = dict(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ec).items()},
        items=[it.id for it in items],
        key=journal_key or {},
        backend=backend.name,
    )
    jr = Journal(journal, header) if journal is not None else None
    done = jr.load().done if (jr is not None and resume and jr.path.exists()) else []
    rows: list[dict] = list(done)
    compile_s = 0.0
    todo = list(enumerate(items))[len(done) :]
    for i, it in tqdm(todo, desc="early exit", disable=not progress, initial=len(done), total=len(items)):
        ids = encode_chat(tok, [{"role": "user", "content": it.turns[0]}])
        ar = gen.generate(params, [ids], GenerateConfig(max_new_tokens=ec.max_new_tokens))
        if ar.compile_seconds:  # the first call of a bucket compiled: time it again
            compile_s += ar.compile_seconds
            ar = gen.generate(params, [ids], GenerateConfig(max_new_tokens=ec.max_new_tokens))
        ar_ids = ar.new_ids[0]
        ar_text = tok.decode(ar_ids, skip_special_tokens=True)
        ar_ref = scorer.score(it.reference, ar_text)["rougeL"].fmeasure if it.reference else None
        rec = dict(
            batch=i,
            id=it.id,
            category=it.category,
            ar=dict(tokens=len(ar_ids), seconds=ar.decode_seconds, rouge_l_ref=ar_ref),
            runs={},
        )
        for name, dec in decoders.items():
            rec["runs"][name] = []
            for thr in ec.thresholds[name]:
                r = dec.generate(weights.get(name, params), prepared[name], [ids], thr, ec.max_new_tokens)
                compile_s += r.compile_seconds
                out = r.new_ids[0]
                text = tok.decode(out, skip_special_tokens=True)
                rec["runs"][name].append(
                    dict(
                        threshold=thr,
                        tokens=len(out),
                        seconds=r.decode_seconds,
                        decided=r.tokens[0],
                        exits=r.exits[0],
                        layers=r.layers[0],
                        macs=r.macs[0],
                        exact=out == ar_ids,
                        rouge_l=scorer.score(ar_text, text)["rougeL"].fmeasure,
                        rouge_l_ref=scorer.score(it.reference, text)["rougeL"].fmeasure if it.reference else None,
                    )
                )
        if jr is not None:
            jr.append(rec)
        rows.append(rec)
    return summarize(cfg, ec, rows, compile_s)


# the trained peers' methods -> the DynamicEvalConfig field naming their run dir
PEER_DIRS = {"static_trained": "exit_heads", "specee": "specee", "layerskip": "layerskip", "skipdecode": "skipdecode"}


def training_budgets(ec: DynamicEvalConfig, m2r2_meta: dict | None = None) -> dict:
    """Per method: {trainable_params, train_minutes, steps_run, budget_minutes}. A trained peer's come
    from its newest checkpoint's metadata (peers/budget.py); M2R2's from its checkpoint's meta (minutes
    where it records them); the untrained methods' are 0."""
    from m2r2_jax.peers.budget import BUDGET_FIELDS, read_budget

    out = {}
    for name in ec.methods:
        if name in PEER_DIRS:
            out[name] = read_budget(getattr(ec, PEER_DIRS[name]))
        elif name.startswith("m2r2"):
            meta = m2r2_meta or {}
            out[name] = dict(dict.fromkeys(BUDGET_FIELDS), steps_run=meta.get("step"))
            out[name].update({k: meta[k] for k in ("trainable_params", "train_minutes") if k in meta})
        else:
            out[name] = dict(trainable_params=0, train_minutes=0.0, steps_run=0, budget_minutes=None)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def summarize(cfg, ec: DynamicEvalConfig, rows: list[dict], compile_s: float = 0.0) -> dict:
    cost = Costs.of(cfg)
    ar_tok = sum(r["ar"]["tokens"] for r in rows)
    ar_s = sum(r["ar"]["seconds"] for r in rows)
    ar_tps = ar_tok / ar_s if ar_s else None
    methods = {}
    for name, ths in ec.thresholds.items():
        pts = []
        for k, thr in enumerate(ths):
            runs = [r["runs"][name][k] for r in rows]
            tok = sum(x["tokens"] for x in runs)
            sec = sum(x["seconds"] for x in runs)
            dec = sum(x["decided"] for x in runs)
            tps = tok / sec if sec else None
            pts.append(
                dict(
                    threshold=thr,
                    speedup=(tps / ar_tps) if (tps and ar_tps) else None,
                    flops_speedup=(cost.ar(cfg) * dec / sum(x["macs"] for x in runs)) if dec else None,
                    layers_per_token=sum(x["layers"] for x in runs) / dec if dec else None,
                    exit_rate=sum(x["exits"] for x in runs) / dec if dec else None,
                    rouge_l=_mean([x["rouge_l"] for x in runs]),
                    rouge_l_ref=_mean([x["rouge_l_ref"] for x in runs]),
                    exact_match=_mean([float(x["exact"]) for x in runs]),
                    tokens_per_second=tps,
                )
            )
        methods[name] = pts
    return dict(
        methods=methods,
        ar=dict(
            tokens_per_second=ar_tps,
            layers_per_token=float(cfg.num_layers),
            rouge_l_ref=_mean([r["ar"]["rouge_l_ref"] for r in rows]),
        ),
        prompts=len(rows),
        compile_seconds=compile_s,
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(ec).items()},
        definitions=dict(
            speedup="(method tokens / method seconds) / (AR tokens / AR seconds), summed over prompts, same run",
            flops_speedup="AR weight multiply-accumulates per token / the method's (attention over the context "
            "excluded; includes the fast stream, exit heads, K/V propagation, deferred recomputation)",
            rouge_l="mean ROUGE-L F1 (rouge-score) of the decoded output against the full model's greedy output",
            rouge_l_ref="... against the dataset's reference answer (items that have one)",
            exact_match="share of prompts whose output equals the full model's token for token",
        ),
    )


def render_png(res: dict, title: str = "") -> bytes:
    """ROUGE-L against the full model vs wall-clock speed-up, one line per method."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, pts in res["methods"].items():
        pts = [p for p in pts if p["speedup"] is not None and p["rouge_l"] is not None]
        ax.plot([p["speedup"] for p in pts], [p["rouge_l"] for p in pts], "o-", label=name)
        for p in pts:
            ax.annotate(
                f"{p['threshold']:g}",
                (p["speedup"], p["rouge_l"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("wall-clock speed-up over AR (same run)")
    ax.set_ylabel("ROUGE-L vs the full model's output")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def envelope(points: Sequence[dict], s: float) -> float | None:
    """The best ROUGE-L a method reaches at a speed-up of at least s (its upper envelope), None if it
    never runs that fast."""
    got = [
        p["rouge_l"] for p in points if p.get("speedup") is not None and p["speedup"] >= s and p["rouge_l"] is not None
    ]
    return max(got) if got else None


def claim_check(res: dict, ours: Sequence[str] = ("m2r2", "m2r2_deferred")) -> dict:
    """The paper's claim on one result: at the speed-ups each peer reaches, M2R2's ROUGE-L against the
    full model's output is higher. M2R2's curve is the upper envelope over `ours` (both K/V modes); at
    each peer point (s, r) M2R2 scores envelope(s) (None = M2R2 never runs as fast: a loss). A peer is
    beaten when M2R2 is higher at every one of its points.
    -> {"peers": {name: {"points", "m2r2_higher", "beaten"}}, "all_beaten": bool}."""
    mine = [p for name in ours for p in res["methods"].get(name, [])]
    if not mine:
        raise M2R2Error(f"claim check: the result has none of the M2R2 methods {list(ours)}")
    peers = {}
    for name, pts in res["methods"].items():
        if name in ours:
            continue
        cmp = []
        for p in pts:
            if p.get("speedup") is None or p.get("rouge_l") is None:
                continue
            m = envelope(mine, p["speedup"])
            cmp.append(dict(threshold=p["threshold"], speedup=p["speedup"], rouge_l=p["rouge_l"], m2r2_rouge_l=m))
        higher = sum(1 for c in cmp if c["m2r2_rouge_l"] is not None and c["m2r2_rouge_l"] > c["rouge_l"])
        peers[name] = dict(points=cmp, m2r2_higher=higher, beaten=bool(cmp) and higher == len(cmp))
    return dict(peers=peers, all_beaten=bool(peers) and all(v["beaten"] for v in peers.values()))


def merge_results(results: Sequence[tuple[str, dict]]) -> dict:
    """Several eval.dynamic results on the same prompts (e.g. the training-free methods first, the trained
    peers once trained) -> one result whose `methods` hold them all, each method's points kept as measured
    in its own run against that run's AR decode. `results`: (name, result) pairs. They must agree on the
    model, dataset, limit, prompts and max_new_tokens; a method in two of them is refused. `sources` says
    which file, checkpoint, machine and AR speed each method comes from."""
    if not results:
        raise M2R2Error("merge: no results")
    same = ("model", "dataset", "limit", "max_new_tokens")
    first_name, first = results[0]
    out = dict(first, methods={}, budgets={}, sources={})
    for name, res in results:
        cfg = res.get("config") or {}
        for k in same:
            if cfg.get(k) != (first.get("config") or {}).get(k):
                raise M2R2Error(
                    f"merge: {name} has {k}={cfg.get(k)!r}, {first_name} {(first.get('config') or {}).get(k)!r}"
                )
        if res.get("prompts") != first.get("prompts"):
            raise M2R2Error(f"merge: {name} has {res.get('prompts')} prompts, {first_name} {first.get('prompts')}")
        for method, pts in res["methods"].items():
            if method in out["methods"]:
                raise M2R2Error(f"merge: method {method!r} is in both {out['sources'][method]['file']} and {name}")
            out["methods"][method] = pts
            if method in (res.get("budgets") or {}):
                out["budgets"][method] = res["budgets"][method]
            m = res.get("machine") or {}
            out["sources"][method] = dict(
                file=name,
                checkpoint=cfg.get("checkpoint"),
                train_step=cfg.get("train_step"),
                ar_tokens_per_second=(res.get("ar") or {}).get("tokens_per_second"),
                processor=m.get("processor"),
                date=m.get("date"),
            )
    return out
