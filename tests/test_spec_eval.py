"""Speculative-decoding eval: eval-set formats, the AR-vs-spec run on a tiny random
model (multi-turn through a fake chat tokenizer), aggregates, plot, CLI errors."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.data.eval_sets import load_eval_set
from m2r2_jax.data.prompts import data_root
from m2r2_jax.errors import M2R2Error


def _jsonl(path: Path, recs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ----------------------------------------------------------------------------- datasets


def test_formats_synthetic(tmp_path):
    mt = _jsonl(
        tmp_path / "mt.jsonl",
        [
            {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Now shorter."]},
            {"question_id": 82, "category": "math", "turns": ["1+1?", "2+2?"], "reference": ["2", "4"]},
        ],
    )
    it = load_eval_set(str(mt))
    assert [(i.id, i.category, len(i.turns)) for i in it] == [("81", "writing", 2), ("82", "math", 2)]

    sb = _jsonl(
        tmp_path / "sb.jsonl",
        [
            {"question_id": 1, "category": "writing", "turns": ["a", "b"]},
            {"question_id": 2, "category": "translation", "turns": ["Translate: Hallo"]},
            {"question_id": 3, "category": "math_reasoning", "turns": ["3*3?"]},
            {"question_id": 4, "category": "rag", "turns": ["ctx q"]},
        ],
    )
    it = load_eval_set(str(sb))
    assert [i.category for i in it] == ["multi-turn", "translation", "math", "rag"]
    assert [i.raw_category for i in it] == ["writing", "translation", "math_reasoning", "rag"]

    ko = _jsonl(tmp_path / "koala" / "koala_test_set.jsonl", [{"id": "koala_0", "prompt": "Hi?"}])
    assert [(i.id, i.category, i.turns) for i in load_eval_set(str(ko))] == [("koala_0", "koala", ["Hi?"])]

    si = _jsonl(
        tmp_path / "si.jsonl",
        [
            {
                "id": "t0",
                "motivation_app": "Gmail",
                "instruction": "Fix this.",
                "instances": [{"input": "teh", "output": "the"}],
            },
            {"id": "t1", "motivation_app": "X", "instruction": "Joke.", "instances": [{"input": "", "output": "ha"}]},
        ],
    )
    it = load_eval_set(str(si))
    assert [i.turns for i in it] == [["Fix this.\n\nteh"], ["Joke."]] and it[0].raw_category == "Gmail"

    wz = _jsonl(
        tmp_path / "wz.jsonl",
        [
            {"idx": 1, "Skill": "Math", "Difficulty": 1, "Instruction": "2+2?"},
            {"idx": 2, "Skill": "Code", "Difficulty": 3, "Instruction": "Sort."},
        ],
    )
    assert [(i.id, i.category) for i in load_eval_set(str(wz))] == [("1", "Math"), ("2", "Code")]

    ae = tmp_path / "ae.json"  # a .json list file
    ae.write_text(
        json.dumps(
            [
                {"idx": 0, "dataset": "oasst", "instruction": "Why?"},
                {"idx": 1, "dataset": "koala", "instruction": "How?"},
                {"idx": 2, "dataset": "oasst", "instruction": "   "},
            ]
        )
    )
    it = load_eval_set(str(ae))
    assert [(i.category, i.turns) for i in it] == [("oasst", ["Why?"]), ("koala", ["How?"])]

    # limit: round-robin over categories, file order kept
    assert [i.id for i in load_eval_set(str(sb), limit=2)] == ["1", "2"]
    with pytest.raises(M2R2Error, match="unknown eval record format"):
        load_eval_set(str(_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])))
    with pytest.raises(M2R2Error, match="not found"):
        load_eval_set(str(tmp_path / "missing.jsonl"))


def test_short_names_and_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("M2R2_DATA", str(tmp_path))
    _jsonl(tmp_path / "wizardlm" / "WizardLM_testset.jsonl", [{"idx": 7, "Skill": "Art", "Instruction": "Paint."}])
    assert [(i.id, i.category, i.source.endswith("WizardLM_testset.jsonl")) for i in load_eval_set("wizardlm")] == [
        ("7", "Art", True)
    ]
    with pytest.raises(M2R2Error, match="eval set 'koala' not found"):
        load_eval_set("koala")
    with pytest.raises(M2R2Error) as e:  # HF_HUB_OFFLINE=1 (conftest)
        load_eval_set("no-such-org-xyz/no-such-eval-set")
    assert "no-such-org-xyz/no-such-eval-set" in str(e.value) and "\n" not in str(e.value)


def test_real_eval_files():
    root = data_root()
    if not (root / "mt_bench/question.jsonl").is_file() or not (root / "spec_bench/question.jsonl").is_file():
        pytest.skip(f"shared eval data not found under {root}")
    mt = load_eval_set("mt_bench")
    assert len(mt) == 80 and all(len(i.turns) == 2 for i in mt)
    assert len({i.category for i in mt}) == 8
    sb = load_eval_set("spec_bench")
    groups = {}
    for i in sb:
        groups[i.category] = groups.get(i.category, 0) + 1
    assert len(sb) == 480
    assert groups == {"multi-turn": 80, "translation": 80, "summarization": 80, "qa": 80, "math": 80, "rag": 80}
    assert all(len(i.turns) == 2 for i in sb if i.category == "multi-turn")
    assert [i.turns for i in sb[:80]] == [i.turns for i in mt]
    lim = load_eval_set("spec_bench", limit=12)
    assert sorted({i.category for i in lim}) == sorted(groups) and len(lim) == 12


# ----------------------------------------------------------------------------- run_spec_eval


def _ec(tree, lookup=0, **kw):
    from m2r2_jax.decoding.drafters import DraftOptions
    from m2r2_jax.evaluation.spec_eval import SpecEvalConfig

    return SpecEvalConfig(draft=DraftOptions(tree=tree, lookup=lookup), **kw)


class CharTokenizer:
    """Printable ASCII char -> its code point; 1 = BOS, 2 = EOS, 3/4 = user/assistant headers."""

    def __init__(self):
        self.calls = []

    def _enc(self, s):
        return [ord(c) if 32 <= ord(c) < 127 else ord("?") for c in s]

    def apply_chat_template(self, messages, add_generation_prompt=False):
        self.calls.append([dict(m) for m in messages])
        ids = [1]
        for m in messages:
            ids += [3 if m["role"] == "user" else 4] + self._enc(m["content"]) + [5]
        return ids + ([4] if add_generation_prompt else [])

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) if 32 <= i < 127 else ("" if skip_special_tokens else f"<{i}>") for i in ids)


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_dir):
    from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
    from m2r2_jax.m2r2.config import M2R2Config
    from m2r2_jax.m2r2.params import init_m2r2

    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    mc = M2R2Config(rate=1, num_fast_layers=2, rank=4, router_dim=8).validate(cfg.num_layers)
    m = init_m2r2(cfg, mc, jax.random.key(3))
    m = jax.tree_util.tree_map_with_path(  # small random adapters (b != 0): drafts partly accepted
        lambda p, x: (
            x + 0.02 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if getattr(p[-1], "key", "") == "b"
            else x
        ),
        m,
    )
    model = SimpleNamespace(cfg=cfg, params=jax.tree.map(jnp.asarray, params), tokenizer=CharTokenizer())
    return model, (mc, m, np.arange(cfg.vocab_size, dtype=np.int32))


def test_run_spec_eval_tiny(tiny_setup, tmp_path):
    from eval.speculative import format_table
    from m2r2_jax.data.eval_sets import EvalItem
    from m2r2_jax.decoding.trees import build_tree
    from m2r2_jax.evaluation.plots import plot_spec_eval
    from m2r2_jax.evaluation.spec_eval import run_spec_eval

    model, bundle = tiny_setup
    items = [
        EvalItem("a", "chat", ["Hello!", "Again?"]),
        EvalItem("b", "qa", ["Why blue?"]),
        EvalItem("c", "qa", ["What is 2+2?"]),
    ]  # first turns in the 16-token bucket
    tree = build_tree([(0,), (1,), (0, 0)], "t3")
    res = run_spec_eval(model, bundle, items, _ec(tree, max_new_tokens=10, batch_size=1), progress=False)
    assert res["lossless"] is True and res["prompts"] == 4
    assert all(r["equal"] is True for r in res["per_prompt"])
    assert set(res["per_category"]) == {"chat", "qa"} and res["per_category"]["chat"]["prompts"] == 2
    assert res["tau"] > 1.0 and all(c["tau"] >= 1.0 for c in res["per_category"].values())
    assert res["overall_speedup"] > 0 and res["compile_seconds"]["spec"] > 0
    assert [d["depth"] for d in res["depth_acceptance"]] == [1, 2]
    rates = [d["rate"] for d in res["depth_acceptance"]]
    assert 0 < rates[1] <= rates[0] <= 1
    na = {tuple(n["path"]): n for n in res["node_acceptance"]}
    assert set(na) == set(tree.paths) and na[(0,)]["tries"] == res["totals"]["steps"] and na[(0,)]["hits"] > 0
    # multi-turn: the second prompt carries the model's own (AR) first answer
    ar_first = next(r for r in res["per_prompt"] if r["id"] == "a" and r["turn"] == 1)
    second = [c for c in model.tokenizer.calls if len(c) == 3]
    assert second and second[-1][0]["content"] == "Hello!" and second[-1][2]["content"] == "Again?"
    assert second[-1][1]["role"] == "assistant" and len(second[-1][1]["content"]) <= ar_first["ar_tokens"]
    t = res["totals"]
    assert t["ar_tokens"] == t["spec_tokens"]
    assert res["overall_speedup"] == pytest.approx(t["ar_seconds"] / t["spec_seconds"])

    # a batch of 2 (greedy: still token-for-token equal), then sampling (equal is null)
    res2 = run_spec_eval(model, bundle, items[1:], _ec(tree, max_new_tokens=10, batch_size=2), progress=False)
    assert res2["lossless"] is True and {r["batch_rows"] for r in res2["per_prompt"]} == {2}
    assert [r["ar_tokens"] for r in res2["per_prompt"]] == [r["ar_tokens"] for r in res["per_prompt"][2:]]
    res3 = run_spec_eval(
        model, bundle, items[1:], _ec(tree, max_new_tokens=10, temperature=1.0, top_p=0.9, batch_size=2), progress=False
    )
    assert res3["lossless"] is None and res3["node_acceptance"] == [] and res3["tau"] >= 1.0
    assert res3["per_category"]["qa"]["lossless"] is None

    # AR through 2-slot blocks for a chain1 tree; the one-slot AR loop is timed too
    res4 = run_spec_eval(
        model, bundle, items[1:], _ec(build_tree([(0,)], "c1"), max_new_tokens=10, ar_block=2), progress=False
    )
    assert res4["lossless"] is True and res4["ar_block"] == 2 and res4["speedup_vs_block1_ar"] > 0
    assert res["ar_block"] == 1 and res["speedup_vs_block1_ar"] is None

    # prompt lookup on top of the M2R2 drafts: still lossless, its steps counted
    res5 = run_spec_eval(model, bundle, items, _ec(tree, max_new_tokens=10, lookup=3), progress=False)
    lk = res5["lookup"]
    assert res5["lossless"] is True and lk["tokens"] == 3 and lk["steps"] > 0 and res["lookup"] is None
    assert lk["share_of_steps"] == pytest.approx(lk["steps"] / res5["totals"]["steps"])
    assert [r["ar_tokens"] for r in res5["per_prompt"]] == [r["ar_tokens"] for r in res["per_prompt"]]

    png = plot_spec_eval(res, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    table = format_table(res)
    assert "chat" in table and "overall" in table and "lossless" in table
    json.dumps(res)  # JSON-serialisable


def test_hf_baselines_same_run(tiny_setup, tiny_llama_dir):
    """HF greedy / prompt lookup / early-exit assisted generation timed on the same prompts; HF greedy
    emits exactly our tokens, so the tokens/s ratios compare equal outputs."""
    torch = pytest.importorskip("torch")
    import transformers as tf

    from m2r2_jax.data.eval_sets import EvalItem
    from m2r2_jax.decoding.trees import build_tree
    from m2r2_jax.evaluation.spec_eval import run_spec_eval

    model, bundle = tiny_setup
    ref = tf.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    items = [EvalItem("b", "qa", ["Why blue?"]), EvalItem("c", "qa", ["What is 2+2?"])]
    res = run_spec_eval(
        model, bundle, items, _ec(build_tree([(0,), (0, 0)], "c2"), max_new_tokens=8), progress=False, hf_ref=ref
    )
    h = res["hf"]
    assert h["prompts"] == 2 and h["hf_greedy_equals_ours"] is True
    assert set(h["tokens_per_second"]) == {
        "hf_greedy",
        "hf_prompt_lookup",
        "hf_early_exit",
        "ours_ar",
        "ours_m2r2_spec",
    }
    assert all(v > 0 for v in h["tokens_per_second"].values())
    assert h["speedup_vs_hf_greedy"]["hf_greedy"] == pytest.approx(1.0)
    assert all(r["hf_equal"] is True for r in res["per_prompt"])
    with pytest.raises(Exception, match="batch size 1"):
        run_spec_eval(
            model,
            bundle,
            items,
            _ec(build_tree([(0,)], "c1"), max_new_tokens=4, batch_size=2),
            progress=False,
            hf_ref=ref,
        )


def test_cli_bad_input_one_line(tmp_path, capsys):
    from eval.speculative import main
    from m2r2_jax.cli import run_main

    for argv, msg in (
        (["--out", str(tmp_path / "nope" / "r.json")], "does not exist"),
        (["--out", str(tmp_path / "r.json"), "--tree", "bogus"], "unknown draft tree"),
        (["--out", str(tmp_path / "r.json"), "--batch-size", "0"], ">= 1"),
        (["--out", str(tmp_path / "r.json"), "--dataset", str(tmp_path / "x.jsonl")], "not found"),
    ):
        with pytest.raises(SystemExit) as e:
            run_main(main, argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error: ") and msg in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_builtin_prompt_set_ships_with_package():
    from m2r2_jax.data.eval_sets import load_eval_set

    items = load_eval_set("builtin")
    assert len(items) == 16 and len({it.category for it in items}) == 8
    assert all(len(it.turns) == 1 and len(it.turns[0]) > 20 for it in items)
    assert len(load_eval_set("builtin", limit=8)) == 8


def test_hf_baselines_keep_eos_like_ours():
    """Our decoders return the answer including its EOS token; the HF side must compare the same way."""
    torch = pytest.importorskip("torch")
    from m2r2_jax.evaluation.spec_eval import HFBaselines

    class FakeRef:
        def generate(self, x, **kw):
            return torch.cat([x, torch.tensor([[7, 8, 2]])], 1)

    hb = HFBaselines(FakeRef(), early_exit_layers=2, max_new_tokens=8, eos_ids=(2,))
    res = hb.run([1, 5, 6])
    assert set(res) == {"hf_greedy", "hf_prompt_lookup", "hf_early_exit"}
    assert all(new == [7, 8, 2] for new, _ in res.values())


def test_journal_resume(tiny_setup, tmp_path):
    """An interrupted eval carries on from its journal: finished items are read back, not rerun, and the
    result matches an uninterrupted run's; a journal from another run is refused."""
    from m2r2_jax.data.eval_sets import EvalItem
    from m2r2_jax.decoding.trees import build_tree
    from m2r2_jax.evaluation.spec_eval import run_spec_eval

    model, bundle = tiny_setup
    items = [
        EvalItem("a", "chat", ["Hello!", "Again?"]),
        EvalItem("b", "qa", ["Why blue?"]),
        EvalItem("c", "qa", ["What is 2+2?"]),
    ]
    tree = build_tree([(0,), (0, 0)], "c2")
    kw = dict(progress=False, journal_key={"model": "tiny"})
    j = tmp_path / "r.partial.jsonl"
    full = run_spec_eval(model, bundle, items, _ec(tree, max_new_tokens=8), journal=j, **kw)
    lines = j.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["header"]["items"][0] == ["a", "chat", 2]
    assert [json.loads(x)["batch"] for x in lines[1:]] == [0, 1, 2] and full["resumed_batches"] == 0

    j.write_text("\n".join(lines[:3]) + "\n")  # interrupted after two items
    n_calls = len(model.tokenizer.calls)
    res = run_spec_eval(model, bundle, items, _ec(tree, max_new_tokens=8), journal=j, resume=True, **kw)
    assert len(model.tokenizer.calls) - n_calls == 1  # only item c was run
    assert res["resumed_batches"] == 2 and res["prompts"] == 4 and res["lossless"] is True
    key = ("id", "turn", "ar_tokens", "spec_tokens", "steps", "accepted", "equal")
    assert [[r[k] for k in key] for r in res["per_prompt"]] == [[r[k] for k in key] for r in full["per_prompt"]]
    assert res["tau"] == pytest.approx(full["tau"])
    assert [d["rate"] for d in res["depth_acceptance"]] == pytest.approx([d["rate"] for d in full["depth_acceptance"]])
    assert len(j.read_text().splitlines()) == 4

    with pytest.raises(M2R2Error, match="different run .*max_new_tokens: 8 there, 6 now"):
        run_spec_eval(model, bundle, items, _ec(tree, max_new_tokens=6), journal=j, resume=True, **kw)
    with pytest.raises(M2R2Error, match="different run .*model: 'tiny' there, 'other' now"):
        run_spec_eval(
            model,
            bundle,
            items,
            _ec(tree, max_new_tokens=8),
            journal=j,
            resume=True,
            **{**kw, "journal_key": {"model": "other"}},
        )


