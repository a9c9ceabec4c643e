"""Ahead-of-time compilation for a TPU slice that is not attached (libtpu from the `tpu` extra):
`eval.compile_tpu` on a tiny model for v5e:2x2, the Pallas tree attention compiled for the chip, the
fit check, and the roofline projection arithmetic."""

import json
import math

import pytest

from m2r2_jax.errors import M2R2Error

pytest.importorskip("libtpu", reason="the `tpu` extra (libtpu) is not installed")

TINY_MODEL = """
arch: llama
vocab_size: 256
hidden_size: 64
intermediate_size: 128
num_layers: 4
num_heads: 4
num_kv_heads: 2
head_dim: 16
max_position_embeddings: 1024
"""

TINY_TRAIN = """
model: tiny
seq_len: 64
batch_size: 8
m2r2: {rate: 2, rank: 4, router_dim: 8, draft_vocab: 64}
"""


@pytest.fixture(scope="module")
def tpu():
    from m2r2_jax.aot import tpu_devices

    try:
        return tpu_devices("v5e:2x2")
    except M2R2Error as e:
        if "lockfile" in str(e):  # another process on this machine holds libtpu
            pytest.skip(str(e))
        raise


def test_compile_tpu_cli_tiny(tpu, tmp_path, capsys):
    from eval.compile_tpu import main

    (tmp_path / "m.yaml").write_text(TINY_MODEL)
    (tmp_path / "t.yaml").write_text(TINY_TRAIN)
    argv = ["--topology", "v5e:2x2", "--model-config", str(tmp_path / "m.yaml"), "--config", str(tmp_path / "t.yaml")]
    assert main(argv + ["--what", "train,decode,speculative", "--mesh", "data=2,tensor=2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["chips"] == 4 and out["device_kind"].lower().startswith("tpu v5") and out["mesh"]["tensor"] == 2
    assert set(out["programs"]) == {"train", "decode", "speculative"}
    for name, r in out["programs"].items():
        assert r["fits"] and 0 < r["per_device_bytes"] < r["hbm_bytes"] == 16 << 30, name
        assert r["flops"] > 0 and r["bytes_accessed"] > 0, name
    # data parallelism: the gradients are all-reduced across the data axis
    assert out["programs"]["train"]["collectives"].get("all-reduce", 0) >= 1
    with pytest.raises(M2R2Error, match="--what"):
        main(argv + ["--what", "nope"])


def test_pallas_tree_attention_compiles_for_tpu(tpu):
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from m2r2_jax.kernels.pallas_attention import tree_attention

    sh = SingleDeviceSharding(tpu[0])
    B, T, H, KV, hd, S = 2, 5, 9, 3, 64, 512

    def f(s, dt=jnp.float32):
        return jax.ShapeDtypeStruct(s, dt, sharding=sh)

    args = (f((B, T, H, hd)), f((B, KV, S, hd)), f((B, KV, S, hd)), f((B,), jnp.int32))
    args += (f((B, KV, T, hd)), f((B, KV, T, hd)), f((T, T), jnp.bool_))
    c = jax.jit(lambda *a: tree_attention(*a)).lower(*args).compile()
    assert "tpu_custom_call" in c.as_text()  # the Mosaic kernel, not an XLA fallback


def test_does_not_fit_is_reported(tpu):
    import jax
    import jax.numpy as jnp

    from m2r2_jax.aot import compile_report

    x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(tpu[0]))
    r = compile_report(lambda a: a @ a, (x,), hbm=1 << 20)
    assert not r.fits and r.per_device_bytes >= 2 * 4 << 20 and r.flops >= 2 * 1024**3


def test_roofline_projection_arithmetic():
    from m2r2_jax.roofline import CHIPS, projected_speedup, step_ms

    v5e = CHIPS["v5e"]
    mem = step_ms(1e9, 819e6, v5e)  # 1 GFLOP (5 us) vs 819 MB (1 ms): memory-bound
    assert mem["bound"] == "memory" and math.isclose(mem["ms"], 1.0)
    comp = step_ms(197e12, 1.0, v5e)
    assert comp["bound"] == "compute" and math.isclose(comp["ms"], 1000.0)
    # a step that costs 1.5 AR tokens and emits 3 tokens: 2x; lookup steps skip the draft
    assert math.isclose(projected_speedup(1.0, 0.5, 1.0, 3.0), 2.0)
    assert math.isclose(projected_speedup(1.0, 0.5, 1.0, 3.0, lookup_share=1.0, tau_lookup=4.0), 4.0)
    with pytest.raises(M2R2Error):
        projected_speedup(0.0, 0.5, 1.0, 3.0)
