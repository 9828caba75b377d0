"""Draft trees: what every drafter proposes and what verification scores in one pass.

A chain (classic speculative decoding, Leviathan et al. 2023 "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023 "Accelerating Large Language Model
Decoding with Speculative Sampling") is a tree with one branch. Trees follow SpecInfer's
token-tree verification and Medusa's tree attention: all nodes are fed to the target in one
forward pass, each node attending to the accepted prefix, its ancestors and itself.

Nodes are stored in topological order (a parent comes before its children); node i's
parent is `parents[i]`, -1 meaning a child of the root (the last accepted token, which is
fed as column 0 of the verify step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fastdecode.engine.host_copy import to_device
from fastdecode.kv.tree_mask import TreeMask


@dataclass
class DraftTree:
    """tokens[i], parents[i] (-1 = child of the root) and, optionally, q[i]: the draft
    distribution [V] that node i was drawn from, given its ancestors *and* its earlier
    siblings (so siblings drawn i.i.d. share one q, as in SpecInfer; siblings drawn without
    replacement carry the renormalized remainder, as in Sequoia). q None (for the whole tree
    or one node) means a deterministic proposal (n-gram, suffix): verified as q = one-hot."""

    tokens: list[int]
    parents: list[int]
    q: Sequence[torch.Tensor | None] | torch.Tensor | None = None
    depth: list[int] = field(init=False)
    _children: list[list[int]] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.tokens = [int(t) for t in self.tokens]
        self.parents = [int(p) for p in self.parents]
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.parents)} parents")
        if self.q is not None and len(self.q) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.q)} draft distributions")
        depth = []
        for i, p in enumerate(self.parents):
            if not -1 <= p < i:
                raise ValueError(
                    f"node {i} has parent {p}: parents must come earlier (topological order)"
                )
            depth.append(1 if p < 0 else depth[p] + 1)
        self.depth = depth

    @classmethod
    def chain(cls, tokens: Sequence[int], q: Sequence[torch.Tensor | None] | None = None):
        """A single branch: node i is the child of node i - 1."""
        return cls(list(tokens), list(range(-1, len(tokens) - 1)), q)

    @classmethod
    def empty(cls) -> DraftTree:
        return cls([], [])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_depth(self) -> int:
        return max(self.depth, default=0)

    def q_of(self, node: int) -> torch.Tensor | None:
        return None if self.q is None else self.q[node]

    def children(self, node: int) -> list[int]:
        """Children of `node` (-1: of the root), in proposal order."""
        if self._children is None:
            kids: list[list[int]] = [[] for _ in range(len(self) + 1)]
            for i, p in enumerate(self.parents):
                kids[p + 1].append(i)
            self._children = kids
        return self._children[node + 1]

    def truncate(self, max_nodes: int) -> DraftTree:
        """The first `max_nodes` nodes (still a tree: parents come first)."""
        if len(self) <= max_nodes:
            return self
        q = None if self.q is None else self.q[:max_nodes]
        return DraftTree(self.tokens[:max_nodes], self.parents[:max_nodes], q)

    def ancestor_rows(self, width: int) -> list[list[bool]]:
        """Row i is True at i and at every ancestor of i, padded to `width` columns (Python
        lists: batched verify inputs become one tensor per batch, not one per row)."""
        rows: list[list[bool]] = []
        for i, p in enumerate(self.parents):
            row = list(rows[p]) if p >= 0 else [False] * width
            row[i] = True
            rows.append(row)
        return rows


@dataclass
class TreeBatch:
    """Several rows' trees padded to one width W (padded nodes: token 0, depth 1, seeing only
    themselves; verification never walks them, so they are never accepted)."""

    tokens: torch.Tensor  # [B, W] long
    depth: torch.Tensor  # [B, W] long
    mask: torch.Tensor  # [B, W, W] bool ancestor-or-self
    valid: torch.Tensor  # [B, W] bool

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def verify_inputs(
        self, last: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TreeMask]:
        """Inputs of one verify step over T = 1 + W columns per row.

        last [B]: the last accepted token (column 0, the normal decode input); lengths [B]:
        slots already in the cache. Returns tokens, positions (RoPE: length + depth),
        slots (length + column) [B, T] and what each column sees (a `TreeMask`): the
        cached prefix, plus column 0 and the node's ancestors and itself.
        """
        batch, width = self.tokens.shape
        device = lengths.device
        zeros = torch.zeros(batch, 1, dtype=torch.long, device=device)
        tokens = torch.cat([to_device(last, device)[:, None], to_device(self.tokens, device)], 1)
        positions = lengths[:, None] + torch.cat([zeros, to_device(self.depth, device)], dim=1)
        slots = lengths[:, None] + torch.arange(1 + width, device=device)
        local = torch.zeros(batch, 1 + width, 1 + width, dtype=torch.bool, device=device)
        local[:, :, 0] = True  # every column sees the root
        local[:, 1:, 1:] = to_device(self.mask, device)
        return tokens, positions, slots, TreeMask(lengths, local)


def pad_trees(trees: Sequence[DraftTree], width: int | None = None) -> TreeBatch:
    """Stack trees into tensors of one width (default: the largest tree)."""
    width = max((len(t) for t in trees), default=0) if width is None else width
    tokens, depth, mask, valid = [], [], [], []
    for tree in trees:
        n = len(tree)
        if n > width:
            raise ValueError(f"tree of {n} nodes does not fit width {width}")
        pad = width - n
        tokens.append(tree.tokens + [0] * pad)
        depth.append(tree.depth + [1] * pad)
        mask.append(
            tree.ancestor_rows(width) + [[j == i for j in range(width)] for i in range(n, width)]
        )
        valid.append([True] * n + [False] * pad)
    batch = len(trees)
    return TreeBatch(
        torch.tensor(tokens, dtype=torch.long).reshape(batch, width),
        torch.tensor(depth, dtype=torch.long).reshape(batch, width),
        torch.tensor(mask, dtype=torch.bool).reshape(batch, width, width),
        torch.tensor(valid, dtype=torch.bool).reshape(batch, width),
    )


def verify_step_inputs(
    trees: Sequence[DraftTree],
    last: Sequence[int],
    lengths: Sequence[int],
    columns: int | None = None,
    trash: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TreeMask]:
    """`TreeBatch.verify_inputs` built on the host from Python lists, one tensor per input
    and already `columns` wide (a CUDA graph's width bucket; default 1 + the largest tree):
    with torch ops, padding and building cost ~0.3 ms of host time per batch-1 verify step,
    during which the GPU idles. Columns past a row's tree are token 0 at the root's position,
    written to the `trash` slot and seeing only the root's slot (their outputs are unused)."""
    columns = 1 + max((len(t) for t in trees), default=0) if columns is None else columns
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    local: list[bool] = []
    root_only = [True] + [False] * (columns - 1)
    for tree, root, length in zip(trees, last, lengths, strict=True):
        pad = columns - 1 - len(tree)
        if pad < 0:
            raise ValueError(f"tree of {len(tree)} nodes does not fit {columns} columns")
        tokens += [root, *tree.tokens] + [0] * pad
        positions += [length] + [length + d for d in tree.depth] + [length] * pad
        slots += list(range(length, length + 1 + len(tree))) + [trash] * pad
        local += root_only
        for row in tree.ancestor_rows(columns - 1):
            local += [True, *row]
        local += root_only * pad
    shape = (len(trees), columns)
    return (
        torch.tensor(tokens, dtype=torch.long).view(shape),
        torch.tensor(positions, dtype=torch.long).view(shape),
        torch.tensor(slots, dtype=torch.long).view(shape),
        TreeMask(
            torch.tensor(list(lengths), dtype=torch.long),
            torch.tensor(local, dtype=torch.bool).view(len(trees), columns, columns),
        ),
    )
