"""Bad input, CLI by CLI, as a table: every case exits 2 with exactly one `error:` line on stderr, no
traceback, and nothing created or changed on disk. Each case runs as a real process (the interpreter's
teardown included). Then property tests of the parsers with hypothesis."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2r2_jax.errors import M2R2Error

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "m2r2_jax" / "assets" / "smollm2-135m-r3"


def _files(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


def _write(path: Path, data) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _meta_ckpt(tmp: Path, edit) -> Path:
    """A copy of the shipped checkpoint's step dir (arrays linked, metadata edited)."""
    src = CKPT / "920"
    dst = tmp / "ck" / "920"
    meta_file = src / "meta" / "metadata"
    for f in src.rglob("*"):
        t = dst / f.relative_to(src)
        if f.is_dir():
            t.mkdir(parents=True, exist_ok=True)
        elif f != meta_file:
            t.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, t)
    meta = json.loads(meta_file.read_text())
    edit(meta)
    (dst / "meta" / "metadata").write_text(json.dumps(meta))
    return tmp / "ck"


def _drop_step(m):
    del m["step"]


def _other_base(m):
    m["base"]["config"]["vocab_size"] = 1234


SPEC = ["-m", "eval.speculative", "--limit", "1", "--no-progress"]
GEN = ["-m", "eval.generate", "--prompt", "hi"]
TRAIN = ["-m", "train.train", "--no-progress"]
DYN = ["-m", "eval.dynamic", "--limit", "1", "--no-progress"]
HEADS = ["-m", "train.train_exit_heads", "--distill-dir", "{tmp}/none", "--out", "{tmp}/heads", "--no-progress"]

