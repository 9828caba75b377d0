"""Growing draft trees from a draft model's next-token distributions, one level at a time.

A draft model runs level-synchronously over a batch: each row's grower names the nodes whose
next-token distribution it needs (`frontier`), the draft model scores them all in one pass,
and `extend` turns those distributions into children. The growers know nothing about models.

- `ChainGrower`: one child per level (classic speculative decoding), with early exit when the
  draft's confidence drops (Kangaroo's top-1 confidence; SpecDec++'s "probability that at
  least one token gets rejected", estimated as 1 - the product of top-1 probabilities).
- `StaticTreeGrower`: a fixed shape, branching[d] children per node at depth d (SpecInfer /
  Sequoia / Medusa static trees).
- `DynamicTreeGrower`: DySpec's greedy expansion by cumulative draft probability (the product
  of q along the path) under a node budget, done level by level.

Losslessness under sampling (see `DraftTree`, `fastdecode.spec.verify`): siblings are drawn
*without replacement* (Sequoia) and each child stores the distribution it was drawn from,
the renormalized remainder of its parent's q after its earlier siblings. Whether a node
exists, and how many children a node gets, is decided *before* drawing that node: from its
ancestors, its earlier siblings and nodes in other branches, never from its own token --
keeping a node only because its token looks good would skew the proposal away from the q it
stores. Under greedy the growers take the top tokens and store q = None (a deterministic
proposal), which greedy verification ignores and sampling verification also handles
losslessly.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from fastdecode.spec.tree import DraftTree


@runtime_checkable
class TreeGrower(Protocol):
    """One row's tree under construction. Loop: while not done, hand `extend` the draft's
    (temperature / top-p filtered) next-token probabilities after each `frontier` node."""

    done: bool

    def frontier(self) -> list[int]:
        """Node ids (-1: the root) whose next-token distribution is needed now; [] if done."""
        ...

    def extend(self, dists: torch.Tensor) -> None:
        """dists [len(frontier()), V]: adds the children of the frontier nodes."""
        ...

    def tree(self) -> DraftTree:
        """The tree grown so far."""
        ...


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _race_keys(dist: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exponential-race keys p / E (E ~ Exp(1)): sorting them descending gives a draw of the
    whole vocabulary without replacement (Plackett-Luce, the Gumbel-top-k trick), i.e. each
    next token is drawn from the renormalized remainder. Zero-probability tokens get key 0."""
    noise = torch.empty_like(dist, dtype=torch.float32).exponential_(generator=generator)
    return dist.float() / noise


