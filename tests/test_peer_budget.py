"""The peers' equal wall-clock budget: `--minutes` (the one budget flag of every peer trainer, checked by
peers.budget.parse_minutes) stops a trainer early and saves, its checkpoint's metadata carries
train_minutes / steps_run / trainable_params / budget_minutes as the training loop wrote it (what
eval.compare and eval.dynamic report), a bad `--minutes` is one error line that writes nothing, and a
published (bfloat16) copy loads like the run. Tiny random models, a tiny distillation cache."""

import importlib
import json

import numpy as np
import pytest

from m2r2_jax.cli import print_summary, run_main
from m2r2_jax.errors import M2R2Error
from m2r2_jax.peers.budget import parse_minutes, projected_minutes, publish, read_budget
from m2r2_jax.training.spec_peers import RunLimits

TRAINERS = ("kangaroo", "sps", "medusa", "eagle", "layerskip", "skipdecode", "exit_heads", "specee")


def _cache(d, n=16):
    """A self-distillation cache of n random answers for the tiny model (vocab 256)."""
    rs = np.random.RandomState(0)
    d.mkdir(parents=True, exist_ok=True)
    rows = [
        dict(prompt_ids=rs.randint(3, 256, 6).tolist(), answer_ids=rs.randint(3, 64, 24).tolist()) for _ in range(n)
    ]
    (d / "shard_00000.jsonl").write_text("".join(json.dumps(dict(r, prompt="p")) + "\n" for r in rows))
    man = dict(format="m2r2-distill-cache/1", shards=[dict(file="shard_00000.jsonl", n=n)], complete=False)
    (d / "manifest.json").write_text(json.dumps(man))
    return d


def _run(trainer, argv, capsys):
    main = importlib.import_module(f"train.train_{trainer}").main
    with pytest.raises(SystemExit) as e:
        run_main(main, [str(x) for x in argv])
    return e.value.code, capsys.readouterr()


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf", 0, -2.0, True])
def test_parse_minutes(value):
    """One rule for the flag and the loop's limits (the library's callers)."""
    assert parse_minutes(None) is None and parse_minutes("2.5") == 2.5 and parse_minutes(3) == 3.0
    assert RunLimits(budget_minutes=1e-9).budget_minutes == 1e-9 and RunLimits().budget_minutes is None
    with pytest.raises(M2R2Error, match="--minutes must be a number of minutes > 0"):
        parse_minutes(value)
    with pytest.raises(M2R2Error, match="--minutes must be a number of minutes > 0"):
        RunLimits(budget_minutes=value)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_budget_minutes_is_gone(trainer, tmp_path, capsys):
    """`--minutes` is the one budget flag: the old `--budget-minutes` is an unknown argument."""
    out = tmp_path / "out"
    code, cap = _run(trainer, ["--distill-dir", _cache(tmp_path / "d"), "--out", out, "--budget-minutes", "1"], capsys)
    assert code == 2 and "unrecognized arguments: --budget-minutes" in cap.err and not out.exists()


def test_print_summary(capsys):
    """A budgeted run that its --steps ended, or that saved nothing, says so on stderr; stdout is the summary."""
    runs = [
        (dict(steps=5, stopped="steps", minutes=0.5, budget_minutes=2.0), "--steps ended the run after 0.5 of 2.0"),
        (dict(steps=0, stopped="budget", minutes=0.1, budget_minutes=1e-9), "no step finished"),
        (dict(steps=5, stopped="budget", minutes=2.1, budget_minutes=2.0), ""),
        (dict(steps=5, stopped="steps", minutes=0.5, budget_minutes=None), ""),
    ]
    for summary, note in runs:
        print_summary("kangaroo", summary)
        cap = capsys.readouterr()
        assert json.loads(cap.out) == summary and (note in cap.err if note else cap.err == "")


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("value", ["0", "abc"])
def test_bad_minutes_one_line_nothing_written(trainer, value, tmp_path, capsys):
    out = tmp_path / "out"
    code, cap = _run(trainer, ["--distill-dir", _cache(tmp_path / "d"), "--out", out, "--minutes", value], capsys)
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --minutes must be"), cap.err
    assert not out.exists()


