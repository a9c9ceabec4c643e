"""Sharded == unsharded forward and decode on forced-CPU-device meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2r2_jax.decoding.generate import GenerateConfig, Generator
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.loading.registry import place_params
from m2r2_jax.model import decoder as D
from m2r2_jax.model.params import logical_axes, model_spec
from m2r2_jax.sharding import MeshConfig, logical_to_pspec, make_mesh, named_sharding, tree_shardings

MESHES = [
    dict(data=1, fsdp=1, tensor=8),
    dict(data=1, fsdp=8, tensor=1),
    dict(data=2, fsdp=1, tensor=4),
    dict(data=2, fsdp=2, tensor=2),
]


@pytest.fixture(scope="module")
def tiny_np(tiny_llama_dir):
    cfg, params, _ = load_hf_checkpoint(str(tiny_llama_dir))
    return cfg, params


def test_have_8_devices():
    assert len(jax.devices()) == 8, "conftest must force 8 CPU devices"


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(str(v) for v in a.values()))
def test_sharded_forward_and_decode_match(tiny_np, axes):
    cfg, params_np = tiny_np
    mesh = make_mesh(MeshConfig(**axes))
    ref_params = place_params(cfg, params_np)
    sh_params = place_params(cfg, params_np, mesh)
    # weights really are split across devices
    assert any(
        len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(sh_params)
    )

    ids = jnp.asarray(np.random.RandomState(0).randint(3, 256, (4, 24)), jnp.int32)
    fwd = lambda p, t: D.forward(cfg, p, t, D.init_cache(cfg, 4, 32), jnp.zeros(4, jnp.int32))[0]
    ref = jax.jit(fwd)(ref_params, ids)
    pshard = tree_shardings(mesh, logical_axes(model_spec(cfg)), sh_params)
    out = jax.jit(fwd, in_shardings=(pshard, named_sharding(mesh, ("batch", "seq"), ids.shape)))(sh_params, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5)

    prompts = [ids[i, : 5 + 4 * i].tolist() for i in range(4)]
    g = GenerateConfig(max_new_tokens=12, stop_ids=(-1,))
    a = Generator(cfg).generate(ref_params, prompts, g).new_ids
    b = Generator(cfg, mesh).generate(sh_params, prompts, g).new_ids
    assert a == b


def test_uneven_dims_stay_replicated():
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=8))
    assert logical_to_pspec(("embed", "heads"), (576, 576), mesh) == jax.sharding.PartitionSpec(None, "tensor")
    assert logical_to_pspec(("embed", "kv_heads"), (576, 9), mesh) == jax.sharding.PartitionSpec(None, None)


def test_bad_mesh_is_an_error():
    with pytest.raises(M2R2Error, match="needs 12 devices"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=3))