def test_cli_refuses_to_overwrite_journal(tmp_path, capsys):
    from eval.speculative import main
    from m2r2_jax.cli import run_main

    j = tmp_path / "r.partial.jsonl"
    j.write_text('{"header": {}}\n')
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "--resume" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.partial.jsonl"] and j.read_text() == '{"header": {}}\n'


def test_spec_eval_with_cpu_kernels_and_xla_reference(tiny_setup, tmp_path):
    """The harness decodes both loops with the packed params, times XLA's AR on the same prompts,
    records the kernel choice in the journal header, and stays lossless."""
    from m2r2_jax import kernels as K
    from m2r2_jax.backend import CPU_KERNELS
    from m2r2_jax.data.eval_sets import EvalItem
    from m2r2_jax.decoding.trees import get_tree
    from m2r2_jax.evaluation.spec_eval import run_spec_eval

    if not K.available():
        pytest.skip("no C++ compiler: the CPU kernels are not built")
    model, bundle = tiny_setup
    items = [EvalItem("a", "chat", ["Hello hello hello!", "Again?"]), EvalItem("b", "qa", ["Why blue?"])]
    packed = CPU_KERNELS.prepare(model.cfg, model.params)
    j = tmp_path / "r.partial.jsonl"
    res = run_spec_eval(
        model,
        bundle,
        items,
        _ec(get_tree("star4"), max_new_tokens=8, lookup=4),
        progress=False,
        backend=CPU_KERNELS,
        decode_params=packed,
        ref_ar_params=model.params,
        journal=j,
    )
    assert res["lossless"] is True and res["prompts"] == 3
    # XLA's AR over the unpacked params emits the kernels' AR tokens on every prompt
    assert res["speedup_vs_ref_ar"] > 0 and res["ref_ar_speedup"] > 0 and res["ref_ar_equal"] is True
    assert all(u["ref_ar_tokens"] > 0 for u in [json.loads(x) for x in j.read_text().splitlines()[1:]][0]["units"])
    header = json.loads(j.read_text().splitlines()[0])["header"]
    assert header["backend"] == "cpu_kernels" and header["ref_ar"] is True


