"""Evaluation of M2R2 self-speculative decoding: eval sets, the speed/acceptance run, plots."""

from m2r2_jax.data.eval_sets import EVAL_SETS, EvalItem, load_eval_set

__all__ = ["EVAL_SETS", "EvalItem", "load_eval_set"]
