"""Sparse MoE models (Mixtral, Qwen2-MoE, OLMoE, GraniteMoE): logits parity with HF transformers (fp32) on
tiny random configs saved with save_pretrained, both checkpoint layouts, the MoE block alone, ragged_dot
against the dense reference, routing records, greedy decoding, and the config's refusals."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2r2_jax.config import ModelConfig, model_config_from_hf
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.model import decoder as D
from m2r2_jax.model.moe import MoEMLP
from m2r2_jax.model.params import logical_axes, model_spec

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
ARCHS = {  # arch -> (HF config and model class names, config fields)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=32, num_local_experts=4)),
    # 3 layers, layer 1 dense (mlp_only_layers): dense and sparse layers mixed, plus the shared expert
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            mlp_only_layers=[1],
            norm_topk_prob=True,
        ),
    ),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=4)),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(
            intermediate_size=32,
            num_local_experts=4,
            attention_multiplier=0.2,  # head_dim**-0.5 would be 0.25
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            logits_scaling=2.0,
        ),
    ),
}


def _hf_model(arch: str, **kw):
    import transformers as tf

    cfg_cls, model_cls, fields = ARCHS[arch]
    torch.manual_seed(sorted(ARCHS).index(arch))
    cfg = getattr(tf, cfg_cls)(**{**BASE, "num_experts_per_tok": 2, **fields, **kw})
    model = getattr(tf, model_cls)(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):  # non-trivial norms and biases catch mistakes
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith(("gate.weight", "router.weight")) and "shared" not in n:
                p.normal_(0.0, 0.3)  # routers with clear margins: the top-k is never a near tie
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (hub-layout dir, HF model); built on first use."""
    out = {}

    def get(arch):
        if arch not in out:
            d = tmp_path_factory.mktemp(arch)
            model = _hf_model(arch)
            model.save_pretrained(d)
            out[arch] = d, model
        return out[arch]

    return get


def _load(d):
    cfg, params, _ = load_hf_checkpoint(str(d))
    return cfg, jax.tree.map(jnp.asarray, params)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_and_routing_match_hf(arch, saved):
    """Logits within 1e-5 of transformers' (measured: at most 2.1e-7), and every sparse layer's experts per token
    equal to the top-k of HF's router logits (forward_routing: the forward that records routing)."""
    d, hf = saved(arch)
    cfg, params = _load(d)
    assert cfg.arch == arch and cfg.mlp_type == "moe"
    ids = np.random.RandomState(0).randint(0, 128, (2, 24))
    run = jax.jit(functools.partial(D.forward_routing, cfg))  # one compile, not one per op
    ours, _, routing = run(params, jnp.asarray(ids, jnp.int32), D.init_cache(cfg, 2, 32), jnp.zeros(2, jnp.int32))
    with torch.no_grad():
        ref = hf(torch.tensor(ids), output_router_logits=True)
    assert np.abs(np.asarray(ours) - ref.logits.numpy()).max() <= 1e-5
    assert sorted(routing) == [i for i in range(cfg.num_layers) if cfg.layer_mlp(i) == "moe"]
    assert len(ref.router_logits) == len(routing)
    for layer, rl in zip(sorted(routing), ref.router_logits):
        want = torch.topk(rl, cfg.experts_per_token, -1).indices.numpy().reshape(2, 24, -1)
        np.testing.assert_array_equal(np.asarray(routing[layer]["expert_ids"]), want)


def test_config_fields_read_from_hf(saved):
    q = _load(saved("qwen2_moe")[0])[0]
    assert (q.dense_layers, q.shared_expert_intermediate_size, q.norm_topk_prob, q.qkv_bias) == ((1,), 48, True, True)
    assert [q.layer_mlp(i) for i in range(3)] == ["moe", "dense", "moe"]
    with pytest.raises(M2R2Error, match="needs its index"):  # a layer of a mixed model must know its place
        q.layer_mlp(None)
    o = _load(saved("olmoe")[0])[0]
    assert o.qk_norm and not o.norm_topk_prob and o.router == "softmax_topk"
    m = _load(saved("mixtral")[0])[0]
    assert m.norm_topk_prob and m.moe_intermediate_size == 32 and m.attn_scale == 16**-0.5
    g = _load(saved("granitemoe")[0])[0]
    assert g.router == "topk_softmax" and g.attn_scale == 0.2
    assert (g.embedding_multiplier, g.residual_multiplier, g.logits_scaling) == (3.0, 0.5, 2.0)


