"""End-to-end distillation of a retrained MoE's down-projection deltas (training/moe_distill.py) on a
tiny random model: the KL to the dense model falls, a call cut by `until` or by its minute budget resumes
to the same deltas as an unbroken run, checkpoints come every `save_every` steps and at least every
`save_minutes`, the factor balancing keeps the product, and a foreign checkpoint or asset is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.data.batches import pack_examples
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.moefied import moe_config, moefy_params
from m2r2_jax.training import moe_distill as MD
from tests.test_moe_retrain import TINY, _dense, _records


def test_end_to_end_distillation_lowers_the_kl_and_resumes_exactly(tmp_path):
    cfg, dense = TINY, _dense(TINY)
    rs = np.random.RandomState(0)
    perm = np.stack([rs.permutation(128) for _ in range(3)])
    router = rs.randn(3, 32, 4).astype(np.float32)
    mcfg = moe_config(cfg, 4, 2)
    base = moefy_params(cfg, dense, perm, router)
    deltas = {"down_a": np.zeros((3, 4, 32, 2), np.float32), "down_b": 0.1 * rs.randn(3, 2, 32).astype(np.float32)}
    recs = _records(12, seed=1)
    c = MD.DistillConfig(steps=8, batch_size=4, seq_len=64, lr=6e-2)
    full, s = MD.distill(mcfg, base, deltas, cfg, dense, recs, c, tmp_path / "a", "fp", progress=False, save_every=4)
    assert s["finished"] and s["steps"] == 8 and s["trainable_params"] == 3 * (4 * 32 * 2 + 2 * 32)
    tok, mask = (jnp.asarray(v) for v in pack_examples(recs, 64))
    kl = jax.jit(lambda d: MD.kl_loss(mcfg, cfg, d, base, dense, tok, mask))
    assert float(kl(full)) < 0.9 * float(kl(deltas)), (float(kl(deltas)), float(kl(full)))
    assert (tmp_path / "a" / "checkpoints" / "4").is_dir() and (tmp_path / "a" / "checkpoints" / "8").is_dir()
    # interrupted after 3 steps (a forced checkpoint at 3), then a call cut by its budget after one step
    # (checkpoint at 4), resumed: the same deltas as without a break
    MD.distill(mcfg, base, deltas, cfg, dense, recs, c, tmp_path / "b", "fp", progress=False, until=3)
    _, cut = MD.distill(mcfg, base, deltas, cfg, dense, recs, c, tmp_path / "b", "fp", progress=False, max_minutes=1e-9)
    assert (cut["steps"], cut["finished"]) == (4, False) and (tmp_path / "b" / "checkpoints" / "4").is_dir()
    again, s2 = MD.distill(mcfg, base, deltas, cfg, dense, recs, c, tmp_path / "b", "fp", progress=False)
    assert s2["steps"] == 8 and s2["finished"]
    for n in full:
        np.testing.assert_allclose(again[n], full[n], rtol=1e-5, atol=1e-6)
    # the wall-clock cadence: with save_every far off, a checkpoint after every step once save_minutes passed
    t = tmp_path / "t"
    MD.distill(
        mcfg, base, deltas, cfg, dense, recs, c, t, "fp", progress=False, until=3, save_every=100, save_minutes=1e-9
    )
    assert sorted(int(d.name) for d in (t / "checkpoints").iterdir() if d.name.isdigit()) == [2, 3]  # keep=2
    bal = MD.balance_factors({"down_a": 10 * full["down_a"], "down_b": full["down_b"] / 10})
    for i in range(3):  # the same product, factors of equal norm
        np.testing.assert_allclose(
            np.einsum("efr,rd->efd", bal["down_a"][i], bal["down_b"][i]),
            np.einsum("efr,rd->efd", full["down_a"][i], full["down_b"][i]),
            rtol=1e-4,
            atol=1e-6,
        )
        assert np.isclose(np.linalg.norm(bal["down_a"][i]), np.linalg.norm(bal["down_b"][i]), rtol=1e-4)
    with pytest.raises(M2R2Error, match="another distillation"):
        MD.distill(
            mcfg, base, deltas, cfg, dense, recs, MD.DistillConfig(steps=9), tmp_path / "b", "fp", progress=False
        )
    with pytest.raises(M2R2Error, match="down_a / down_b"):
        MD.distill(mcfg, base, {"down": 0}, cfg, dense, recs, c, tmp_path / "c", "fp", progress=False)
    with pytest.raises(M2R2Error, match="save_minutes"):
        MD.distill(mcfg, base, deltas, cfg, dense, recs, c, tmp_path / "c", "fp", progress=False, save_minutes=11)
