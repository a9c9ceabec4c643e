"""CLI behaviour: bad input -> exactly one `error:` line, exit code 2, nothing written."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.errors import M2R2Error


def _run(args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": "."},
        timeout=300,
    )


@pytest.mark.parametrize(
    "args, msg",
    [
        (["eval.generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], "GGUF file not found"),
        (["eval.generate", "--model", "/tmp", "--prompt", "hi"], "missing config.json"),
        (["train.train", "--config", "/nonexistent.yaml"], "config file not found"),
        (["train.train", "bogus_key=3"], "unknown config key 'bogus_key'"),
    ],
)
def test_bad_input_is_one_error_line(args, msg):
    r = _run(args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and msg in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_hub_id_offline_is_clear_error():
    from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint

    with pytest.raises(M2R2Error, match="cannot fetch 'no-such-org/no-such-model' from the hub"):
        load_hf_checkpoint("no-such-org/no-such-model")


def test_bf16_dtype_policy(tiny_llama_dir):
    from m2r2_jax.config import replace
    from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
    from m2r2_jax.loading.registry import place_params
    from m2r2_jax.model import decoder as D

    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 256, (1, 16)), jnp.int32)
    ref, _ = D.forward(cfg, place_params(cfg, params), ids, D.init_cache(cfg, 1, 16), jnp.zeros(1, jnp.int32))
    c16 = replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    p16 = place_params(c16, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))
    out, cache = D.forward(c16, p16, ids, D.init_cache(c16, 1, 16), jnp.zeros(1, jnp.int32))
    assert cache.k[0].dtype == jnp.bfloat16 and out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()


def test_plot_train_curves(tmp_path, capsys):
    import json

    from eval.plot_train import main

    rows = [
        {
            "step": i,
            "loss": 5.0 / i,
            "kd": 4.0 / i,
            "align": 0.5,
            "router_bce": 0.3,
            "agreement": i / 40,
            "agreement_per_layer/0": i / 80,
            "agreement_per_layer/1": i / 40,
        }
        for i in range(1, 31)
    ]
    src = tmp_path / "metrics.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(src), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    other = tmp_path / "b" / "metrics.jsonl"
    other.parent.mkdir()
    other.write_text("\n".join(json.dumps(dict(r, agreement=r["agreement"] / 2)) for r in rows))
    assert main([str(src), str(other), "--labels", "a,b", "--out", str(tmp_path / "two.png")]) == 0
    assert (tmp_path / "two.png").read_bytes()[:4] == b"\x89PNG"
    from m2r2_jax.cli import run_main

    with pytest.raises(SystemExit) as e:
        run_main(main, [str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "d.png")])
    assert e.value.code == 2 and "file not found" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()
    with pytest.raises(SystemExit) as e:  # one label for two files
        run_main(main, [str(src), str(other), "--labels", "a", "--out", str(tmp_path / "d.png")])
    assert e.value.code == 2 and "1 labels for 2 metrics files" in capsys.readouterr().err
    assert not (tmp_path / "d.png").exists()