def test_decoder_sparse_step_as_hf_builds_it():
    """Qwen2-MoE's sparse layers: (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers."""
    import transformers as tf

    hf = _hf_model("qwen2_moe", num_hidden_layers=5, decoder_sparse_step=2, mlp_only_layers=[3])
    cfg = model_config_from_hf(hf.config.to_dict())
    sparse = [isinstance(l.mlp, tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock) for l in hf.model.layers]
    assert [cfg.layer_mlp(i) == "moe" for i in range(5)] == sparse == [False, True, False, False, False]
    dense = model_config_from_hf({**hf.config.to_dict(), "mlp_only_layers": [1, 3]})  # no sparse layer left
    assert dense.mlp_type == "dense" and dense.num_experts == 0


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_layout_loads_the_same(arch, saved, tmp_path):
    """transformers' in-memory layout (fused [expert, ...] tensors, save_original_format=False) gives
    the same params as the hub's one-tensor-per-expert layout."""
    d, hf = saved(arch)
    hf.save_pretrained(tmp_path, save_original_format=False)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert any(n.endswith("experts.gate_up_proj") for n in f.keys())
    _, want, _ = load_hf_checkpoint(str(d))
    _, got, _ = load_hf_checkpoint(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("arch", ["granitemoe", "qwen2_moe"])  # both routers; the shared expert
def test_moe_block_matches_hf_block(arch, saved):
    """Layer 0's MoE block alone, and its routing, against transformers' block and router."""
    d, hf = saved(arch)
    cfg, params = _load(d)
    x = np.random.RandomState(1).randn(2, 5, 64).astype(np.float32)
    run = jax.jit(lambda p, x: MoEMLP(cfg).apply({"params": p}, x, mutable=["intermediates"]))
    y, rec = run(params["layers"][0]["mlp"], jnp.asarray(x))
    block = hf.model.layers[0].mlp if arch != "granitemoe" else hf.model.layers[0].block_sparse_moe
    router = block.router if arch == "granitemoe" else block.gate
    with torch.no_grad():
        ref = block(torch.tensor(x)).numpy()
        _, ref_w, ref_ids = router(torch.tensor(x).reshape(-1, 64))
    np.testing.assert_allclose(np.asarray(y), ref, atol=1e-6)
    ids, w = rec["intermediates"]["expert_ids"][0], rec["intermediates"]["expert_weights"][0]
    assert ids.shape == (2, 5, 2) and rec["intermediates"]["router_probs"][0].shape == (2, 5, 4)
    np.testing.assert_array_equal(np.asarray(ids).reshape(-1, 2), ref_ids.numpy())
    np.testing.assert_allclose(np.asarray(w).reshape(-1, 2), ref_w.numpy(), atol=1e-6)


def test_ragged_dot_equals_dense_reference():
    """The ragged_dot path against every expert on every token, in f32 and with bf16 matmuls (one compile)."""
    cfg = ModelConfig(
        arch="qwen2_moe",
        hidden_size=32,
        mlp_type="moe",
        num_experts=6,
        experts_per_token=3,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=16,
    ).validate()
    rs = np.random.RandomState(0)
    x = rs.randn(3, 7, 32).astype(np.float32)
    shapes = nn.unbox(jax.eval_shape(MoEMLP(cfg).init, jax.random.key(0), x))["params"]
    p = jax.tree.map(lambda s: (0.3 * rs.randn(*s.shape)).astype(np.float32), shapes)
    cfgs = (cfg, dataclasses.replace(cfg, matmul_dtype="bfloat16"))
    out = jax.jit(
        lambda p, x: [[MoEMLP(c, impl=i).apply({"params": p}, x) for i in ("ragged", "dense")] for c in cfgs]
    )(p, x)
    (f32_ragged, f32_dense), (bf16_ragged, bf16_dense) = out
    # the same products summed in another order (per expert group vs all experts): f32 rounding only
    np.testing.assert_allclose(np.asarray(f32_ragged), np.asarray(f32_dense), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bf16_ragged), np.asarray(bf16_dense), rtol=1e-2, atol=1e-2)
    assert np.abs(np.asarray(bf16_ragged) - np.asarray(f32_ragged)).max() > 0  # the bf16 matmuls did run
    with pytest.raises(M2R2Error, match="not implemented for an MoE MLP"):
        MoEMLP(cfg).apply({"params": p}, x, {"gate": lambda x, mm: x})


