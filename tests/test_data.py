"""Training prompts (formats, dedupe, eval hold-out, determinism, real data) and
the self-distillation cache (resume, refusal) on a tiny random model."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from m2r2_jax.data import prompts as P
from m2r2_jax.errors import M2R2Error
from m2r2_jax.training.distill import (
    DistillModel,
    as_distill_model,
    build_distill_cache,
    load_distill_cache,
    read_manifest,
)


def _write(path: Path, records, jsonl=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    jsonl = path.suffix == ".jsonl" if jsonl is None else jsonl
    path.write_text("".join(json.dumps(r) + "\n" for r in records) if jsonl else json.dumps(records, indent=2))
    return str(path)


def _one(path):
    ps = P.collect_prompts([path], exclude_eval=False)
    assert len(ps.stats) == 1
    return ps.stats[0], sorted(ps.prompts)


# ----------------------------------------------------------------------------- formats


def test_alpaca_family_instruction_input(tmp_path):
    f = _write(
        tmp_path / "alpaca.json",
        [
            {"instruction": "Sum the numbers.", "input": "1, 2", "output": "3"},
            {"instruction": "Say hi. ", "input": "", "output": "hi"},
            {"instruction": "", "input": "", "output": "dropped: empty"},
            {"instruction": "Write code.", "input": "  ", "response": "gpteacher style"},
        ],
    )
    st, ps = _one(f)
    assert st.format == "instruction" and st.records == 4 and st.prompts == 3 and st.reader == "datasets"
    assert ps == sorted(["Sum the numbers.\n\n1, 2", "Say hi.", "Write code."])


def test_lima_and_instructionwild_and_alpaca_cot_escapes(tmp_path):
    lima = _write(
        tmp_path / "lima.json",
        [{"instruction": "Can brain cells move?", "input": "", "output": "x", "history": [["q", "a"]]}],
    )
    wild = _write(tmp_path / "wild.jsonl", [{"instruction": "Act as a poet."}, {"instruction": "Tell a joke."}])
    cot = _write(
        tmp_path / "aqua.json",
        [
            {"instruction": "Question: 1+1?\\nOptions:\\n(A) 2\\n(B) 3 Let's think first.", "input": "", "output": "A"},
            {"instruction": "Question: 2+2?\\nOptions:\\n(A) 4", "input": "", "output": "A"},
        ],
    )
    assert _one(lima)[1] == ["Can brain cells move?"]
    assert _one(wild)[1] == ["Act as a poet.", "Tell a joke."]
    assert _one(cot)[1][0] == "Question: 1+1?\nOptions:\n(A) 2\n(B) 3 Let's think first."
    # a single literal backslash-n in an otherwise normal (code) file is kept as written
    code = _write(
        tmp_path / "code.json",
        [{"instruction": 'Fix printf("%d\\n")', "input": ""}, {"instruction": "Reverse a list.", "input": ""}],
    )
    assert 'Fix printf("%d\\n")' in _one(code)[1]


def test_gsm8k_question(tmp_path):
    f = _write(tmp_path / "train.jsonl", [{"question": "Natalia sold 48 clips?", "answer": "#### 72"}])
    st, ps = _one(f)
    assert st.format == "question" and ps == ["Natalia sold 48 clips?"]


def test_dpo_conversations_first_human_turn(tmp_path):
    f = _write(
        tmp_path / "dpo.json",
        [
            {
                "conversations": [
                    {"from": "system", "value": "You are helpful."},
                    {"from": "human", "value": "First?"},
                    {"from": "gpt", "value": "ans"},
                    {"from": "human", "value": "Second?"},
                ],
                "chosen": {"from": "gpt", "value": "c"},
                "rejected": {"from": "gpt", "value": "r"},
            },
            {
                "conversations": [{"from": "human", "value": "Only turn"}],
                "chosen": {"from": "gpt", "value": "c"},
                "rejected": {"from": "gpt", "value": "r"},
            },
        ],
    )
    st, ps = _one(f)
    assert st.format == "conversations" and ps == ["First?", "Only turn"]


def test_kto_messages_first_user_turn(tmp_path):
    f = _write(
        tmp_path / "kto.json",
        [
            {
                "messages": [
                    {"content": "Summarise this.", "role": "user"},
                    {"content": "bad", "role": "assistant"},
                    {"content": "Again", "role": "user"},
                ],
                "label": False,
            }
        ],
    )
    st, ps = _one(f)
    assert st.format == "messages" and ps == ["Summarise this."]


def test_open_assistant_tree_roots(tmp_path):
    f = _write(
        tmp_path / "oa.json",
        [
            {
                "task_message_id": "t1",
                "user_message_id": "a",
                "parent_message_id": None,
                "text": " Hi, teach me horseshoes?",
                "role": "prompter",
            },
            {
                "task_message_id": "t2",
                "user_message_id": "b",
                "parent_message_id": "a",
                "text": " Sure.",
                "role": "assistant",
            },
            {
                "task_message_id": "t3",
                "user_message_id": "c",
                "parent_message_id": "b",
                "text": " Thanks, more?",
                "role": "prompter",
            },
            {
                "task_message_id": "t4",
                "user_message_id": "d",
                "parent_message_id": None,
                "text": "\n Root two",
                "role": "prompter",
            },
        ],
    )
    st, ps = _one(f)
    assert st.format == "oa_tree" and st.records == 2
    assert ps == ["Hi, teach me horseshoes?", "Root two"]


def test_self_instruct_seed_tasks_and_mt_bench_turns(tmp_path):
    seed = _write(
        tmp_path / "seed_tasks.jsonl",
        [
            {
                "id": "s0",
                "name": "n",
                "instruction": "Classify the sentiment.",
                "is_classification": True,
                "instances": [{"input": "I love it", "output": "pos"}, {"input": "meh", "output": "neg"}],
            },
            {
                "id": "s1",
                "name": "m",
                "instruction": "Suggest a breakfast.",
                "is_classification": False,
                "instances": [{"input": "", "output": "oats"}],
            },
        ],
    )
    assert _one(seed)[1] == ["Classify the sentiment.\n\nI love it", "Suggest a breakfast."]
    mt = _write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "w", "turns": ["First turn", "Second"]}])
    st, ps = _one(mt)
    assert st.format == "turns" and ps == ["First turn"]


def test_unknown_format_and_missing_sources(tmp_path):
    bad = _write(tmp_path / "bad.json", [{"foo": "bar"}])
    with pytest.raises(M2R2Error, match="bad.json.*unknown prompt format"):
        P.load_prompts([bad])
    with pytest.raises(M2R2Error, match="not found: .*nope.json"):
        P.load_prompts([str(tmp_path / "nope.json")])
    with pytest.raises(M2R2Error, match="no-such-org/no-such-set"):  # hub name; offline in tests
        P.load_prompts(["no-such-org/no-such-set"])


def test_json_fallback_and_directory_sources(tmp_path):
    d = tmp_path / "dir"
    wrapped = _write(d / "b" / "wrapped.json", {"data": [{"instruction": "A"}, {"instruction": "B"}]})
    _write(d / "a.jsonl", [{"question": "Q1"}])
    (d / "notes.txt").write_text("ignored")
    st, ps = _one(wrapped)
    assert st.reader == "json" and ps == ["A", "B"]
    stats = P.prompt_stats([str(d)], exclude_eval=False)
    assert [Path(s.source).name for s in stats] == ["a.jsonl", "wrapped.json"]  # sorted paths


def test_dedupe_across_and_within_files(tmp_path):
    a = _write(
        tmp_path / "a.json",
        [{"instruction": "Hello   World"}, {"instruction": "hello world"}, {"instruction": "Other"}],
    )
    b = _write(tmp_path / "b.jsonl", [{"question": "HELLO\nworld"}, {"question": "new one"}])
    ps = P.collect_prompts([a, b], exclude_eval=False)
    assert sorted(ps.prompts) == ["Hello   World", "Other", "new one"]
    assert [(s.duplicates, s.kept) for s in ps.stats] == [(1, 2), (1, 1)]


def _eval_layout(tmp_path):
    data = tmp_path / "data"
    _write(
        data / "mt_bench" / "question.jsonl",
        [{"question_id": 81, "category": "math", "turns": ["Prove the Pythagorean Theorem.", "Now in 3D."]}],
    )
    _write(
        data / "alpaca_eval" / "alpaca_eval_prompts.jsonl",
        [{"idx": 0, "dataset": "x", "instruction": "What is the meaning of life?"}],
    )
    train = _write(
        data / "train_prompts" / "t.json",
        [
            {"instruction": "prove  the pythagorean theorem."},
            {"instruction": "What is the meaning of life?"},
            {"instruction": "Keep me."},
            {"instruction": "What is the meaning of life, really?"},
        ],
    )
    return data, train


def test_eval_exclusion(tmp_path):
    data, train = _eval_layout(tmp_path)
    ps = P.collect_prompts([train])
    assert sorted(ps.prompts) == ["Keep me.", "What is the meaning of life, really?"]
    assert ps.stats[0].eval_overlap == 2 and len(ps.eval_files) == 2
    assert len(P.load_prompts([train], exclude_eval=False)) == 4
    # no evaluation sets above the sources: the check is skipped quietly
    lone = _write(tmp_path / "elsewhere" / "t.json", [{"instruction": "Prove the Pythagorean Theorem."}])
    ps = P.collect_prompts([lone])
    assert ps.prompts == ["Prove the Pythagorean Theorem."] and ps.eval_files == []
    assert P.load_prompts([lone], eval_root=data) == []


def test_limit_and_seed_determinism(tmp_path):
    f = _write(tmp_path / "many.jsonl", [{"question": f"question number {i}"} for i in range(50)])
    a = P.load_prompts([f], seed=3)
    assert a == P.load_prompts([f], seed=3) and sorted(a) == sorted(P.load_prompts([f], seed=4))
    assert a != P.load_prompts([f], seed=4)
    assert P.load_prompts([f], seed=3, limit=7) == a[:7]
    assert P.load_prompts([f], limit=0) == []


def test_default_sources_root(monkeypatch, tmp_path):
    monkeypatch.setenv("M2R2_DATA", str(tmp_path / "missing"))
    with pytest.raises(M2R2Error, match="missing"):
        P.default_train_sources()
    monkeypatch.delenv("M2R2_DATA")
    assert P.DEFAULT_TRAIN_SOURCES[0].endswith("shared/data/train_prompts")


@pytest.mark.skipif(not Path(P.DEFAULT_TRAIN_SOURCES[0]).is_dir(), reason="shared data dir absent")
def test_real_default_sources():
    ps = P.collect_prompts(P.DEFAULT_TRAIN_SOURCES)
    assert len(ps.prompts) > 30000 and len(ps.eval_files) == 7
    assert all(p and p == p.strip() for p in ps.prompts)
    keys = {P.normalize(p) for p in ps.prompts}
    assert len(keys) == len(ps.prompts)
    mt = Path(P.DEFAULT_TRAIN_SOURCES[0]).parent / "mt_bench" / "question.jsonl"
    first = [json.loads(line)["turns"][0] for line in mt.read_text().splitlines() if line.strip()]
    assert len(first) == 80 and not keys & {P.normalize(t) for t in first}
    assert sum(s.eval_overlap for s in ps.stats) == 2  # SOURCES.md: 3 records, 2 distinct prompts
    assert {s.format for s in ps.stats} >= {
        "instruction",
        "question",
        "conversations",
        "messages",
        "oa_tree",
        "self_instruct",
    }


# ----------------------------------------------------------------------------- distill cache


def _encode(text):  # tokenizer-free stand-in for the chat-encoded prompt
    return [1] + [3 + b % 250 for b in text.encode()]


DISTILL_PROMPTS = [f"prompt {i} " + "x" * (3 * i) for i in range(10)] + ["too long " + "y" * 60, "prompt 0 "]
KW = dict(max_prompt_tokens=48, max_new_tokens=6, batch_size=3, shard_size=4, progress=False)


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint

    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, jax.tree.map(jnp.asarray, params), _encode


@pytest.fixture(scope="module")
def full_cache(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill_full")
    return out, build_distill_cache(tiny_model, DISTILL_PROMPTS, out, **KW)


def test_distill_cache_contents(tiny_model, full_cache):
    from m2r2_jax.decoding.generate import GenerateConfig, Generator

    cfg, params, enc = tiny_model
    out, ds = full_cache
    rows = ds.to_list()
    assert len(rows) == 10  # one too long, one duplicate
    assert [len(r["prompt_ids"]) for r in rows] == sorted(len(r["prompt_ids"]) for r in rows)
    assert {r["prompt"] for r in rows} == set(DISTILL_PROMPTS[:10])
    man = read_manifest(out)
    assert [s["rows"] for s in man["shards"]] == [4, 4, 2] and man["complete"]
    assert man["last_run"]["skipped_too_long"] == 1 and man["settings"]["max_new_tokens"] == 6
    eos = set(cfg.eos_token_ids)
    for r in rows:
        assert r["prompt_ids"] == enc(r["prompt"])
        a = r["answer_ids"]
        assert 1 <= len(a) <= 6 and (len(a) == 6 or a[-1] in eos)
    ref = Generator(cfg).generate(params, [rows[5]["prompt_ids"]], GenerateConfig(max_new_tokens=6)).new_ids[0]
    assert rows[5]["answer_ids"] == ref
    assert load_distill_cache(out).to_list() == rows


def test_distill_resume_equals_unbroken_run(tiny_model, full_cache, tmp_path, monkeypatch):
    from m2r2_jax.decoding import generate as G

    out = tmp_path / "cache"
    part = build_distill_cache(tiny_model, DISTILL_PROMPTS, out, max_shards=1, **KW)
    assert len(part) == 4 and not read_manifest(out)["complete"]
    # a crash in the middle of the second shard leaves no partial shard behind
    real, calls = G.Generator.generate, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(self, *a, **k)

    monkeypatch.setattr(G.Generator, "generate", flaky)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_distill_cache(tiny_model, DISTILL_PROMPTS, out, **KW)
    monkeypatch.setattr(G.Generator, "generate", real)
    assert len(read_manifest(out)["shards"]) == 1 and len(load_distill_cache(out)) == 4
    ds = build_distill_cache(tiny_model, DISTILL_PROMPTS, out, **KW)
    man = read_manifest(out)
    assert man["last_run"]["already_done"] == 4 and man["last_run"]["generated"] == 6 and man["complete"]
    assert ds.to_list() == full_cache[1].to_list()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [f"shard_0000{i}.jsonl" for i in range(3)]
    # a finished cache reruns without generating anything
    build_distill_cache(tiny_model, DISTILL_PROMPTS, out, **KW)
    assert read_manifest(out)["last_run"]["generated"] == 0


def test_distill_pack_carries_a_run_across_checkouts(tiny_model, full_cache, tmp_path):
    """A partial run packed (answers + prompt hashes, no prompt text), its cache deleted (a new
    checkout), restored from the pack and finished: the same records as an unbroken run; the pack
    holds no prompt text; a pack whose prompt is not among the prompts is refused, writing nothing."""
    from m2r2_jax.training.distill_pack import read_pack, restore_cache, sync_pack

    cache, pack = tmp_path / "cache", tmp_path / "pack"
    build_distill_cache(tiny_model, DISTILL_PROMPTS, cache, max_shards=2, on_shard=lambda: sync_pack(cache, pack), **KW)
    assert [s["file"] for s in read_pack(pack)["shards"]] == ["shard_00000.npz", "shard_00001.npz"]
    assert not any(b"prompt 1" in p.read_bytes() for p in pack.iterdir())
    shutil.rmtree(cache)
    with pytest.raises(M2R2Error, match="not among the training prompts"):
        restore_cache(pack, cache, [p for p in DISTILL_PROMPTS if p != "prompt 0 "], _encode)
    assert not cache.exists()
    assert restore_cache(pack, cache, DISTILL_PROMPTS, _encode) == 2
    assert restore_cache(pack, cache, DISTILL_PROMPTS, _encode) == 0  # nothing left to restore
    ds = build_distill_cache(tiny_model, DISTILL_PROMPTS, cache, on_shard=lambda: sync_pack(cache, pack), **KW)
    assert read_manifest(cache)["last_run"]["generated"] == 2 and read_manifest(cache)["complete"]
    assert ds.to_list() == full_cache[1].to_list()
    assert len(read_pack(pack)["shards"]) == 3
    # another run's cache under the same shard names is refused
    with pytest.raises(M2R2Error, match="different shards under the same names"):
        sync_pack(_renamed_rows(full_cache[0], tmp_path), pack)


def _renamed_rows(src, tmp_path):
    """A copy of a cache whose first shard has one row fewer (another run)."""
    dst = tmp_path / "other"
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    man["shards"][0]["rows"] -= 1
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def test_distill_refuses_mismatched_cache(tiny_model, full_cache):
    cfg, params, enc = tiny_model
    out = full_cache[0]
    with pytest.raises(M2R2Error, match="settings.max_new_tokens"):
        build_distill_cache(tiny_model, DISTILL_PROMPTS, out, **{**KW, "max_new_tokens": 7})
    other = jax.tree.map(lambda a: a * 1.01, params)
    with pytest.raises(M2R2Error, match="model.params_fingerprint"):
        build_distill_cache((cfg, other, enc), DISTILL_PROMPTS, out, **KW)
    with pytest.raises(M2R2Error, match="model.probe_ids"):
        build_distill_cache((cfg, params, lambda t: _encode(t.upper())), DISTILL_PROMPTS, out, **KW)
    with pytest.raises(M2R2Error, match="model.source"):
        build_distill_cache((cfg, params, enc, "some/other/model"), DISTILL_PROMPTS, out, **KW)


def test_distill_model_from_loaded_model(tiny_model):
    from m2r2_jax.loading.registry import LoadedModel

    class FakeTok:
        chat_template = "fake"

        def apply_chat_template(self, messages, add_generation_prompt):
            assert add_generation_prompt and messages[0]["role"] == "user"
            return [1, 9] + _encode(messages[0]["content"])[1:]

    cfg, params, _ = tiny_model
    m = as_distill_model(LoadedModel(cfg=cfg, params=params, tokenizer=FakeTok(), source="x", kind="hf"))
    assert isinstance(m, DistillModel) and m.encode("ab") == [1, 9, 3 + 97, 3 + 98] and m.source == "x"
    with pytest.raises(M2R2Error, match="tokenizer"):
        as_distill_model(LoadedModel(cfg=cfg, params=params, tokenizer=None, source="x", kind="hf"))


def test_pack_examples_masks():
    """Answer-only mask by default; with loss_on_prompt every real token; long prompts keep their end."""
    import numpy as np

    from m2r2_jax.data.batches import pack_examples

    recs = [
        {"prompt_ids": [5, 6, 7], "answer_ids": [8, 9]},
        {"prompt_ids": list(range(10, 30)), "answer_ids": list(range(40, 60))},
    ]
    toks, mask = pack_examples(recs, 8)
    assert toks[0].tolist() == [5, 6, 7, 8, 9, 0, 0, 0] and mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert toks[1, :4].tolist() == [26, 27, 28, 29] and toks[1, 4:].tolist() == [40, 41, 42, 43]
    assert mask[1].tolist() == [0] * 4 + [1] * 4
    toks2, mask2 = pack_examples(recs, 8, loss_on_prompt=True)
    assert np.array_equal(toks, toks2)
    assert mask2[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0] and mask2[1].tolist() == [1] * 8


def test_eval_items_carry_reference_answers():
    from m2r2_jax.data.eval_sets import items_of

    si = items_of(
        [{"id": "t0", "instruction": "Fix it.", "instances": [{"input": "teh cat", "output": "the cat"}]}],
        "self_instruct",
    )
    assert si[0].turns == ["Fix it.\n\nteh cat"] and si[0].reference == "the cat"
    mt = items_of(
        [
            {"question_id": 1, "category": "math", "turns": ["2+2?", "and 3+3?"], "reference": ["4", "6"]},
            {"question_id": 2, "category": "writing", "turns": ["A poem."]},
        ],
        "mt_bench",
    )
    assert [it.reference for it in mt] == ["4", None]
    al = items_of([{"instruction": "Say hi.", "input": "", "output": "Hi!"}], "alpaca_eval")
    assert al[0].reference == "Hi!"
    assert items_of([{"prompt": "Tell me a joke."}], "koala")[0].reference is None
