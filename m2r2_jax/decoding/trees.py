"""Static draft trees as fixed arrays.

A tree is a list of paths; a path is the top-k rank chosen at each depth, e.g.
`(0, 1)` = "the top-1 draft at depth 1, then its top-2 draft at depth 2". Node 0
is the root (the last accepted token, not yet in the cache); nodes are sorted
by (depth, path). Everything a jitted drafter/verifier needs is precomputed
once with numpy: parents, depths, ranks, the ancestor mask, per-depth node
lists, per-node child tables and the retrieve paths of the leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from m2r2_jax.errors import M2R2Error


@dataclasses.dataclass(frozen=True)
class DraftTree:
    name: str
    paths: tuple[tuple[int, ...], ...]
    parent: np.ndarray  # [T] parent node (root: -1)
    depth: np.ndarray  # [T] 0 for the root
    rank: np.ndarray  # [T] top-k rank among its parent's draft candidates (root: 0)
    ancestor_mask: np.ndarray  # [T, T] bool: node i sees node j (ancestors and itself)
    children: np.ndarray  # [T, K] child node ids in rank order, -1 padded
    levels: tuple[np.ndarray, ...]  # node ids at depth 0, 1, ..., max_depth
    leaf_paths: np.ndarray  # [num_leaves, max_depth + 1] node ids root..leaf, -1 padded
    topk: int  # candidates needed per expanded node (max rank + 1)

    @property
    def size(self) -> int:
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def __hash__(self):  # static jit argument
        return hash((self.name, self.paths))

    def __eq__(self, other):
        return isinstance(other, DraftTree) and (self.name, self.paths) == (other.name, other.paths)


MAX_RANK = 64  # candidates per expanded node (a top-k over the draft vocabulary)
MAX_NODES = 256


def _path(p) -> tuple[int, ...]:
    if not isinstance(p, (list, tuple)) or not all(isinstance(r, int) and not isinstance(r, bool) for r in p):
        raise M2R2Error(f"draft tree path {p!r} must be a list of integer ranks")
    return tuple(p)


def build_tree(paths: Sequence[Sequence[int]], name: str = "custom") -> DraftTree:
    if not isinstance(paths, (list, tuple)):
        raise M2R2Error(f"draft tree paths must be a list of paths, got {type(paths).__name__}")
    ps = sorted({_path(p) for p in paths if _path(p)}, key=lambda p: (len(p), p))
    if len(ps) + 1 > MAX_NODES:
        raise M2R2Error(f"draft tree has {len(ps) + 1} nodes; at most {MAX_NODES} are supported")
    if not ps:
        raise M2R2Error("a draft tree needs at least one path")
    known = {(): 0}
    for p in ps:
        if any(r < 0 or r >= MAX_RANK for r in p):
            raise M2R2Error(f"draft tree path {list(p)} has a rank outside [0, {MAX_RANK})")
        if p[:-1] not in known:
            raise M2R2Error(f"draft tree path {list(p)} has no parent path {list(p[:-1])}")
        known[p] = len(known)
    T = len(known)
    parent = np.full(T, -1, np.int32)
    depth = np.zeros(T, np.int32)
    rank = np.zeros(T, np.int32)
    for p, i in known.items():
        if p:
            parent[i], depth[i], rank[i] = known[p[:-1]], len(p), p[-1]
    anc = np.zeros((T, T), bool)
    for i in range(T):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parent[j]
    kids = [[] for _ in range(T)]
    for i in range(1, T):
        kids[parent[i]].append(i)
    K = max(1, max(len(k) for k in kids))
    children = np.full((T, K), -1, np.int32)
    for i, ks in enumerate(kids):
        ks = sorted(ks, key=lambda c: rank[c])
        children[i, : len(ks)] = ks
    D = int(depth.max())
    levels = tuple(np.nonzero(depth == d)[0].astype(np.int32) for d in range(D + 1))
    leaves = [i for i in range(T) if not kids[i]]
    leaf_paths = np.full((len(leaves), D + 1), -1, np.int32)
    for r, leaf in enumerate(leaves):
        chain, j = [], leaf
        while j >= 0:
            chain.append(j)
            j = parent[j]
        leaf_paths[r, : len(chain)] = chain[::-1]
    return DraftTree(name, tuple(ps), parent, depth, rank, anc, children, levels, leaf_paths, int(rank.max()) + 1)


def chain(k: int) -> DraftTree:
    return build_tree([(0,) * d for d in range(1, k + 1)], f"chain{k}")


def wide_tree(branching: Sequence[int], name: str | None = None) -> DraftTree:
    """Full tree with `branching[d]` children per node at depth d (e.g. (4, 2, 1))."""
    paths, frontier = [], [()]
    for b in branching:
        frontier = [p + (r,) for p in frontier for r in range(b)]
        paths += frontier
    return build_tree(paths, name or "tree_" + "x".join(map(str, branching)))


def sparse_tree(width: Sequence[int], name: str | None = None) -> DraftTree:
    """Top-ranked spine with side branches: depth d keeps the `width[d]` best-ranked paths,
    ranking a path by the sum of its ranks (a cheap proxy for its acceptance probability)."""
    paths, frontier = [], [()]
    for w in width:
        cand = sorted((p + (r,) for p in frontier for r in range(w)), key=lambda p: (sum(p), p))[:w]
        paths += cand
        frontier = cand
    return build_tree(paths, name or "sparse_" + "-".join(map(str, width)))


PRESETS = {
    "chain1": lambda: chain(1),
    "chain2": lambda: chain(2),
    "chain3": lambda: chain(3),
    "chain4": lambda: chain(4),
    "chain6": lambda: chain(6),
    "star2": lambda: wide_tree((2,), "star2"),  # the top-2 draft tokens, one depth
    "star3": lambda: wide_tree((3,), "star3"),
    "star4": lambda: wide_tree((4,), "star4"),
    "tree16": lambda: sparse_tree((4, 4, 3, 2, 2), "tree16"),  # 15 drafted nodes + root
    "tree32": lambda: sparse_tree((8, 8, 6, 5, 4), "tree32"),  # 31 + root
    "tree64": lambda: sparse_tree((10, 16, 14, 12, 11), "tree64"),  # 63 + root
}


def get_tree(name_or_paths) -> DraftTree:
    if isinstance(name_or_paths, DraftTree):
        return name_or_paths
    if isinstance(name_or_paths, str) and name_or_paths.endswith(".json"):
        import json
        from pathlib import Path

        f = Path(name_or_paths)
        if not f.is_file():
            raise M2R2Error(f"draft tree file not found: {f}")
        try:
            data = json.loads(f.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise M2R2Error(f"corrupt draft tree file {f}: {e}") from None
        paths = data.get("paths") if isinstance(data, dict) else data
        if paths is None:
            raise M2R2Error(f'draft tree file {f}: expected {{"paths": [[rank, ...], ...]}} or a list of paths')
        return build_tree(paths, f.stem)
    if isinstance(name_or_paths, str):
        if name_or_paths not in PRESETS:
            raise M2R2Error(f"unknown draft tree {name_or_paths!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name_or_paths]()
    return build_tree(name_or_paths)