def test_loader_strict_about_expert_tensors(saved, tmp_path):
    """A missing expert, an expert beyond the config's, a mis-shaped fused tensor, and one leaf given
    twice (fused and per expert) are each refused with one line naming the tensor."""
    import shutil

    from safetensors.numpy import load_file, save_file

    d, hf = saved("mixtral")
    hub = load_file(d / "model.safetensors")
    pre = "model.layers.0.block_sparse_moe.experts"
    fused = {"model.layers.0.mlp.experts.gate_up_proj": np.zeros((4, 64, 64), np.float32)}
    cases = [
        (
            {k: v for k, v in hub.items() if k != f"{pre}.3.w2.weight"},
            r"missing tensor.*layers\.0\.mlp\.down of expert\(s\) 3",
        ),
        ({**hub, f"{pre}.4.w1.weight": hub[f"{pre}.0.w1.weight"]}, f"unexpected tensor '{pre}.4.w1.weight'.*4 experts"),
        (
            {**hub, "model.layers.0.mlp.experts.gate_up_proj": np.zeros((4, 32, 64), np.float32)},
            "shape mismatch.*gate_up_proj",
        ),
        ({**hub, **fused}, "gives layers.0.mlp.gate a second time"),
    ]
    for i, (tensors, msg) in enumerate(cases):
        m = tmp_path / str(i)
        shutil.copytree(d, m)
        save_file(tensors, m / "model.safetensors")
        with pytest.raises(M2R2Error, match=msg) as e:
            load_hf_checkpoint(str(m))
        assert "\n" not in str(e.value)


def test_greedy_generation_matches_hf(saved):
    from m2r2_jax.decoding.generate import GenerateConfig, Generator

    d, hf = saved("granitemoe")
    cfg, params = _load(d)
    prompts = [[5, 17, 33, 9], list(range(40, 51))]
    got = Generator(cfg).generate(params, prompts, GenerateConfig(max_new_tokens=12, stop_ids=(-1,))).new_ids
    for p, ours in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours == ref[0, len(p) :].tolist()


def test_kernel_attention_uses_the_models_scale():
    """The block-attention kernels scale scores by head_dim**-0.5 themselves: GraniteMoE's
    attention_multiplier reaches them through a pre-scaled q."""
    from m2r2_jax import kernels as K
    from m2r2_jax.backend import CPU_KERNELS, XLA, Backend
    from m2r2_jax.model.attention import CacheAttention, cache_masks

    cfg = ModelConfig(num_heads=4, num_kv_heads=2, head_dim=16, attention_multiplier=0.2).validate()
    rs = np.random.RandomState(0)
    q, k, v, kc, vc = (
        rs.randn(*s).astype(np.float32) for s in [(1, 4, 4, 16)] + [(1, 2, 4, 16)] * 2 + [(1, 2, 128, 16)] * 2
    )
    start = np.asarray([5], np.int32)
    # the CPU kernels where they build (fast), else Pallas' kernel in interpret mode (anywhere, slower)
    kernel = CPU_KERNELS if K.available() else Backend("pallas", interpret=True)

    def both(q, k, v, kc, vc, start):
        return [
            CacheAttention(cfg, be, kc, vc, start, cache_masks(be, start, 4, 128))(q, k, v)[0] for be in (XLA, kernel)
        ]

    want, got = jax.jit(both)(q, k, v, kc, vc, start)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_expert_weights_shard_over_the_tensor_axis():
    from m2r2_jax.sharding import MeshConfig, logical_to_pspec, make_mesh

    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=64,
        num_layers=1,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        mlp_type="moe",
        num_experts=8,
        experts_per_token=2,
        moe_intermediate_size=64,
    ).validate()
    axes = logical_axes(model_spec(cfg))["layers"][0]["mlp"]
    assert (axes["router"], axes["gate"], axes["down"]) == (
        ("embed", "expert"),
        ("expert", "embed", "expert_mlp"),
        ("expert", "expert_mlp", "embed"),
    )
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    assert tuple(logical_to_pspec(axes["down"], (8, 64, 64), mesh)) == ("tensor", None, None)