# (id, argv, inputs {name: content or callable(tmp) -> path}, expected text in the error line)
CASES = [
    ("gen-temperature-negative", GEN + ["--temperature", "-1"], {}, "temperature"),
    ("gen-temperature-nan", GEN + ["--temperature", "nan"], {}, "temperature"),
    ("gen-top-p-2", GEN + ["--top-p", "2"], {}, "top_p"),
    ("gen-top-p-0", GEN + ["--top-p", "0"], {}, "top_p"),
    ("gen-top-k-negative", GEN + ["--top-k", "-5"], {}, "top_k"),
    ("gen-max-new-0", GEN + ["--max-new-tokens", "0"], {}, "max_new_tokens"),
    ("gen-cache-len-0", GEN + ["--cache-len", "0"], {}, "cache_len"),
    ("gen-missing-gguf", ["-m", "eval.generate", "--prompt", "hi", "--model", "{tmp}/none.gguf"], {}, "not found"),
    (
        "gen-hf-config-no-hidden",
        ["-m", "eval.generate", "--prompt", "hi", "--model", "{tmp}/hf"],
        {"hf/config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10})},
        "hidden_size",
    ),
    (
        "gen-hf-config-list",
        ["-m", "eval.generate", "--prompt", "hi", "--model", "{tmp}/hf"],
        {"hf/config.json": "[1, 2]"},
        "JSON object",
    ),
    ("gen-prompt-not-utf8", ["-m", "eval.generate", "--prompt", b"caf\xe9 \xff"], {}, "UTF-8"),
    ("spec-temperature-nan", SPEC + ["--temperature", "nan"], {}, "temperature"),
    ("spec-batch-0", SPEC + ["--batch-size", "0"], {}, "batch_size"),
    ("spec-limit-0", SPEC[:2] + ["--limit", "0"], {}, "--limit"),
    ("spec-lookup-negative", SPEC + ["--lookup", "-1"], {}, "lookup"),
    ("spec-tree-not-ints", SPEC + ["--tree", "{tmp}/t.json"], {"t.json": '[["a"]]'}, "integer ranks"),
    ("spec-tree-rank-huge", SPEC + ["--tree", "{tmp}/t.json"], {"t.json": '{"paths": [[100000]]}'}, "rank outside"),
    ("spec-tree-not-utf8", SPEC + ["--tree", "{tmp}/t.json"], {"t.json": b"\xff\xfe"}, "corrupt draft tree"),
    (
        "spec-checkpoint-is-file",
        SPEC + ["--dataset", "builtin", "--checkpoint", "{tmp}/f.bin"],
        {"f.bin": "x"},
        "is a file",
    ),
    (
        "spec-checkpoint-no-step",
        SPEC + ["--dataset", "builtin", "--checkpoint", "{tmp}/ck"],
        {"ck": lambda tmp: _meta_ckpt(tmp, _drop_step)},
        "'step'",
    ),
    (
        "spec-checkpoint-other-base",
        SPEC + ["--dataset", "builtin", "--checkpoint", "{tmp}/ck"],
        {"ck": lambda tmp: _meta_ckpt(tmp, _other_base)},
        "vocab_size: 1234 there",
    ),
    (
        "spec-turns-string",
        SPEC + ["--dataset", "{tmp}/d.jsonl"],
        {"d.jsonl": '{"turns": "What is 2+2?"}\n'},
        "'turns' must be a list",
    ),
    ("spec-turns-int", SPEC + ["--dataset", "{tmp}/d.jsonl"], {"d.jsonl": '{"turns": 5}\n'}, "'turns' must be a list"),
    ("spec-dataset-not-utf8", SPEC + ["--dataset", "{tmp}/d.jsonl"], {"d.jsonl": b'{"turns": ["\xff"]}\n'}, "UTF-8"),
    (
        "spec-jsonl-bad-line-2",
        SPEC + ["--dataset", "{tmp}/d.jsonl"],
        {"d.jsonl": '{"turns": ["a"]}\n{"turns": \n'},
        "line 2",
    ),
    (
        "spec-prompt-too-long",
        SPEC + ["--dataset", "{tmp}/d.jsonl", "--out", "{tmp}/r.json"],
        {"d.jsonl": json.dumps({"turns": ["word " * 9000]}) + "\n"},
        "exceeds the model's context",
    ),
    ("dyn-method-unknown", DYN + ["--methods", "m2r2,medusa"], {}, "unknown method"),
    ("dyn-thresholds-text", DYN + ["--thresholds", "static=a,b"], {}, "expected numbers"),
    ("dyn-trained-no-heads", DYN + ["--methods", "static_trained", "--exit-heads", "{tmp}/none"], {}, "--exit-heads"),
    ("dyn-out-dir-missing", DYN + ["--out", "{tmp}/no/r.json"], {}, "does not exist"),
    ("dyn-layerskip-no-dir", DYN + ["--methods", "layerskip", "--layerskip", "{tmp}/none"], {}, "--layerskip"),
    (
        "layerskip-no-distill",
        ["-m", "train.train_layerskip", "--distill-dir", "{tmp}/none", "--out", "{tmp}/o"],
        {},
        "no distill cache",
    ),
    (
        "specee-k-0",
        ["-m", "train.train_specee", "--distill-dir", "{tmp}/none", "--out", "{tmp}/o", "--k", "0"],
        {},
        "k must",
    ),
    (
        "specee-no-distill",
        ["-m", "train.train_specee", "--distill-dir", "{tmp}/none", "--out", "{tmp}/o"],
        {},
        "no distill cache",
    ),
    ("heads-layers-text", HEADS + ["--layers", "a"], {}, "--layers"),
    ("heads-no-distill", HEADS, {}, "no distill cache"),
    ("align-limit-0", ["-m", "eval.alignment", "--limit", "0"], {}, "--limit"),
    ("bench-max-new-0", ["-m", "eval.bench_decode", "--max-new-tokens", "0", "--skip-hf"], {}, ">= 1"),
    ("bench-repeats-0", ["-m", "eval.bench_decode", "--repeats", "0", "--skip-hf"], {}, ">= 1"),
    ("train-lr-nan", TRAIN + ["lr=nan"], {}, "finite"),
    ("train-batch-0", TRAIN + ["batch_size=0"], {}, "batch_size"),
    ("train-config-list", TRAIN + ["--config", "{tmp}/c.yaml"], {"c.yaml": "- 1\n- 2\n"}, "mapping"),
    ("train-config-m2r2-int", TRAIN + ["--config", "{tmp}/c.yaml"], {"c.yaml": "m2r2: 5\n"}, "'m2r2'"),
    ("train-config-unknown-key", TRAIN + ["--config", "{tmp}/c.yaml"], {"c.yaml": "stepz: 3\n"}, "unknown config key"),
    ("train-config-not-utf8", TRAIN + ["--config", "{tmp}/c.yaml"], {"c.yaml": b"steps: \xff\n"}, "UTF-8"),
    ("train-rank-0", TRAIN + ["m2r2.rank=0"], {}, "m2r2.rank"),
    ("train-override-type", TRAIN + ["steps=ten"], {}, "expected int"),
    (
        "select-missing",
        ["-m", "eval.select_tree", "--spec", "{tmp}/x.json", "--bench", "{tmp}/x.json", "--draft-cost", "0.3"],
        {},
        "not found",
    ),
    (
        "select-cost-nan",
        ["-m", "eval.select_tree", "--spec", "{tmp}/s.json", "--bench", "{tmp}/s.json", "--draft-cost", "nan"],
        {"s.json": "{}"},
        "--draft-cost",
    ),
    (
        "plot-bad-line-2",
        ["-m", "eval.plot_train", "{tmp}/m.jsonl", "--out", "{tmp}/p.png"],
        {"m.jsonl": '{"step": 1}\n{"step": \n'},
        "line 2",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input(case, tmp_path):
    _, argv, inputs, expect = case
    for name, content in inputs.items():
        p = tmp_path / name
        if callable(content):
            content(tmp_path)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            _write(p, content)
    before = _files(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) if isinstance(a, str) else a for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, timeout=600)
    err = r.stderr.decode("utf-8", "replace")
    lines = [line for line in err.splitlines() if line.strip()]
    assert r.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], lines
    assert _files(tmp_path) == before  # nothing created or changed (in the inputs' dir or the cwd)


# ----------------------------------------------------------------------------- parsers, by property

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "steps",
                    "lr",
                    "m2r2.rank",
                    "m2r2.targets",
                    "data.sources",
                    "mesh.data",
                    "m2r2.gain",
                    "seq_len",
                    "nope",
                    "m2r2.nope",
                    "steps.x",
                ]
            ),
            st.text(max_size=12),
        ),
        max_size=4,
    )
)
def test_overrides_parse_or_refuse(items):
    """Any `key=value` overrides either give a valid config (every field of the declared type) or one
    M2R2Error; never another exception."""
    from m2r2_jax.training.config import TrainConfig, load_train_config

    try:
        tc = load_train_config(None, [f"{k}={v}" for k, v in items])
    except M2R2Error:
        return
    assert isinstance(tc, TrainConfig) and isinstance(tc.steps, int) and tc.steps >= 1 and tc.lr > 0
    assert isinstance(tc.m2r2.rank, int) and all(isinstance(t, str) for t in tc.m2r2.targets)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 100_000) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=12,
)