def test_compare_resume_adds_drafters_and_says_where_each_was_measured(tiny_setup, tmp_path):
    """eval.compare's rows are finished per drafter: a later call with --resume reuses them and runs only
    the drafters it adds; each row carries its own AR tokens/s and where and when it was measured (a long
    comparison may span sessions on different machines), and the table shows both."""
    from m2r2_jax.data.eval_sets import EvalItem
    from m2r2_jax.decoding.trees import build_tree
    from m2r2_jax.evaluation.compare import format_table, run_compare

    model, bundle = tiny_setup
    items = [EvalItem("a", "chat", ["Hello! Hello!"]), EvalItem("b", "qa", ["Why blue?"])]
    ec = _ec(build_tree([(0,), (0, 0)], "c2"), max_new_tokens=6)
    kw = dict(progress=False, journal_key={"model": "tiny"})
    first = run_compare(model, None, items, ["pld"], ec, tmp_path / "w", **kw)
    row = first["drafters"]["pld"]
    assert row["lossless"] is True and row["ar_tokens_per_second"] > 0
    assert set(row["measured"]) == {"processor", "date", "commit"} and row["measured"]["date"]
    (tmp_path / "w" / "pld.json").write_text(
        json.dumps(dict(row, measured=dict(row["measured"], date="2001-01-01 00:00 UTC")))
    )
    both = run_compare(model, None, items, ["pld", "lookahead"], ec, tmp_path / "w", resume=True, **kw)
    assert both["drafters"]["pld"]["measured"]["date"].startswith("2001")  # read back, not rerun
    assert not both["drafters"]["lookahead"]["measured"]["date"].startswith("2001")
    table = format_table(both)
    assert "| measured |" in table.splitlines()[0] and "2001-01-01" in table
    with pytest.raises(M2R2Error, match="pld.json was measured with other settings .*max_new_tokens"):
        run_compare(
            model,
            None,
            items,
            ["pld"],
            _ec(build_tree([(0,), (0, 0)], "c2"), max_new_tokens=5),
            tmp_path / "w",
            resume=True,
            **kw,
        )
    with pytest.raises(M2R2Error, match="differs in: model"):
        run_compare(
            model, None, items, ["pld"], ec, tmp_path / "w", resume=True, progress=False, journal_key={"model": "other"}
        )
