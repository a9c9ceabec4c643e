"""A recorded expert-offload run on disk: record the routing traces once (the MoE model decoding on the
CPU: minutes), replay the sim mode's policies from the file as often as wanted (seconds, no model).

    FILE.npz    numeric arrays only (read back with np.load(allow_pickle=False)):
                needed [T, L, k], gate_pred [T, L, w], m2r2_pred [T, L, w], m2r2_avail [T, L] (ints),
                m2r2_probs [T, L, E] float16 (the fast stream's router softmax: the prediction's
                confidence), steps [P] decode steps per prompt, tokens [sum of P answers] and
                token_counts [P] (the generated tokens), plain_match [P] (1 / 0 / -1 = not checked),
                context [T] (each step's slot), measured_layer_ms [L], measured_ms [3] (begin, fast,
                finish: this CPU's mean per decode step)
    FILE.json   {"format", "settings": what the run was (model, dataset, limit, max_new_tokens, the
                fast stream's checkpoint identity, alignment, calibration, width, overrides),
                "npz_sha256": the npz's checksum, "recorded": what the run reported that the arrays do
                not hold (recall report, model shape for the projected compute, resident bytes)}

The gate and m2r2 arrays are absent from a run without them. A replay must ask for the same settings
(`check_settings`); a file that does not parse, fails its checksum or holds inconsistent arrays is
refused with one M2R2Error line. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from m2r2_jax.errors import M2R2Error
from m2r2_jax.offload import RoutingTrace

FORMAT = "m2r2-moe-trace/1"
SETTINGS = (
    "model",
    "dataset",
    "limit",
    "max_new_tokens",
    "checkpoint",
    "alignment",
    "calibration_set",
    "calibration",
    "width",
    "top_k_override",
    "asset_override",
)


@dataclasses.dataclass(frozen=True, eq=False)
class Recording:
    """What the sim mode needs of a recorded run (T decode steps over P prompts, L MoE layers)."""

    trace: RoutingTrace
    steps: tuple[int, ...]  # [P] decode steps per prompt (sum = T)
    tokens: tuple[tuple[int, ...], ...]  # [P] generated tokens (the first from prefill)
    plain_match: tuple[bool, ...] | None  # [P] host-driven decode == plain decode (None: not checked)
    context: np.ndarray  # int [T]
    measured_ms: dict  # begin, fast, finish (ms), layer [L] (ms): this CPU, float32
    settings: dict  # SETTINGS keys
    recorded: dict  # recall report, model shape, resident bytes (JSON-able)

    def __post_init__(self):
        T = self.trace.num_tokens
        if sum(self.steps) != T or len(self.tokens) != len(self.steps) or any(s < 1 for s in self.steps):
            raise M2R2Error(f"recording: steps {list(self.steps)} do not add up to the trace's {T} decode steps")
        if any(len(t) != s + 1 for t, s in zip(self.tokens, self.steps)):
            raise M2R2Error("recording: each prompt generates one token more than its decode steps")
        if self.plain_match is not None and len(self.plain_match) != len(self.steps):
            raise M2R2Error("recording: plain_match needs one entry per prompt")
        if np.shape(self.context) != (T,):
            raise M2R2Error(f"recording: context must be [T={T}], got {np.shape(self.context)}")
        if len(self.measured_ms.get("layer", ())) != self.trace.num_layers:
            raise M2R2Error(f"recording: measured layer times must be [L={self.trace.num_layers}]")


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _small_int(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    for dt in (np.int8, np.int16, np.int32):
        if a.size == 0 or (a.min() >= np.iinfo(dt).min and a.max() <= np.iinfo(dt).max):
            return a.astype(dt)
    return a.astype(np.int64)


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(path: Path, rec: Recording) -> tuple[Path, Path]:
    """Write `path` (.npz) and its .json sidecar; -> both paths."""
    path = Path(path)
    if path.suffix != ".npz":
        raise M2R2Error(f"trace file {path}: expected a .npz name (the settings go to {sidecar(path).name})")
    tr = rec.trace
    arrays = dict(
        needed=_small_int(tr.needed),
        steps=np.asarray(rec.steps, np.int32),
        tokens=np.asarray([t for toks in rec.tokens for t in toks], np.int32),
        token_counts=np.asarray([len(t) for t in rec.tokens], np.int32),
        plain_match=np.asarray([-1] * len(rec.steps) if rec.plain_match is None else rec.plain_match, np.int8),
        context=np.asarray(rec.context, np.int32),
        measured_layer_ms=np.asarray(rec.measured_ms["layer"], np.float64),
        measured_ms=np.asarray([rec.measured_ms[k] for k in ("begin", "fast", "finish")], np.float64),
    )
    if tr.gate_pred is not None:
        arrays["gate_pred"] = _small_int(tr.gate_pred)
    if tr.m2r2_pred is not None:
        arrays["m2r2_pred"] = _small_int(tr.m2r2_pred)
        arrays["m2r2_avail"] = _small_int(tr.m2r2_avail)
    if tr.m2r2_probs is not None:
        arrays["m2r2_probs"] = tr.m2r2_probs.astype(np.float16)  # the trace holds float16 values already
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    blob = buf.getvalue()
    meta = dict(
        format=FORMAT,
        settings=rec.settings,
        npz_sha256=_sha256(blob),
        num_experts=int(tr.num_experts),
        recorded=rec.recorded,
    )
    _atomic_write(path, blob)
    _atomic_write(sidecar(path), (json.dumps(meta, indent=1) + "\n").encode())
    return path, sidecar(path)


def read_settings(path: Path) -> dict:
    """The sidecar's JSON, checked for its format (cheap: no arrays are read)."""
    path, js = Path(path), sidecar(Path(path))
    if path.suffix != ".npz":
        raise M2R2Error(f"--trace-in {path}: expected a .npz file (with its settings in {js.name})")
    for f in (path, js):
        if not f.is_file():
            raise M2R2Error(f"--trace-in {path}: {f} not found")
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise M2R2Error(f"--trace-in {path}: corrupt settings file {js.name}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise M2R2Error(f"--trace-in {path}: {js.name} is not a trace settings file ({FORMAT}), got {got!r}")
    for key, typ in (("settings", dict), ("recorded", dict), ("npz_sha256", str), ("num_experts", int)):
        if not isinstance(meta.get(key), typ):
            raise M2R2Error(f"--trace-in {path}: corrupt settings file {js.name}: no valid {key!r}")
    missing = [k for k in SETTINGS if k not in meta["settings"]]
    if missing:
        raise M2R2Error(f"--trace-in {path}: corrupt settings file {js.name}: settings lack {', '.join(missing)}")
    return meta


def check_settings(path: Path, recorded: dict, requested: dict) -> None:
    """Refuse a replay whose requested settings differ from the recorded ones (first difference named)."""
    for key in SETTINGS:
        if key in requested and recorded.get(key) != requested[key]:
            raise M2R2Error(
                f"--trace-in {path}: recorded with {key}={recorded.get(key)!r}, this run asks for {requested[key]!r}"
            )


def load(path: Path, requested: dict | None = None) -> Recording:
    """Read a trace file pair back (`requested`: settings the replay asks for, checked first)."""
    path = Path(path)
    meta = read_settings(path)
    if requested is not None:
        check_settings(path, meta["settings"], requested)
    blob = path.read_bytes()
    if _sha256(blob) != meta["npz_sha256"]:
        raise M2R2Error(f"--trace-in {path}: corrupt file (its checksum differs from the one in {sidecar(path).name})")
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise M2R2Error(f"--trace-in {path}: corrupt file: {why}") from None
    need = ("needed", "steps", "tokens", "token_counts", "plain_match", "context", "measured_layer_ms", "measured_ms")
    missing = [k for k in need if k not in a]
    if missing:
        raise M2R2Error(f"--trace-in {path}: corrupt file: no {', '.join(missing)} array")
    try:
        trace = RoutingTrace(
            meta["num_experts"],
            a["needed"],
            gate_pred=a.get("gate_pred"),
            m2r2_pred=a.get("m2r2_pred"),
            m2r2_avail=a.get("m2r2_avail"),
            m2r2_probs=a.get("m2r2_probs"),
        )
        counts = a["token_counts"].tolist()
        if a["tokens"].ndim != 1 or sum(counts) != a["tokens"].size or min(counts, default=0) < 0:
            raise M2R2Error("tokens and token_counts disagree")
        ends = np.cumsum(counts)
        tokens = tuple(tuple(a["tokens"][e - n : e].tolist()) for n, e in zip(counts, ends))
        pm = a["plain_match"].tolist()
        m = a["measured_ms"].tolist()
        if len(m) != 3:
            raise M2R2Error("measured_ms must hold begin, fast, finish")
        return Recording(
            trace=trace,
            steps=tuple(a["steps"].tolist()),
            tokens=tokens,
            plain_match=None if any(x < 0 for x in pm) else tuple(bool(x) for x in pm),
            context=a["context"],
            measured_ms=dict(begin=m[0], fast=m[1], finish=m[2], layer=a["measured_layer_ms"].tolist()),
            settings=meta["settings"],
            recorded=meta["recorded"],
        )
    except M2R2Error as e:
        raise M2R2Error(f"--trace-in {path}: corrupt file: {e}") from None
