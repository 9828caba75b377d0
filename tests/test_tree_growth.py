"""Tree growers (fastdecode.spec.tree_growth): shapes and budgets, greedy top tokens, the
confidence early exit, and -- chi-square -- that trees sampled without replacement and
verified with `verify_sampling` reproduce the target's distribution (lossless q bookkeeping).
"""

from __future__ import annotations

import zlib
from functools import cache

import pytest
import torch
from test_engine import chi_square_critical, chi_square_statistic

from fastdecode.spec.tree import DraftTree
from fastdecode.spec.tree_growth import (
    ChainGrower,
    DynamicTreeGrower,
    StaticTreeGrower,
    TreeGrower,
    parse_branching,
)
from fastdecode.spec.verify import verify_sampling

V = 6


@cache
def _dist(path: tuple[int, ...], salt: str, sparse: bool) -> torch.Tensor:
    """A fixed random distribution [V] after `path` (the same every call; do not modify)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{salt}{path}".encode()))
    probs = torch.softmax(2.0 * torch.randn(V, generator=g, dtype=torch.float64), -1)
    if sparse:  # the draft misses a token or two: fewer siblings than asked for
        probs[torch.randperm(V, generator=g)[: 1 + len(path) % 2]] = 0.0
    return (probs / probs.sum()).float()


def draft(path):
    return _dist(path, "draft", sparse=True)


def target(path):
    return _dist(path, "target", sparse=False)


def path_of(tree: DraftTree, node: int, prefix: tuple[int, ...] = ()) -> tuple[int, ...]:
    tokens = []
    while node >= 0:
        tokens.append(tree.tokens[node])
        node = tree.parents[node]
    return prefix + tuple(reversed(tokens))


def grow(grower: TreeGrower, prefix: tuple[int, ...] = (), dist=draft) -> DraftTree:
    """Run a grower to the end against a fixed draft distribution."""
    calls = 0
    while not grower.done:
        frontier = grower.frontier()
        tree = grower.tree()
        grower.extend(torch.stack([dist(path_of(tree, n, prefix)) for n in frontier]))
        calls += 1
        assert calls < 100
    assert grower.frontier() == []
    return grower.tree()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- shapes, budgets, greedy -----------------------------------------------------------------


def test_parse_branching():
    assert parse_branching("4,2,1") == (4, 2, 1)
    assert parse_branching(" 3 , 1 ") == (3, 1)
    assert parse_branching([2, 2]) == (2, 2)
    for bad in ("", "4,0", "a,b", "4,-1", [1.5]):
        with pytest.raises(ValueError, match="tree shape"):
            parse_branching(bad)


def test_static_tree_full_shape_and_budget():
    dense = lambda path: torch.full((8,), 1 / 8)  # noqa: E731 -- enough tokens for any shape
    tree = grow(StaticTreeGrower("4,2,1", max_nodes=100, greedy=True), dist=dense)
    assert len(tree) == 4 + 8 + 8
    assert [tree.depth.count(d) for d in (1, 2, 3)] == [4, 8, 8]
    assert all(len(tree.children(n)) == 2 for n in tree.children(-1))
    for budget in (0, 1, 5, 13):
        tree = grow(StaticTreeGrower((4, 2, 1), budget, greedy=False, generator=gen()), dist=dense)
        assert len(tree) == budget
        assert tree.depth == sorted(tree.depth)  # breadth-first


def test_static_greedy_takes_top_tokens_and_stores_no_q():
    tree = grow(StaticTreeGrower((3, 2), max_nodes=20, greedy=True))
    for node in [-1, *range(len(tree))]:
        kids = tree.children(node)
        if node >= 0 and tree.depth[node] == 2:
            assert kids == []
            continue
        dist = draft(path_of(tree, node))
        want = torch.argsort(dist, descending=True, stable=True)[: len(kids)].tolist()
        assert [tree.tokens[k] for k in kids] == want
        assert len(kids) == min((3, 2)[0 if node < 0 else 1], int((dist > 0).sum()))
    assert tree.q is None  # deterministic proposals: lossless under either verifier


def test_sampled_siblings_are_distinct_and_carry_the_remainder():
    for seed in range(20):
        tree = grow(StaticTreeGrower((4, 3), max_nodes=30, greedy=False, generator=gen(seed)))
        for node in [-1, *range(len(tree))]:
            kids = tree.children(node)
            tokens = [tree.tokens[k] for k in kids]
            assert len(set(tokens)) == len(tokens)
            rest = draft(path_of(tree, node)).clone()
            for kid, token in zip(kids, tokens, strict=True):
                torch.testing.assert_close(tree.q_of(kid), rest / rest.sum())
                assert rest[token] > 0  # never a token the draft ruled out
                rest[token] = 0


def test_chain_greedy_follows_argmax_and_respects_budget():
    tree = grow(ChainGrower(5, greedy=True))
    assert tree.parents == [-1, 0, 1, 2, 3]
    for node in range(5):
        assert tree.tokens[node] == int(draft(path_of(tree, node)[:-1]).argmax())
    sampled = grow(ChainGrower(3, greedy=False, generator=gen()))
    assert len(sampled) == 3 and sampled.q is not None


def _peaked(confidences):
    """Draft whose top-1 probability at depth d + 1 is confidences[d] (token d % V)."""

    def dist(path):
        c = confidences[min(len(path), len(confidences) - 1)]
        probs = torch.full((V,), (1 - c) / (V - 1))
        probs[len(path) % V] = c
        return probs

    return dist


def test_chain_threshold_stops_on_low_confidence():
    dist = _peaked([0.9, 0.8, 0.3, 0.9])
    assert len(grow(ChainGrower(8, greedy=True, threshold=0.5), dist=dist)) == 2
    assert len(grow(ChainGrower(8, greedy=True, threshold=0.0), dist=dist)) == 8
    assert len(grow(ChainGrower(8, greedy=True, threshold=0.95), dist=dist)) == 0
    # SpecDec++: stop once P(some rejection) ~ 1 - prod(top-1) exceeds 1 - threshold
    path = ChainGrower(8, greedy=True, threshold=0.7, confidence="path")
    assert len(grow(path, dist=_peaked([0.9, 0.85, 0.9]))) == 2  # 0.9, 0.765, then 0.69
    sampled = ChainGrower(8, greedy=False, generator=gen(), threshold=0.5)
    assert len(grow(sampled, dist=dist)) == 2
    with pytest.raises(ValueError, match="threshold"):
        ChainGrower(4, greedy=True, threshold=1.5)
    with pytest.raises(ValueError, match="confidence"):
        ChainGrower(4, greedy=True, confidence="entropy")


def test_dynamic_tree_budget_depth_and_greedy_choice():
    for budget in (0, 1, 4, 7, 10):
        for greedy in (True, False):
            grower = DynamicTreeGrower(budget, greedy, gen(budget), max_depth=3, per_level=3)
            tree = grow(grower)
            assert len(tree) <= budget and tree.max_depth <= 3
            assert max([tree.depth.count(d) for d in (1, 2, 3)]) <= 3
    # with room for everything DySpec fills its budget (the draft never runs dry here)
    dense = lambda path: torch.softmax(torch.arange(8.0), -1)  # noqa: E731
    assert len(grow(DynamicTreeGrower(10, True, max_depth=4, per_level=3), dist=dense)) == 10
    # greedy: each level keeps the children with the highest cumulative probability
    tree = grow(DynamicTreeGrower(6, True, max_depth=2, per_level=3))
    level1 = tree.children(-1)
    root = draft(())
    assert [tree.tokens[n] for n in level1] == torch.topk(root, 3).indices.tolist()
    candidates = sorted(
        (
            (root[tree.tokens[p]] * draft((tree.tokens[p],))[x]).item()
            for p in level1
            for x in range(V)
        ),
        reverse=True,
    )
    values = _values(tree)
    level2 = sorted((values[n] for n in range(len(tree)) if tree.depth[n] == 2), reverse=True)
    assert level2 == pytest.approx(candidates[:3])


def _values(tree: DraftTree) -> list[float]:
    """Cumulative draft probability of every node (parents come first)."""
    values: list[float] = []
    for n, parent in enumerate(tree.parents):
        above = 1.0 if parent < 0 else values[parent]
        values.append(above * draft(path_of(tree, parent))[tree.tokens[n]].item())
    return values


def test_dynamic_min_value_prunes_unlikely_branches():
    tree = grow(DynamicTreeGrower(20, True, max_depth=4, per_level=4, min_value=0.2))
    assert all(v >= 0.2 for v in _values(tree))
    assert len(grow(DynamicTreeGrower(20, True, max_depth=4, per_level=4, min_value=1.0))) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_nodes"):
        ChainGrower(-1, greedy=True)
    with pytest.raises(ValueError, match="Generator"):
        StaticTreeGrower((2,), 4, greedy=False)
    with pytest.raises(ValueError, match="per_level"):
        DynamicTreeGrower(4, True, per_level=0)
    grower = ChainGrower(2, greedy=True)
    with pytest.raises(ValueError, match=r"\[1, V\]"):
        grower.extend(torch.ones(2, V) / V)
    grow(grower)
    with pytest.raises(RuntimeError, match="finished"):
        grower.extend(torch.ones(1, V) / V)


# -- lossless: verified sampled trees reproduce the target ------------------------------------

TRIALS = 6000
# 3 growers x 2 statistics (first token, first two tokens) = 6 chi-square tests, each at
# ALPHA: a correct sampler fails any of them with probability <= 6 * ALPHA <= 1e-3.
ALPHA = 1e-3 / 6

GROWERS = {
    "static-3,2": lambda g: StaticTreeGrower((3, 2), max_nodes=7, greedy=False, generator=g),
    "dynamic": lambda g: DynamicTreeGrower(6, False, g, max_depth=3, per_level=3),
    "chain-threshold": lambda g: ChainGrower(3, False, g, threshold=0.45, confidence="path"),
}


def verify(tree: DraftTree, prefix: tuple[int, ...], generator) -> list[int]:
    """The tokens one verify step emits, the target being `target`."""
    probs = torch.stack([target(path_of(tree, n, prefix)) for n in range(-1, len(tree))])
    return verify_sampling(tree, probs, generator).tokens


@pytest.mark.parametrize("name", list(GROWERS))
def test_sampled_trees_verify_to_the_target_distribution(name):
    make = GROWERS[name]
    seed = 7 + list(GROWERS).index(name)
    draft_gen, verify_gen = gen(seed), gen(seed + 100)
    counts = torch.zeros(V, V, dtype=torch.long)
    for _ in range(TRIALS):
        out = verify(grow(make(draft_gen)), (), verify_gen)
        if len(out) < 2:  # the engine's next step, from the emitted token
            prefix = (out[0],)
            out = out + verify(grow(make(draft_gen), prefix), prefix, verify_gen)
        counts[out[0], out[1]] += 1
    p0 = target(()).double()
    joint = p0[:, None] * torch.stack([target((x,)).double() for x in range(V)])
    for stat_name, observed, expected in (
        ("first token", counts.sum(1), p0),
        ("two tokens", counts.flatten(), joint.flatten()),
    ):
        stat, df = chi_square_statistic(observed, expected)
        critical = chi_square_critical(df, ALPHA)
        assert stat <= critical, f"{name}, {stat_name}: chi-square {stat:.1f} > {critical:.1f}"
