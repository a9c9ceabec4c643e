"""A MoEfied model against the dense model it was made from (loading/moefied.py, training/moefy.py).

next_token_agreement   teacher-forced on the dense model's own greedy answers: how often the MoE's
                       top-1 next token is the dense model's, and the mean KL(dense || MoE), answer
                       positions only (the tokens decoding would produce)
rouge_l                ROUGE-L F1 of the MoE's free-running greedy text against the dense model's
ffn_weight_fraction    the FFN weights a token reads (k of E experts + the router), and the share of
                       all per-token weight reads (embeddings excluded: a decode step reads one row)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("cfg_a", "cfg_b"))
def _agree_batch(cfg_a, params_a, cfg_b, params_b, tokens, mask):
    from m2r2_jax.model import decoder as D

    B, T = tokens.shape
    start = jnp.zeros((B,), jnp.int32)
    la, _ = D.forward(cfg_a, params_a, tokens, D.init_cache(cfg_a, B, T), start)
    lb, _ = D.forward(cfg_b, params_b, tokens, D.init_cache(cfg_b, B, T), start)
    pa = jax.nn.log_softmax(la, -1)
    kl = jnp.sum(jnp.exp(pa) * (pa - jax.nn.log_softmax(lb, -1)), -1)
    same = jnp.argmax(la, -1) == jnp.argmax(lb, -1)
    return jnp.sum(same * mask), jnp.sum(kl * mask), jnp.sum(mask)


def next_token_agreement(dense, moe, records, seq_len: int = 512, batch_size: int = 4) -> dict:
    """dense / moe: (cfg, params); records [{prompt_ids, answer_ids}] (the dense model's answers) ->
    {top1_agreement, kl, tokens} over the positions predicting answer tokens."""
    from m2r2_jax.data.batches import pack_examples

    tokens, mask = pack_examples(records, seq_len)
    sel = np.zeros_like(mask)
    sel[:, :-1] = mask[:, 1:]  # position t predicts token t + 1
    pad = (-len(tokens)) % batch_size
    tokens = np.concatenate([tokens, np.zeros((pad, seq_len), np.int32)])
    sel = np.concatenate([sel, np.zeros((pad, seq_len), np.float32)])
    tot = np.zeros(3)
    for i in range(0, len(tokens), batch_size):
        out = _agree_batch(
            dense[0],
            dense[1],
            moe[0],
            moe[1],
            jnp.asarray(tokens[i : i + batch_size]),
            jnp.asarray(sel[i : i + batch_size]),
        )
        tot += np.array([float(v) for v in out])
    return {"top1_agreement": tot[0] / max(tot[2], 1.0), "kl": tot[1] / max(tot[2], 1.0), "tokens": int(tot[2])}


def greedy_answers(cfg, params, prompt_ids, max_new_tokens: int, batch_size: int = 8) -> list[list[int]]:
    """Greedy answers (the jitted decode loop, stopping at EOS) to chat-encoded prompts."""
    from m2r2_jax.decoding.generate import GenerateConfig, Generator

    gen, out = Generator(cfg), []
    for i in range(0, len(prompt_ids), batch_size):
        chunk = list(prompt_ids[i : i + batch_size])
        n = len(chunk)
        chunk += [chunk[-1]] * (batch_size - n)  # one static batch shape
        res = gen.generate(params, chunk, GenerateConfig(max_new_tokens=max_new_tokens))
        out += [list(map(int, r)) for r in res.new_ids[:n]]
    return out


def rouge_l(references: list[str], hypotheses: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score, stemmed) of each hypothesis against its reference."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(np.mean([sc.score(r, h)["rougeL"].fmeasure for r, h in zip(references, hypotheses)]))


def ffn_weight_fraction(cfg) -> dict:
    """Per token, per MoE layer: the FFN weights read (k experts + the router) over the dense FFN's, and the
    whole model's per-token weight reads (attention + FFN + router + the LM head) over the dense model's."""
    D, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    k, E = cfg.experts_per_token, cfg.num_experts
    n_moe = L - len(cfg.dense_layers)
    attn = D * cfg.q_dim * 2 + D * cfg.kv_dim * 2
    dense_ffn = 3 * D * F
    moe_ffn = 3 * D * cfg.moe_intermediate_size * k + D * E
    head = D * cfg.vocab_size
    dense_total = L * (attn + dense_ffn) + head
    moe_total = L * attn + n_moe * moe_ffn + (L - n_moe) * dense_ffn + head
    return {"ffn": moe_ffn / dense_ffn, "model": moe_total / dense_total}


def compare(dense, moe, records, rouge_prompts, rouge_refs, tokenizer, rouge_new_tokens: int, seq_len: int) -> dict:
    """One MoE setting against the dense model. dense / moe: LoadedModels; records: the dense model's
    greedy answers (teacher-forced agreement); rouge_prompts / rouge_refs: prompt ids and the dense
    model's greedy token ids for them (ROUGE-L of the MoE's own greedy text, plus exact token matches)."""
    agree = next_token_agreement((dense.cfg, dense.params), (moe.cfg, moe.params), records, seq_len)
    hyps = greedy_answers(moe.cfg, moe.params, rouge_prompts, rouge_new_tokens)
    dec = functools.partial(tokenizer.decode, skip_special_tokens=True)
    prefix = [
        next((i for i, (a, b) in enumerate(zip(r, h)) if a != b), min(len(r), len(h))) for r, h in zip(rouge_refs, hyps)
    ]
    return {
        **agree,
        "rouge_l": rouge_l([dec(r) for r in rouge_refs], [dec(h) for h in hyps]),
        "identical_outputs": float(np.mean([r == h for r, h in zip(rouge_refs, hyps)])),
        "mean_matching_prefix_tokens": float(np.mean(prefix)),
        "weight_fraction": ffn_weight_fraction(moe.cfg),
        "samples": [{"dense": dec(r), "moe": dec(h)} for r, h in list(zip(rouge_refs, hyps))[:2]],
    }