def _meta(run):
    step_dir = max((run / "checkpoints").iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
    return json.loads((step_dir / "meta" / "metadata").read_text())


def test_minutes_stops_a_speculative_peer(tiny_llama_dir, tmp_path, capsys):
    """Kangaroo (the trained speculative peers' CLI): the budget ends the run long before --steps."""
    from m2r2_jax.decoding.peer_drafters import draft_options

    out = tmp_path / "kg"
    argv = ["--model", tiny_llama_dir, "--distill-dir", _cache(tmp_path / "d"), "--out", out, "--exit-layer", 1]
    argv += ["--steps", 500, "--batch-size", 4, "--seq-len", 32, "--minutes", 1e-4, "--no-progress"]
    code, cap = _run("kangaroo", argv, capsys)
    assert code == 0, cap.err
    summary = json.loads(cap.out.strip().splitlines()[-1])
    meta = _meta(out)
    assert summary["stopped"] == "budget" and 1 <= meta["steps_run"] < 500 and meta["step"] == meta["steps_run"]
    assert summary["budget_minutes"] == 1e-4 and summary["steps"] == meta["steps_run"]
    assert meta["budget_minutes"] == 1e-4 and meta["train_minutes"] > 0 and meta["trainable_params"] > 0
    assert read_budget(out) == {
        k: meta[k] for k in ("train_minutes", "steps_run", "trainable_params", "budget_minutes")
    }
    opts = draft_options("kangaroo", kangaroo_checkpoint=str(out))  # what eval.compare's table reads
    assert opts.budget() == dict(trainable_params=meta["trainable_params"], train_minutes=meta["train_minutes"])
    pub = publish(out, tmp_path / "pub", max_mb=0)  # forced to bfloat16, params only
    assert pub["stored_dtype"] == "bfloat16" and read_budget(tmp_path / "pub") == read_budget(out)
    assert draft_options("kangaroo", kangaroo_checkpoint=str(tmp_path / "pub")).budget() == opts.budget()


def test_minutes_stops_an_early_exit_peer(tiny_llama_dir, tmp_path, capsys):
    """LayerSkip (the early-exit peers, now through the same loop): budget stop, metadata, and the
    checkpoint (and its bfloat16 publication) still load with training.peers.load_layerskip;
    eval.dynamic's budgets read it."""
    import jax

    from eval.dynamic import format_table
    from m2r2_jax.evaluation.dynamic_eval import DynamicEvalConfig, training_budgets
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training.peers import load_layerskip

    out = tmp_path / "ls"
    argv = ["--model", tiny_llama_dir, "--distill-dir", _cache(tmp_path / "d"), "--out", out, "--layers", "1,2"]
    argv += ["--rank", 4, "--steps", 500, "--batch-size", 4, "--minutes", 1e-4, "--no-progress"]
    code, cap = _run("layerskip", argv, capsys)
    assert code == 0, cap.err
    meta = _meta(out)
    assert 1 <= meta["steps_run"] < 500 and meta["budget_minutes"] == 1e-4 and meta["train_minutes"] > 0
    m = load_model(str(tiny_llama_dir), tokenizer=False)
    ads, lc = load_layerskip(out, m.cfg, m.fingerprint)
    assert lc.layers == (1, 2) and meta["trainable_params"] == sum(x.size for x in jax.tree.leaves(ads))
    assert publish(out, tmp_path / "pub", max_mb=0)["stored_dtype"] == "bfloat16"
    ads16, _ = load_layerskip(tmp_path / "pub", m.cfg, m.fingerprint)
    for a, b in zip(jax.tree.leaves(ads), jax.tree.leaves(ads16)):
        assert b.dtype == a.dtype and np.allclose(a, b, rtol=1e-2, atol=1e-2)
    ec = DynamicEvalConfig(methods=("static", "layerskip"), layerskip=str(tmp_path / "pub"))
    b = training_budgets(ec)
    assert b["layerskip"]["train_minutes"] == meta["train_minutes"] and b["static"]["trainable_params"] == 0
    pts = [dict(threshold=1, speedup=1.0, flops_speedup=1.0, layers_per_token=1.0, exit_rate=0.5, rouge_l=1.0)]
    pts[0].update(rouge_l_ref=None, exact_match=1.0)
    table = format_table(dict(methods={"layerskip": pts}, budgets=b))
    assert "train min" in table and str(meta["trainable_params"]) in table


@pytest.mark.parametrize(
    "trainer, flags",
    [("exit_heads", ["--layers", "1,2", "--rank", 4]), ("skipdecode", ["--min-layers", "1,2", "--span", 8])],
)
def test_minutes_other_early_exit_peers_load(trainer, flags, tiny_llama_dir, tmp_path, capsys):
    """Exit heads (a per-head metric vector) and SkipDecode through the same loop: their loaders read it."""
    from m2r2_jax.loading.registry import load_model
    from m2r2_jax.training import peers as TP

    out = tmp_path / trainer
    argv = ["--model", tiny_llama_dir, "--distill-dir", _cache(tmp_path / "d"), "--out", out, *flags]
    argv += ["--steps", 500, "--batch-size", 4, "--minutes", 1e-4, "--no-progress"]
    code, cap = _run(trainer, argv, capsys)
    assert code == 0, cap.err
    meta = _meta(out)
    assert 1 <= meta["steps_run"] < 500 and meta["budget_minutes"] == 1e-4
    m = load_model(str(tiny_llama_dir), tokenizer=False)
    loader = TP.load_exit_heads if trainer == "exit_heads" else TP.load_skipdecode
    _, c = loader(out, m.cfg, m.fingerprint)
    assert (c if trainer == "exit_heads" else c.min_layers) == (1, 2)  # (exit layers; SkipDecodeConfig)


def test_projected_minutes(tmp_path):
    f = tmp_path / "metrics.jsonl"
    rows = [(1, 25.0), (2, 5.0), (3, 7.0), (4, 6.0)]  # step 1 compiles; the median of the rest is 6 s
    f.write_text("".join(json.dumps(dict(step=s, tokens=60, tokens_per_second=60 / t)) + "\n" for s, t in rows))
    got = projected_minutes(f, 300)
    assert got["minutes"] == pytest.approx((25 + 299 * 6) / 60) and got["step_seconds"] == pytest.approx(6.0)
    assert got["probe_steps"] == 4 and got["first_step_seconds"] == pytest.approx(25.0)
    f.write_text(json.dumps(dict(step=2, tokens=60, tokens_per_second=10.0)) + "\n")
    with pytest.raises(M2R2Error, match="need the timings of step 1"):
        projected_minutes(f, 300)