@_SETTINGS
@given(st.one_of(_json, st.lists(st.lists(st.integers(-2, 70), max_size=4), max_size=6)))
def test_tree_files_parse_or_refuse(paths):
    """Any JSON in a tree file gives a well-formed tree or one M2R2Error."""
    from m2r2_jax.decoding.trees import MAX_RANK, build_tree

    try:
        t = build_tree(paths)
    except M2R2Error:
        return
    assert t.size >= 2 and (t.parent[1:] >= 0).all() and t.topk <= MAX_RANK
    assert all(t.parent[i] < i for i in range(1, t.size))


@_SETTINGS
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["turns", "instruction", "input", "prompt", "question", "id", "category"]),
            _json,
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    )
)
def test_dataset_records_parse_or_refuse(records):
    """Any records give eval items whose turns are non-empty strings, or one M2R2Error."""
    from m2r2_jax.data.eval_sets import items_of

    try:
        items = items_of(records, "x.jsonl")
    except M2R2Error:
        return
    for it in items:
        assert it.turns and all(isinstance(t, str) and t for t in it.turns)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--thresholds", "eagle=0.5"], "unknown method"),
        (["--limit", "0"], "--limit"),
        (["--max-pending", "0"], "max_pending"),
        (["--calm-checks", "x"], "--calm-checks"),
        (["--methods", "static_trained", "--exit-heads", "{tmp}"], "no static_trained checkpoint|no exit-head"),
        (["--methods", "specee", "--specee", "{tmp}/none"], "--specee"),
        (["--methods", "layerskip", "--layerskip", "{tmp}"], "no layerskip checkpoint"),
    ],
)
def test_dynamic_options_refused_in_process(tmp_path, argv, match):
    """More of eval.dynamic's option checks, in this process (the table above runs the CLI as a process
    for the representative cases): each is refused before anything loads or is written."""
    from eval.dynamic import main

    before = _files(tmp_path)
    with pytest.raises(M2R2Error, match=match):
        main(["--limit", "1", "--no-progress"] + [a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert _files(tmp_path) == before
