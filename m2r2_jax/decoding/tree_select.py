"""Pick the draft tree that maximises expected accepted tokens per second of
wall clock (not per step), from measured acceptance and measured costs.

Inputs (all measured):
  * p[d][r]: probability that the rank-r draft at depth d is the full model's
    token, given its parent was accepted (from `eval.speculative`'s
    node_acceptance over an exploratory tree such as tree64, or the fast
    stream's top-k agreement);
  * verify_cost(T): one full forward over T tree nodes, in units of a plain
    decode step (`eval.bench_decode`'s verify_cost curve, interpolated);
  * draft_cost: one drafted depth (all nodes of the depth batched), in plain
    steps, plus an optional per-node term.

For greedy decoding with distinct sibling drafts, node acceptance events are
exclusive among siblings, so P(node) = P(parent) * p[d][r], the expected
tokens per step is 1 + sum of P(node), and the step costs
draft_cost * depth + node_cost * nodes + verify_cost(T). Nodes are added best
path-probability first (a greedy construction that is optimal for the
expected length at each size); every prefix size is scored and the best kept.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence

import numpy as np

from m2r2_jax.decoding.trees import DraftTree, build_tree


@dataclasses.dataclass
class TreeChoice:
    tree: DraftTree
    expected_tokens: float  # tau per verification step
    step_cost: float  # in plain decode steps
    speedup: float  # expected_tokens / step_cost
    table: list  # (size, depth, expected_tokens, step_cost, speedup) for every size tried


def interp_cost(curve: Mapping[int, float]):
    xs = np.array(sorted(int(k) for k in curve))
    ys = np.array([float(curve[k] if k in curve else curve[str(k)]) for k in xs])
    return lambda T: float(np.interp(T, xs, ys, right=ys[-1] + (T - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])))


def select_tree(
    p: Sequence[Sequence[float]],
    verify_cost: Mapping[int, float],
    draft_cost: float,
    node_cost: float = 0.0,
    max_nodes: int = 64,
    max_depth: int | None = None,
) -> TreeChoice:
    """p[d-1][r] for depths d = 1..len(p), ranks r = 0..len(p[d-1])-1."""
    vc = interp_cost(verify_cost)
    max_depth = min(max_depth or len(p), len(p))
    heap = [(-p[0][0], (0,))] if p and p[0] else []
    paths, probs, table = [], {(): 1.0}, []
    best = None
    while heap and len(paths) < max_nodes - 1:
        negq, path = heapq.heappop(heap)
        q = -negq
        paths.append(path)
        probs[path] = q
        d, r = len(path), path[-1]
        if r + 1 < len(p[d - 1]):  # next sibling
            heapq.heappush(heap, (-probs[path[:-1]] * p[d - 1][r + 1], path[:-1] + (r + 1,)))
        if d < max_depth:  # first child
            heapq.heappush(heap, (-q * p[d][0], path + (0,)))
        T = len(paths) + 1
        depth = max(len(x) for x in paths)
        tau = 1.0 + sum(probs[x] for x in paths)
        cost = draft_cost * depth + node_cost * (T - 1) + vc(T)
        table.append((T, depth, tau, cost, tau / cost))
        if best is None or tau / cost > best[0]:
            best = (tau / cost, list(paths), tau, cost)
    if best is None:
        raise ValueError("no acceptance data")
    sp, ps, tau, cost = best
    return TreeChoice(build_tree(ps, f"selected{len(ps) + 1}"), tau, cost, sp, table)


def acceptance_from_nodes(node_acceptance: Sequence[Mapping], max_rank: int = 10) -> list[list[float]]:
    """p[d][r] from eval.speculative's node_acceptance rows ({depth, rank, tries, hits}), pooled per (d, r)."""
    agg: dict[tuple[int, int], list[float]] = {}
    for row in node_acceptance:
        if row["depth"] == 0 or not row["tries"]:
            continue
        a = agg.setdefault((row["depth"], row["rank"]), [0.0, 0.0])
        a[0] += row["hits"]
        a[1] += row["tries"]
    D = max((d for d, _ in agg), default=0)
    out = []
    for d in range(1, D + 1):
        ranks = sorted(r for dd, r in agg if dd == d)
        out.append([agg[(d, r)][0] / agg[(d, r)][1] for r in ranks if r < max_rank])
    return out