def _without(q: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor | None:
    """q with `tokens` removed, renormalized (None if nothing is left)."""
    rest = q.clone()
    rest[list(tokens)] = 0.0
    total = rest.sum()
    return rest / total if total > 0 else None


class _Children:
    """The children of one expanded node, materialized one at a time in proposal order.

    Greedy: the tokens by decreasing probability. Sampling: draws without replacement; the
    score of the next child is known before it is drawn: value(parent) x E[q(X)] with X drawn
    from the remainder, = value x sum(rest q^2) / sum(rest q) -- so deciding whether to take
    it never looks at its own token."""

    def __init__(
        self,
        dist: torch.Tensor,
        value: float,
        greedy: bool,
        limit: int,
        generator: torch.Generator | None,
    ):
        q = dist.float()
        support = int((q > 0).sum())
        limit = min(limit, support)
        keys = q if greedy else _race_keys(q, generator)
        order = torch.topk(keys, limit).indices if limit else keys.new_zeros(0, dtype=torch.long)
        self.tokens: list[int] = order.tolist()
        self.probs: list[float] = q[order].tolist()
        self.q = q
        self.value = value
        self.greedy = greedy
        self.taken = 0
        self.mass = float(q.sum())
        self.square = float((q * q).sum())

    def next_score(self) -> float:
        """Score of the next child (-1 when there is none)."""
        if self.taken >= len(self.tokens):
            return -1.0
        if self.greedy:
            return self.value * self.probs[self.taken]
        return self.value * self.square / self.mass if self.mass > 0 else -1.0

    def take(self) -> tuple[int, float, torch.Tensor | None]:
        """(token, its probability under the parent's q, the q it was drawn from)."""
        j = self.taken
        token, prob = self.tokens[j], self.probs[j]
        q = None
        if not self.greedy:  # the renormalized remainder after the earlier siblings
            q = self.q / self.q.sum() if j == 0 else _without(self.q, self.tokens[:j])
        self.taken += 1
        self.mass -= prob
        self.square -= prob * prob
        return token, prob, q


class _Grower:
    """Shared bookkeeping: nodes (token, parent, q, depth, cumulative draft probability)."""

    def __init__(self, max_nodes: int, greedy: bool, generator: torch.Generator | None):
        self.max_nodes = _check_count("max_nodes", max_nodes, 0)
        if not greedy and generator is None:
            raise ValueError("a sampling grower needs the request's torch.Generator")
        self.greedy = bool(greedy)
        self.generator = generator
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.qs: list[torch.Tensor | None] = []
        self.depths: list[int] = []
        self.values: list[float] = []  # product of the draft's q along the path
        self.done = self.max_nodes == 0
        self._frontier: list[int] = [] if self.done else [-1]

    @property
    def room(self) -> int:
        return self.max_nodes - len(self.tokens)

    def depth_of(self, node: int) -> int:
        return 0 if node < 0 else self.depths[node]

    def value_of(self, node: int) -> float:
        return 1.0 if node < 0 else self.values[node]

    def add(self, parent: int, token: int, prob: float, q: torch.Tensor | None) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.qs.append(q)
        self.depths.append(self.depth_of(parent) + 1)
        self.values.append(self.value_of(parent) * prob)
        return len(self.tokens) - 1

    def frontier(self) -> list[int]:
        return [] if self.done else list(self._frontier)

    def _check(self, dists: torch.Tensor) -> list[int]:
        frontier = self.frontier()
        if not frontier:
            raise RuntimeError("extend() called on a finished grower")
        if dists.dim() != 2 or dists.shape[0] != len(frontier):
            raise ValueError(
                f"dists must be [{len(frontier)}, V] (one row per frontier node), "
                f"got {list(dists.shape)}"
            )
        return frontier

    def _finish(self, frontier: list[int]) -> None:
        self._frontier = frontier
        self.done = not frontier or self.room <= 0

    def tree(self) -> DraftTree:
        q = None if all(q is None for q in self.qs) else list(self.qs)
        return DraftTree(list(self.tokens), list(self.parents), q)


class ChainGrower(_Grower):
    """One child per level: the argmax (greedy) or a draw from q (sampling).

    Early exit: before drafting depth d the grower looks at the draft's top-1 probability
    there (Kangaroo: stop once the current token's confidence falls below `threshold`; under
    greedy it is the chosen token's probability) or, with confidence="path", at the product
    of top-1 probabilities up to d (SpecDec++: stop when the estimated probability that at
    least one token gets rejected, 1 - product, exceeds 1 - threshold). A low-confidence
    level adds no node; the chain may be empty (plain decoding for this step)."""

    def __init__(
        self,
        max_nodes: int,
        greedy: bool,
        generator: torch.Generator | None = None,
        threshold: float = 0.0,
        confidence: str = "token",
    ):
        super().__init__(max_nodes, greedy, generator)
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        if confidence not in ("token", "path"):
            raise ValueError(f"confidence must be 'token' or 'path', got {confidence!r}")
        self.threshold = float(threshold)
        self.confidence = confidence
        self._path_confidence = 1.0

    def extend(self, dists: torch.Tensor) -> None:
        (node,) = self._check(dists)
        kids = _Children(dists[0], self.value_of(node), self.greedy, 1, self.generator)
        top1 = float(kids.q.max()) / kids.mass if kids.mass > 0 else 0.0
        self._path_confidence *= top1
        score = top1 if self.confidence == "token" else self._path_confidence
        if not kids.tokens or score < self.threshold:
            self._finish([])
            return
        token, prob, q = kids.take()
        self._finish([self.add(node, token, prob, q)])

    def extend_top(self, token: int, top1: float) -> None:
        """`extend` of a greedy chain from its argmax `token` and that token's probability,
        which the drafting loop computes for every row at once (no per-row host syncs)."""
        if not self.greedy:
            raise RuntimeError("extend_top serves greedy chains; sampling needs extend()")
        (node,) = self.frontier() or [None]
        if node is None:
            raise RuntimeError("extend_top() called on a finished grower")
        self._path_confidence *= top1
        score = top1 if self.confidence == "token" else self._path_confidence
        if score < self.threshold:
            self._finish([])
            return
        self._finish([self.add(node, token, top1, None)])


def parse_branching(spec: str | Sequence[int]) -> tuple[int, ...]:
    """'4,2,1' (a CLI --tree value) or a sequence -> (4, 2, 1): children per node by depth."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.replace("x", ",").split(",") if p.strip()]
        try:
            shape = tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"tree shape must be comma-separated integers like '4,2,1', got {spec!r}"
            ) from None
    else:
        shape = tuple(spec)
    if not shape or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in shape):
        raise ValueError(f"tree shape needs one or more integers >= 1, got {spec!r}")
    return shape


class StaticTreeGrower(_Grower):
    """A fixed shape: branching[d] children per node at depth d (the root is depth 0), filled
    breadth-first until `max_nodes`. E.g. (4, 2, 1): 4 + 8 + 8 = 20 nodes. Only the nodes
    whose children still fit the budget are put on the frontier (no wasted draft work)."""

    def __init__(
        self,
        branching: Sequence[int] | str,
        max_nodes: int,
        greedy: bool,
        generator: torch.Generator | None = None,
    ):
        super().__init__(max_nodes, greedy, generator)
        self.branching = parse_branching(branching)

    def extend(self, dists: torch.Tensor) -> None:
        frontier = self._check(dists)
        added = []
        for node, dist in zip(frontier, dists, strict=True):
            width = min(self.branching[self.depth_of(node)], self.room)
            kids = _Children(dist, self.value_of(node), self.greedy, width, self.generator)
            for _ in range(len(kids.tokens)):
                added.append(self.add(node, *kids.take()))
        depth = self.depth_of(added[0]) if added else len(self.branching)
        if depth >= len(self.branching) or self.room <= 0:
            self._finish([])
            return
        per_node = self.branching[depth]
        self._finish(added[: -(-self.room // per_node)])  # ceil(room / per_node) parents


class DynamicTreeGrower(_Grower):
    """DySpec: grow where the draft is most confident. Each level expands the (at most
    `per_level`) newest nodes with the highest cumulative draft probability, then adds, across
    all their children, the (at most `per_level`) candidates with the highest score: greedy,
    value(parent) x q(token); sampling, value(parent) x E[q] of the next draw without
    replacement (known before the draw). Candidates scoring under `min_value` are not drafted
    (a deep, unlikely node costs a verify column for little chance of acceptance). Stops at
    `max_depth`, at `max_nodes`, or when a level adds nothing."""

    def __init__(
        self,
        max_nodes: int,
        greedy: bool,
        generator: torch.Generator | None = None,
        max_depth: int = 8,
        per_level: int = 4,
        min_value: float = 0.0,
    ):
        super().__init__(max_nodes, greedy, generator)
        self.max_depth = _check_count("max_depth", max_depth, 1)
        self.per_level = _check_count("per_level", per_level, 1)
        if not 0.0 <= min_value <= 1.0:
            raise ValueError(f"min_value must be in [0, 1], got {min_value!r}")
        self.min_value = float(min_value)

    def extend(self, dists: torch.Tensor) -> None:
        frontier = self._check(dists)
        budget = min(self.per_level, self.room)
        kids = [
            _Children(dist, self.value_of(node), self.greedy, budget, self.generator)
            for node, dist in zip(frontier, dists, strict=True)
        ]
        heap = [(-k.next_score(), i) for i, k in enumerate(kids) if k.next_score() >= 0]
        heapq.heapify(heap)
        chosen: list[list[tuple[int, float, torch.Tensor | None]]] = [[] for _ in kids]
        count = 0
        while heap and count < budget:
            score, i = heapq.heappop(heap)
            if -score < self.min_value:
                break
            chosen[i].append(kids[i].take())
            count += 1
            if kids[i].next_score() >= 0:
                heapq.heappush(heap, (-kids[i].next_score(), i))
        added = [  # grouped by parent, siblings in draw order
            self.add(node, *child)
            for node, children in zip(frontier, chosen, strict=True)
            for child in children
        ]
        if not added or self.depth_of(added[0]) >= self.max_depth:
            self._finish([])
            return
        # expand the most probable new nodes whose children could still score >= min_value
        hopeful = [n for n in added if self.values[n] >= self.min_value]
        best = sorted(hopeful, key=lambda n: -self.values[n])[: min(self.per_level, self.room)]
        self._finish(sorted(best))