def test_dense_record_unchanged():
    """Checkpoints and distillation manifests record a model's config: a dense model's record has
    exactly the keys it had before the MoE fields existed (so those records still match)."""
    old_keys = {
        "arch", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
        "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
        "tie_word_embeddings", "qkv_bias", "sliding_window", "bos_token_id", "eos_token_ids", "param_dtype",
        "dtype", "matmul_dtype", "mlp_type",
    }  # fmt: skip
    assert set(json.loads(ModelConfig().to_json())) == old_keys
    moe = ModelConfig(mlp_type="moe", num_experts=4, experts_per_token=2, moe_intermediate_size=8).validate()
    assert json.loads(moe.to_json())["num_experts"] == 4


BAD = [
    (dict(mlp_type="sparse"), "mlp_type 'sparse'"),
    (dict(num_experts=4), "num_experts=4 is set but mlp_type is 'dense'"),
    (dict(mlp_type="moe", num_experts=0, experts_per_token=1, moe_intermediate_size=8), "num_experts=0"),
    (dict(mlp_type="moe", num_experts=4, experts_per_token=5, moe_intermediate_size=8), "experts_per_token=5 exceeds"),
    (dict(mlp_type="moe", num_experts=4, experts_per_token=2, moe_intermediate_size=0), "moe_intermediate_size=0"),
    (dict(mlp_type="moe", num_experts=4, experts_per_token=2, moe_intermediate_size=8, router="top1"), "router 'top1'"),
    (
        dict(mlp_type="moe", num_experts=4, experts_per_token=2, moe_intermediate_size=8, dense_layers=(40,)),
        r"dense_layers=\[40\]",
    ),
    (
        dict(
            mlp_type="moe",
            num_experts=4,
            experts_per_token=2,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=-1,
        ),
        "shared_expert_intermediate_size=-1",
    ),
    (dict(logits_scaling=0.0), "logits_scaling=0.0"),
    (dict(attention_multiplier=float("nan")), "attention_multiplier=nan"),
]


@pytest.mark.parametrize("kw, msg", BAD)
def test_bad_moe_config_refused(kw, msg):
    with pytest.raises(M2R2Error, match=msg) as e:
        ModelConfig(**kw).validate()
    assert "\n" not in str(e.value)


HF_BAD = [
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
    ("olmoe", dict(attention_bias=True), "o_proj bias"),
    ("granitemoe", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ("granitemoe", dict(sliding_window=16), "sliding_window=16"),
    ("mixtral", dict(num_local_experts=0), "'num_local_experts' must be a positive integer"),
    ("qwen2_moe", dict(mlp_only_layers="1"), "mlp_only_layers"),
    ("qwen2_moe", dict(layer_types=["full_attention", "chunked_attention", "full_attention"]), "layer_types"),
]


@pytest.mark.parametrize("arch, kw, msg", HF_BAD)
def test_bad_hf_moe_config_refused(arch, kw, msg):
    import transformers as tf

    cfg_cls, model_cls, fields = ARCHS[arch]
    hf = {**getattr(tf, cfg_cls)(**{**BASE, **fields}).to_dict(), "architectures": [model_cls], **kw}
    with pytest.raises(M2R2Error, match=msg) as e:
        model_config_from_hf(hf)
    assert "\n" not in str(e.value)
