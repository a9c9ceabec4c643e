"""Expert offloading on a real (tiny, random) MoE model: the routing traces of the host-driven decode
(evaluation/moe_trace.py, moe_decode.py), the real mode's tokens from cached weights, the sim mode's
rows (moe_offload.py) and the CLI's option checks (eval/moe_offload.py)."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.config import ModelConfig
from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.errors import M2R2Error
from m2r2_jax.evaluation import moe_offload as MO
from m2r2_jax.evaluation import moe_trace as MT
from m2r2_jax.evaluation import moe_tracefile as TF
from m2r2_jax.evaluation.moe_decode import MoEDecoder, aligned_state, merged_fast_stream, ram_experts
from m2r2_jax.loading.moefied import moe_config, moefy_params
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import m2r2_spec
from m2r2_jax.model import decoder as D
from m2r2_jax.model.params import abstract_params, model_spec
from m2r2_jax.offload import POLICIES, ExpertStore, build_schedule, run_real

E, K, NEW = 4, 2, 8
PROMPTS = [[5, 17, 33, 9, 4], [7, 8, 9], list(range(20, 34))]
CALIBRATION = [[11, 12, 13, 40], [60, 61]]  # other prompts: they pick the calibrated alignment


def _random(abstract, seed: int, scale: float):
    """Random float32 params of the given shapes (norms near 1): much faster than the modules' init."""
    rng = np.random.default_rng(seed)

    def one(a):
        if len(a.shape) == 1:
            return (1.0 + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
        return (scale * rng.standard_normal(a.shape)).astype(np.float32)

    return jax.tree.map(one, abstract)


@pytest.fixture(scope="module")
def model():
    """A 4-layer SwiGLU model MoEfied into 4 experts (top-2; layer 1 stays dense) and a random fast
    stream (rate 2: two fast layers) trained, as it were, on the dense model."""
    dense = ModelConfig(
        arch="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        eos_token_ids=(2,),
    ).validate()
    dp = _random(abstract_params(model_spec(dense)), 0, 0.3)
    rng = np.random.default_rng(1)
    perm = np.stack([rng.permutation(64) for _ in range(4)])
    router = rng.standard_normal((4, 32, E)).astype(np.float32)
    cfg = moe_config(dense, E, K, dense_layers=(1,))
    params = moefy_params(dense, dp, perm, router, dense_layers=(1,))
    mc = M2R2Config(rate=2, layer_map="skip", rank=4)
    fast = merged_fast_stream(dense, mc, dp, _random(abstract_params(m2r2_spec(dense, mc)), 2, 0.1))
    plain = [Generator(cfg).generate(params, [p], GenerateConfig(max_new_tokens=NEW)).new_ids[0] for p in PROMPTS]
    return cfg, params, MoEDecoder(cfg, params, fast), plain


@pytest.fixture(scope="module")
def collected(model):
    _, _, dec, _ = model
    return MT.collect(dec, PROMPTS, NEW)


def test_trace_is_the_routing_forward_routing_reports(model, collected):
    cfg, params, dec, plain = model
    assert dec.moe == (0, 2, 3)
    assert collected.tokens == plain  # the host-driven decode is the plain greedy decode
    fr = jax.jit(lambda p, t: D.forward_routing(cfg, p, t, D.init_cache(cfg, 1, 64), jnp.zeros((1,), jnp.int32)))
    at = 0
    for prompt, toks, n in zip(PROMPTS, collected.tokens, collected.steps):
        assert n == len(toks) - 1  # every generated token but the last is a decode step's input
        seq = prompt + toks[:-1]
        _, _, routing = fr(params, jnp.asarray([seq + [0] * (32 - len(seq))]))  # one shape: one compile
        assert sorted(routing) == [0, 2, 3]
        want = np.stack([np.asarray(routing[i]["expert_ids"][0, len(prompt) : len(prompt) + n]) for i in (0, 2, 3)], 1)
        np.testing.assert_array_equal(collected.needed[at : at + n], want)
        at += n
    assert at == collected.needed.shape[0] and collected.states.shape[1:] == (3, 32)


def test_alignment_of_fast_states():
    t = [0, 3, 6, 9]  # h^0 and three fast states aligned with slow layers 3, 6, 9
    assert [aligned_state(t, j, "floor") for j in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [aligned_state(t, j, "nearest") for j in range(9)] == [0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert [aligned_state(t, j, "ceil") for j in range(9)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_calibrated_alignment_is_the_best_state_per_layer(model, collected):
    _, _, dec, _ = model
    src, rec = MT.calibrate_alignment(dec, collected, K)
    assert rec.shape == (3, 3) and np.array_equal(src, rec.argmax(0))  # states h^0, h_f^1, h_f^2 x 3 MoE layers
    preds = MT.predictions(dec, collected, K, {"calibrated": src})
    floor = dec.state_index("floor")
    for l in range(3):  # the recall table agrees with the predictions of a fixed map at its states
        got = (preds["m2r2"]["floor"][:, l, :, None] == collected.needed[:, l, None, :]).any(1).mean()
        assert rec[floor[l], l] == pytest.approx(got)
    per_layer = [
        (preds["m2r2"]["calibrated"][:, l, :, None] == collected.needed[:, l, None, :]).any(1).mean() for l in range(3)
    ]
    assert per_layer == pytest.approx(rec.max(0).tolist())


def test_prediction_against_the_previous_tokens_experts():
    needed = np.array([[[0, 1]], [[1, 2]], [[2, 3]]])
    pred = np.array([[[0, 1]], [[1, 3]], [[0, 2]]])
    prev = np.concatenate([needed[:1], needed[:-1]])
    got = MT.predicted_vs_previous(pred, needed, prev, np.array([False, True, True]), 8)
    # step 1: both {1} used, predicted only {3}, previous only {0}, neither {2, 4..7} with 2 used;
    # step 2: both {2} used, predicted only {0}, previous only {1}, neither {3, 4..7} with 3 used
    assert got["both"] == {"p_used": 1.0, "per_layer": 1.0}
    assert got["predicted_only"] == {"p_used": 0.0, "per_layer": 1.0} == got["previous_only"]
    assert got["neither"] == {"p_used": pytest.approx(0.2), "per_layer": 5.0}


def test_recall_and_trace_predictions(model, collected):
    _, _, dec, _ = model
    preds = MT.predictions(dec, collected, K)
    rep = MT.recall_report(collected, preds, K, E)
    assert rep["chance"] == K / E
    assert [r["distance"] for r in rep["gate"]["by_distance"]] == [1, 2]
    assert [r["distance"] for r in rep["m2r2"]["floor"]] == [0, 1, 2]
    assert all(0.0 <= r["recall"] <= 1.0 for rows in rep["m2r2"].values() for r in rows)
    tr = MT.build_trace(dec, collected, preds, "nearest", K)
    np.testing.assert_array_equal(tr.m2r2_pred, preds["m2r2"]["nearest"])
    # gate_pred for MoE layer l is MoE layer l's router on MoE layer l-1's MLP input
    x = collected.x[:, 1]
    logits = np.einsum("td,de->te", x, np.asarray(dec.routers[2]))
    assert (np.sort(tr.gate_pred[:, 2], -1) == np.sort(np.argsort(-logits, -1)[:, :K], -1)).all()


def test_real_mode_decodes_the_plain_tokens_from_cached_weights(model, tmp_path):
    cfg, params, dec, plain = model
    ec = MO.MoEOffloadConfig(
        mode="real", max_new_tokens=NEW, cache_fractions=(K / (3 * E), 0.5), repeats=2, alignment="ceil"
    )
    res = MO.run_moe_offload(dec, PROMPTS, ec, store_path=tmp_path / "experts.bin", plain_tokens=plain)
    assert res["recall"]["m2r2_state_per_layer"] == dec.state_index("ceil").tolist()  # a fixed map: no calibration
    assert res["identical_outputs"] is True and res["plain_decode_match"] == [True] * 3
    assert len(res["results"]) == 2 * 4 and all(r["tokens_identical"] for r in res["results"])
    assert res["store"]["m2r2_live_prediction_mismatches"] == {K / (3 * E): 0, 0.5: 0}
    base = [r for r in res["results"] if r["policy"] == "ondemand"]
    assert all(r["hit_rate"] == 0 and r["speedup_vs_ondemand"] == 1.0 for r in base)
    # the FFN really reads the store: corrupt one layer's experts there and the tokens change
    col = MT.collect(dec, PROMPTS, NEW)
    tr = MT.build_trace(dec, col, MT.predictions(dec, col, K), "floor", K)
    ex = ram_experts(cfg, params)
    bad = ExpertStore.write(
        tmp_path / "bad.bin",
        _layout(cfg),
        lambda l, e: {p: ex[l][p][e] * (-30.0 if (l == 0 and p == "down") else 1.0) for p in ("gate", "up", "down")},
    )
    seqs = [dec.start(p, NEW) for p in PROMPTS]
    drv = MO._Driver(dec, seqs, None, K, None)
    try:
        run_real(build_schedule("lru", tr, 0.5), bad, drv.compute, drv.token)
    except M2R2Error as e:  # the corrupted FFN may route the decode elsewhere than the schedule
        assert "router chose" in str(e)
    else:
        assert drv.tokens != plain
    bad.close()


def _same_run(a, b) -> bool:
    return (a["link"], a["compute"]) == (b["link"], b["compute"])


def _layout(cfg):
    from m2r2_jax.offload import ExpertLayout

    return ExpertLayout(3, E, cfg.hidden_size, cfg.moe_intermediate_size)


def test_sim_mode_rows(model):
    _, _, dec, plain = model
    ec = MO.MoEOffloadConfig(
        mode="sim",
        links=("pcie4", "nvme"),
        max_new_tokens=NEW,
        cache_fractions=(0.5, 1.0),
        launch_us=(0.0, 20.0),
        window_sweep=(0, 1),
    )
    res = MO.run_moe_offload(dec, PROMPTS, ec, plain_tokens=plain, calibration=CALIBRATION)
    # links x compute (measured, projected, projected+20us) x fractions x policies
    assert len(res["results"]) == 2 * 3 * 2 * 4 and res["identical_outputs"] is True
    assert {r["compute"] for r in res["results"]} == {"measured", "projected", "projected+20us"}
    assert len(res["window_sweep"]) == 2 * 3 * 2 * 2 and {r["window"] for r in res["window_sweep"]} == {0, 1}
    keys = {
        "policy",
        "cache_fraction",
        "hit_rate",
        "recall",
        "stall_ms_per_token",
        "tokens_per_second",
        "speedup_vs_ondemand",
    }
    assert all(keys <= set(r) for r in res["results"])
    # m2r2_aot (scored): a look-ahead of 2 layers, never more stall than ondemand on the same trace and link
    aot = [r for r in res["results"] if r["policy"] == "m2r2_aot"]
    assert aot and all(r["window"] == 2 for r in aot) and res["policy_options"]["variant"] == "scored"
    for r in aot:
        base = next(b for b in res["results"] if b["policy"] == "ondemand" and _same_run(b, r))
        assert r["stall_ms_per_token"] <= base["stall_ms_per_token"]
    # the earlier window variant: with the whole cache the window reaches every layer but the first (whose
    # needs are known at its own step): the schedule's recall is the predictor's over layers 1.. (width = k)
    rec, _ = MO.record_run(dec, PROMPTS, ec, plain, calibration=CALIBRATION)
    old = MO.sim_results(rec, dataclasses.replace(ec, aot={"variant": "window"}))
    full = [r for r in old["results"] if r["cache_fraction"] == 1.0 and r["policy"] == "m2r2_aot"]
    by_layer = res["recall"]["m2r2_by_distance"]
    want = sum(r["recall"] * r["needs"] for r in by_layer if r["distance"] >= 1) / sum(r["needs"] for r in by_layer)
    assert full and all(r["recall"] == pytest.approx(want) and r["window"] == 2 for r in full)
    assert old["policy_options"]["variant"] == "window"
    proj, more = res["compute_ms"]["projected"], res["compute_ms"]["projected+20us"]
    assert len(proj["layer_ms"]) == 3 and proj["fast_ms"] > 0 and "not measured" in proj["source"]
    # 20 us per decoder layer (4), per fast layer (2) and the head: where each runs
    assert more["per_token_ms"] - proj["per_token_ms"] == pytest.approx(0.02 * 5)
    assert more["fast_ms"] - proj["fast_ms"] == pytest.approx(0.02 * 2)
    aot = [r for r in res["results"] if r["policy"] == "m2r2_aot"]
    assert all(r["speedup_fast_stream_free"] >= r["speedup_vs_ondemand"] for r in aot)
    assert res["recall"]["m2r2_alignment"] == "calibrated" and res["recall"]["calibration"]["prompts"] == 2
    assert MO.render_png(res).startswith(b"\x89PNG")


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--cache-fraction", "0.5,1.5"], "cache fraction must be in (0, 1]"),
        (["--cache-fraction", "half"], "expected numbers"),
        (["--policies", "lru,belady"], "unknown policy"),
        (["--mode", "fast"], "unknown mode"),
        (["--link", "pcie9"], "unknown link"),
        (["--mode", "real", "--link", "pcie4"], "--link applies to --mode sim"),
        (["--compute", "guessed"], "unknown compute source"),
        (["--chip", "tpu9"], "unknown chip"),
        (["--alignment", "middle"], "unknown alignment"),
        (["--window", "near"], "expected integers"),
        (["--window", "1,2"], "expected auto or one number"),
        (["--window", "-1"], "window must be a number of layers"),
        (["--window-sweep", "1,x"], "expected integers"),
        (["--launch-us", "-5"], "launch overhead must be microseconds"),
        (["--model", "smollm2-135m", "--top-k", "2"], "--top-k applies to a MoEfied alias"),
        (["--top-k", "0"], "--top-k must be >= 1"),
        (["--asset", "no/such/asset"], "no such directory"),
        (["--model", "smollm2-135m", "--asset", "."], "--asset applies to a MoEfied alias"),
        (["--calibration", "0"], "--calibration must be >= 1"),
        (["--calibration-set", "mt_bench"], "shares prompts with the evaluated set"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--max-new-tokens", "1"], "max_new_tokens must be an integer >= 2"),
        (["--checkpoint", "no/such/dir"], "checkpoint not found"),
        (["--trace-in", "t.npz", "--mode", "real"], "--trace-in replays in --mode sim only"),
        (["--trace-in", "a.npz", "--trace-out", "b.npz"], "give one of them"),
        (["--trace-out", "t.json"], "expected a .npz file name"),
        (["--trace-in", "nope.npz"], "not found"),
        (["--aot", "wider=2"], "unknown m2r2_aot option"),
        (["--aot", "margin"], "expected KEY=VALUE"),
        (["--aot", "variant=greedy"], "unknown m2r2_aot variant"),
        (["--out", "no/such/dir/x.json"], "does not exist"),
    ],
)
def test_cli_refuses_bad_options_with_one_line(argv, msg, tmp_path, capsys, monkeypatch):
    from eval.moe_offload import main
    from m2r2_jax.cli import run_main

    monkeypatch.chdir(tmp_path)
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--dataset", "mt_bench", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg in err and err.startswith("error:") and "\n" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


# ---- trace files: record once, replay many times ------------------------------------------------------


def _cli_settings() -> dict:
    """The settings eval.moe_offload asks of a trace file with its default options."""
    from eval.moe_offload import CALIBRATION_SET, DEFAULT_CHECKPOINT, checkpoint_identity

    ckpt = str(Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT)
    return dict(
        model="smollm2-135m-moe",
        dataset="mt_bench",
        limit=8,
        max_new_tokens=32,
        checkpoint=checkpoint_identity(ckpt),
        alignment="calibrated",
        calibration_set=CALIBRATION_SET,
        calibration=4,
        width=0,
        top_k_override=None,
        asset_override=None,
    )


@pytest.fixture(scope="module")
def recording(model):
    _, _, dec, plain = model
    ec = MO.MoEOffloadConfig(max_new_tokens=NEW, cache_fractions=(0.5, 1.0))
    rec, _ = MO.record_run(dec, PROMPTS, ec, plain, calibration=CALIBRATION, settings=_cli_settings())
    return rec


def test_trace_file_round_trip(recording, tmp_path):
    npz, js = TF.save(tmp_path / "t.npz", recording)
    with np.load(npz, allow_pickle=False) as z:  # numeric arrays only
        assert {"needed", "m2r2_probs", "steps"} <= set(z.files) and all(z[k].dtype.kind in "iuf" for k in z.files)
    assert json.loads(js.read_text())["settings"] == recording.settings
    back = TF.load(npz, recording.settings)
    for name in ("needed", "gate_pred", "m2r2_pred", "m2r2_avail", "m2r2_probs"):
        a, b = getattr(recording.trace, name), getattr(back.trace, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert (back.steps, back.tokens, back.plain_match) == (recording.steps, recording.tokens, recording.plain_match)
    assert back.measured_ms == recording.measured_ms and back.recorded == recording.recorded
    for p in POLICIES:  # identical schedules ...
        a, b = build_schedule(p, recording.trace, 0.5), build_schedule(p, back.trace, 0.5)
        assert (a.requests, a.hints, a.hint_probs, a.capacity) == (b.requests, b.hints, b.hint_probs, b.capacity)
    ec = MO.MoEOffloadConfig(
        max_new_tokens=NEW, cache_fractions=(0.5, 1.0), links=("pcie4",), launch_us=(0.0, 20.0), window_sweep=(1,)
    )
    assert MO.sim_results(back, ec) == MO.sim_results(recording, ec)  # ... and metrics


def _rewrite(npz: Path, **arrays) -> None:
    """Replace arrays of a trace file and fix its checksum: a well-formed file with bad contents."""
    import hashlib
    import io

    with np.load(npz, allow_pickle=False) as z:
        a = {k: z[k] for k in z.files} | arrays
    buf = io.BytesIO()
    np.savez(buf, **a)
    npz.write_bytes(buf.getvalue())
    meta = json.loads(npz.with_suffix(".json").read_text())
    meta["npz_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    npz.with_suffix(".json").write_text(json.dumps(meta))


def test_trace_file_bad_input_is_refused_with_one_line(recording, tmp_path):
    settings = recording.settings

    def fresh(name):
        return TF.save(tmp_path / f"{name}.npz", recording)

    def flip(npz):
        b = bytearray(npz.read_bytes())
        b[len(b) // 2] ^= 0xFF
        npz.write_bytes(bytes(b))

    def edit_meta(npz, fn):
        js = npz.with_suffix(".json")
        meta = json.loads(js.read_text())
        fn(meta)
        js.write_text(json.dumps(meta))

    cases = [
        (lambda f: None, {**settings, "limit": 4}, "recorded with limit=8, this run asks for 4"),
        (lambda f: None, {**settings, "checkpoint": {"step": 1, "meta_sha256": "0"}}, "recorded with checkpoint="),
        (flip, settings, "its checksum differs"),
        (lambda f: _rewrite(f, needed=recording.trace.needed + 100), settings, "corrupt file: trace needed"),
        (lambda f: _rewrite(f, steps=np.asarray([1], np.int32)), settings, "do not add up"),
        (lambda f: _rewrite(f, m2r2_probs=np.full((1, 1, 1), 0.5)), settings, "m2r2_probs"),
        (_garbage, settings, "corrupt file: "),  # not a zip, though its checksum matches
        (lambda f: f.with_suffix(".json").unlink(), settings, "not found"),
        (lambda f: f.with_suffix(".json").write_text("{"), settings, "corrupt settings file"),
        (lambda f: edit_meta(f, lambda m: m.update(format="other/1")), settings, "not a trace settings file"),
        (lambda f: edit_meta(f, lambda m: m["settings"].pop("limit")), settings, "settings lack limit"),
    ]
    for i, (spoil, want, msg) in enumerate(cases):
        npz, _ = fresh(str(i))
        spoil(npz)
        with pytest.raises(M2R2Error, match=msg) as e:
            TF.load(npz, want)
        assert "\n" not in str(e.value), msg
    with pytest.raises(M2R2Error, match="expected a .npz"):
        TF.save(tmp_path / "t.json", recording)


def _garbage(npz: Path) -> None:
    import hashlib

    npz.write_bytes(b"PK" + bytes(100))
    meta = json.loads(npz.with_suffix(".json").read_text())
    meta["npz_sha256"] = hashlib.sha256(npz.read_bytes()).hexdigest()
    npz.with_suffix(".json").write_text(json.dumps(meta))


def test_cli_replays_a_trace_file_without_the_model(recording, tmp_path, capsys, monkeypatch):
    from eval.moe_offload import main
    from m2r2_jax.cli import run_main

    def no_model(*a, **k):
        raise AssertionError("a replay must not load the model")

    monkeypatch.setattr("m2r2_jax.loading.registry.load_model", no_model)
    monkeypatch.chdir(tmp_path)
    npz, js = TF.save(tmp_path / "mt.npz", recording)
    argv = ["--trace-in", str(npz), "--cache-fraction", "0.5,1", "--link", "pcie4", "--launch-us", "0,20"]
    with pytest.raises(SystemExit) as e:  # a mismatch: refused, nothing written
        run_main(main, [*argv, "--limit", "4", "--out", str(tmp_path / "bad.json")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and "recorded with limit=8" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mt.json", "mt.npz"]
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        run_main(main, [*argv, "--aot", "variant=window", "--out", str(out), "--no-progress"])
    assert e.value.code == 0
    res = json.loads(out.read_text())
    assert res["config"]["trace_in"] == str(npz) and res["policy_options"]["variant"] == "window"
    assert len(res["results"]) == 3 * 2 * 4 and res["identical_outputs"] is True
    ec = MO.MoEOffloadConfig(
        max_new_tokens=32,
        cache_fractions=(0.5, 1.0),
        links=("pcie4",),
        launch_us=(0.0, 20.0),
        aot={"variant": "window"},
    )
    assert res["results"] == json.loads(json.dumps(MO.sim_results(recording, ec)["results"]))
