"""M2R2 on an MoE base (a tiny Qwen2-MoE: sparse layers with a shared expert and one dense layer): adapters on
the attention projections only (refused on an MoE MLP, one line), the merged draft weights (gains folded into
every expert's and the shared expert's down projection) equal the adapters, and a short training run learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m2r2_jax.backend import XLA
from m2r2_jax.errors import M2R2Error
from m2r2_jax.loading.hf_safetensors import load_hf_checkpoint
from m2r2_jax.loading.registry import LoadedModel
from m2r2_jax.m2r2.config import M2R2Config
from m2r2_jax.m2r2.params import init_m2r2

ATTN = ("q", "k", "v", "o")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    hf = tf.Qwen2MoeConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        intermediate_size=96,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
        norm_topk_prob=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    d = tmp_path_factory.mktemp("qwen2_moe")
    tf.Qwen2MoeForCausalLM(hf).float().eval().save_pretrained(d)
    cfg, params, _ = load_hf_checkpoint(str(d))
    return cfg, jax.tree.map(jnp.asarray, params)


def _m2r2(cfg, targets=ATTN):
    mc = M2R2Config(rate=1, num_fast_layers=3, rank=4, router_dim=8, draft_vocab=0, targets=targets).for_base(cfg)
    m = init_m2r2(cfg, mc, jax.random.key(3))
    m = jax.tree_util.tree_map_with_path(  # untrained adapters with b != 0, gains away from 1
        lambda p, x: (
            x + 0.3 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if getattr(p[-1], "key", "") in ("b", "gain_attn", "gain_mlp")
            else x
        ),
        m,
    )
    return mc, m


def test_mlp_adapters_refused_on_moe_layers(tiny_moe):
    cfg, _ = tiny_moe
    assert [cfg.layer_mlp(j) for j in range(3)] == ["moe", "dense", "moe"]
    with pytest.raises(M2R2Error, match=r"cannot adapt an MoE MLP \(fast layers on base layers \[0, 2\]") as e:
        M2R2Config(rate=1, num_fast_layers=3).for_base(cfg)
    assert "\n" not in str(e.value)
    M2R2Config(rate=1, num_fast_layers=3, targets=ATTN).for_base(cfg)


def test_merged_draft_params_equal_adapters_on_moe(tiny_moe):
    from m2r2_jax.m2r2 import stream as S
    from m2r2_jax.m2r2.modules import FastStream
    from m2r2_jax.model import layers as L
    from m2r2_jax.model.attention import SetsAttention
    from m2r2_jax.model.params import module_tree

    cfg, base = tiny_moe
    mc, m2r2 = _m2r2(cfg)
    dp = S.draft_params(cfg, mc, base, m2r2, None)
    B, T = 2, 5
    h = jax.random.normal(jax.random.key(1), (B, T, cfg.hidden_size))
    cos, sin = L.rope_cos_sin(cfg, jnp.broadcast_to(jnp.arange(T)[None], (B, T)))
    m_self = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool))[None], (B, T, T))
    att = lambda l: SetsAttention(cfg, XLA, self_mask=m_self)  # noqa: E731
    layers = [base["layers"][j] for j in mc.base_layers(cfg.num_layers)]
    want, _ = FastStream(cfg, mc).apply({"params": module_tree(m2r2["fast"])}, layers, h, cos, sin, att)
    got, _ = FastStream(cfg, mc, merged=True).apply({"params": {}}, dp["layers"], h, cos, sin, att)
    plain, _ = FastStream(cfg, mc, merged=True).apply({"params": {}}, layers, h, cos, sin, att)
    assert float(jnp.abs(want[-1] - plain[-1]).max()) > 1e-2  # the adapters and gains really act
    for l in range(len(want)):
        np.testing.assert_allclose(got[l], want[l], atol=1e-4, rtol=1e-4)


def test_training_on_moe_base_learns(tiny_moe, tmp_path):
    from m2r2_jax.training.config import DataConfig, TrainConfig
    from m2r2_jax.training.trainer import train

    cfg, base = tiny_moe
    rs = np.random.RandomState(0)
    recs = [
        {"prompt_ids": rs.randint(3, 256, 6).tolist(), "answer_ids": rs.randint(3, 256, 20).tolist()} for _ in range(8)
    ]
    model = LoadedModel(cfg=cfg, params=base, tokenizer=None, source="tiny-moe", kind="hf")
    tc = TrainConfig(
        model="tiny-moe",
        seq_len=32,
        batch_size=4,
        steps=12,
        lr=1e-2,
        warmup_steps=1,
        save_every=12,
        async_save=False,
        out_dir=str(tmp_path),
        m2r2=M2R2Config(rate=1, num_fast_layers=3, rank=4, router_dim=8, draft_vocab=64, targets=ATTN),
        data=DataConfig(),
    )
    r = train(tc, model=model, records=recs, progress=False)
    rows = [x for x in r.history if "kd" in x]
    assert all(np.isfinite(x["loss"]) for x in rows)
    assert np.mean([x["kd"] for x in rows[-3:]]) < np.mean([x["kd"] for x in rows[:3]])
    assert set(r.m2r2["fast"][0]) >= {"q", "k", "v", "o"} and not set(r.m2r2["fast"][0]) & {"gate", "up", "down"}


def test_distill_model_of_another_vocabulary_refused(tiny_moe, tmp_path, monkeypatch):
    """data.distill_model answers the prompts for another trained model: refused, before anything is
    written, when its vocabulary is not the trained model's."""
    import dataclasses

    import m2r2_jax.loading.registry as R
    from m2r2_jax.training.config import DataConfig, TrainConfig
    from m2r2_jax.training.trainer import distilled_records

    cfg, base = tiny_moe
    loaded = []
    answerer = LoadedModel(cfg=cfg, params=base, tokenizer=None, source="answerer", kind="hf")
    monkeypatch.setattr(R, "load_model", lambda name, **kw: loaded.append(name) or answerer)
    trained = LoadedModel(
        cfg=dataclasses.replace(cfg, vocab_size=999), params=base, tokenizer=None, source="x", kind="hf"
    )
    d = tmp_path / "distill"
    tc = TrainConfig(model="tiny-moe", data=DataConfig(distill_model="answerer", distill_dir=str(d)))
    with pytest.raises(
        M2R2Error, match=r"distill_model='answerer' has a vocabulary of 256, the trained model 'tiny-moe' 999"
    ) as e:
        distilled_records(tc, trained, progress=False)
    assert loaded == ["answerer"] and "\n" not in str(e.value) and not d.exists()
