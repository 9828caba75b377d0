"""Drafting with a model, for a whole batch at once, one tree level per forward pass.

Shared by every model-based drafter (a separate draft model, the target with skipped
layers, the target over a sparse KV cache): they differ only in the forward they run and
the cache it writes. Each row has `pending` tokens its draft cache has not seen yet (the
tokens emitted since the last step; the last one is the tree's root) written from slot
`start`. One *catch-up* pass writes them and yields the distribution after the root; then
every level of the tree is one pass over the rows' frontier nodes, each node attending to
the prefix, its ancestors and itself (tree attention, as in verification). A row's growth
(chain, static tree or DySpec's dynamic tree) is its `TreeGrower`'s business.

Draft K/V go to scratch slots after the root (node i at root + 1 + i) that the next
catch-up or the target's verify step overwrites, so drafting never leaves stale entries
visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastdecode.engine.graphed import trash_slot
from fastdecode.engine.host_copy import to_device
from fastdecode.engine.sampling import filtered_probs, make_generator
from fastdecode.kv.tree_mask import TreeMask
from fastdecode.params import SamplingParams
from fastdecode.spec.tree import DraftTree
from fastdecode.spec.tree_growth import ChainGrower, DynamicTreeGrower, StaticTreeGrower

DraftForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TreeShape:
    """How drafts grow: a chain (stopping early under `threshold` confidence: SpecDec++ /
    Kangaroo / BiLD's fallback), a static tree (`branching[d]` children per node at depth
    d) or a dynamic DySpec tree (`max_depth`, `per_level` nodes expanded per level)."""

    kind: str = "chain"
    branching: tuple[int, ...] = ()
    max_depth: int = 8
    per_level: int = 4
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str | None, threshold: float = 0.0) -> TreeShape:
        """None/"chain", "4,2,1" (static) or "dynamic" / "dynamic:DEPTH:PER_LEVEL"."""
        if text is None or text == "chain":
            return cls(threshold=threshold)
        if text.startswith("dynamic"):
            parts = text.split(":")[1:]
            try:
                numbers = [int(p) for p in parts]
            except ValueError:
                numbers = [0]
            if len(numbers) > 2 or any(n < 1 for n in numbers):
                raise ValueError(
                    f"bad tree {text!r}: use dynamic or dynamic:MAX_DEPTH:PER_LEVEL "
                    "(positive integers)"
                )
            defaults = cls()
            depth = numbers[0] if numbers else defaults.max_depth
            per_level = numbers[1] if len(numbers) > 1 else defaults.per_level
            return cls("dynamic", max_depth=depth, per_level=per_level, threshold=threshold)
        try:
            branching = tuple(int(p) for p in text.split(","))
        except ValueError:
            branching = ()
        if not branching or any(b < 1 for b in branching):
            raise ValueError(
                f"bad tree {text!r}: use chain, dynamic[:DEPTH:PER_LEVEL] or children per "
                "depth like 4,2,1 (positive integers)"
            )
        return cls("static", branching=branching, threshold=threshold)

    def grower(self, room: int, greedy: bool, generator: torch.Generator | None):
        if self.kind == "static":
            return StaticTreeGrower(self.branching, room, greedy, generator)
        if self.kind == "dynamic":
            return DynamicTreeGrower(room, greedy, generator, self.max_depth, self.per_level)
        return ChainGrower(room, greedy, generator, threshold=self.threshold)


def draft_generators(params: Sequence[SamplingParams], device) -> list[torch.Generator | None]:
    """The drafts' own random streams (seeded from the request's seed, but apart from the
    verifier's, so drafting never shifts the request's own draws)."""
    generators = []
    for p in params:
        shifted = p if p.seed is None else _with_seed(p, p.seed + 0x5EED)
        generators.append(make_generator(shifted, device))
    return generators


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, seed=seed)


def draft_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The draft's q [n, V]: filtered as the target samples (best acceptance), softmax for
    greedy requests (greedy growers take the top tokens; DySpec ranks by it)."""
    return logits.float().softmax(-1) if params.greedy else filtered_probs(logits, params)


Column = tuple[int, int, int, int, list[int]]  # token, position, slot, visible prefix, extra


def _step_inputs(rows: list[list[Column]], trash: int, device):
    """tokens, positions, slots [B, W] and what each column sees, as a `TreeMask`: the
    row's shortest visible prefix shared by all its columns, plus the slots after it that a
    column also sees (the rest of its own prefix, its ancestors and itself), so the forward
    can attend with the tree kernel. Columns past a row's own are padding (slot `trash`).
    Built as Python lists, one tensor each: this runs once per draft level for every row."""
    width = max(1, max(len(r) for r in rows))
    prefix = [min((c[3] for c in r), default=0) for r in rows]
    ends = [max([c[3]] + [s + 1 for s in c[4]]) - prefix[b] for b, r in enumerate(rows) for c in r]
    block = max([1] + ends)
    pad_local = [True] + [False] * (block - 1)  # padding columns see the first block slot
    ids, local = [], []
    for start, columns in zip(prefix, rows, strict=True):
        pad = width - len(columns)
        ids.append(
            [
                [c[0] for c in columns] + [0] * pad,
                [c[1] for c in columns] + [0] * pad,
                [c[2] for c in columns] + [trash] * pad,
            ]
        )
        for _, _, _, visible, more in columns:
            seen = [i < visible - start for i in range(block)]
            for slot in more:
                seen[slot - start] = True
            local.append(seen)
        local.extend([pad_local] * pad)
    ids = to_device(ids, device, torch.long)  # [B, 3, W]: one transfer
    local = torch.tensor(local, dtype=torch.bool).reshape(len(rows), width, block)
    mask = TreeMask(to_device(prefix, device, torch.long), to_device(local, device))
    return ids[:, 0], ids[:, 1], ids[:, 2], mask


DecodeStep = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # tokens, positions [B]


def greedy_chains_only(growers: list) -> bool:
    """Every row drafts a greedy chain (or nothing): `grow_greedy_chains` may serve it."""
    return all(g is None or (isinstance(g, ChainGrower) and g.greedy) for g in growers)


def grow_greedy_chains(
    decode: DecodeStep, first: torch.Tensor, roots: list[int], growers: list, trash: int
) -> None:
    """Grow greedy chains with the argmax kept on the GPU. `first` [B, V]: each row's draft
    logits after its root (at position roots[b]); pass k then decodes pass k-1's argmax at
    position root + k (= its slot: a chain node is a plain decode step), so the passes run
    back to back and the host reads every row's tokens and confidences once at the end.
    Level by level, the host waited for each pass before building the next one, and for
    small draft models that wait was most of the drafting time. Same tokens and early
    exits as `draft_trees` + `ChainGrower.extend_top`; rows past their room (or without a
    grower) decode at the trash slot."""
    rooms = [0 if g is None else g.max_nodes for g in growers]
    if not any(rooms):
        return
    positions = to_device(
        [[r + k if k < room else trash for r, room in zip(roots, rooms, strict=True)]
         for k in range(1, max(rooms))],
        first.device, torch.long,
    ).reshape(-1, len(roots))  # fmt: skip
    confidence, tokens = first.float().softmax(-1).max(-1)
    picked, confidences = [tokens], [confidence]
    for level_positions in positions:
        confidence, tokens = decode(tokens, level_positions).float().softmax(-1).max(-1)
        picked.append(tokens)
        confidences.append(confidence)
    chosen = torch.stack(picked, 1).tolist()  # [B, K]: one transfer each
    probs = torch.stack(confidences, 1).tolist()
    for b, grower in enumerate(growers):
        for k in range(rooms[b]):
            if grower.done:
                break
            grower.extend_top(chosen[b][k], probs[b][k])


def draft_trees(
    forward: DraftForward,
    cache,
    pending: list[list[int]],
    starts: list[int],
    growers: list,
    params: Sequence[SamplingParams],
    decode: DecodeStep | None = None,
) -> list[DraftTree]:
    """Write each row's `pending` tokens from slot `starts[b]`, then grow each row's tree
    (rows whose grower is None only catch up). Returns one tree per row. With `decode` (a
    single-token step over the same cache), greedy chains grow on the device
    (`grow_greedy_chains`)."""
    device = cache.k[0].device
    trash = trash_slot(cache)
    rows = [
        [(t, s + j, s + j, s + j + 1, []) for j, t in enumerate(tokens)]
        for tokens, s in zip(pending, starts, strict=True)
    ]
    logits = forward(*_step_inputs(rows, trash, device))
    roots = [s + len(p) - 1 for p, s in zip(pending, starts, strict=True)]
    if decode is not None and greedy_chains_only(growers):
        columns = [max(0, len(p) - 1) for p in pending]
        first = logits[
            torch.arange(len(pending), device=device), to_device(columns, device, torch.long)
        ]
        grow_greedy_chains(decode, first, roots, growers, trash)
        return [DraftTree.empty() if g is None else g.tree() for g in growers]
    first = {
        b: len(pending[b]) - 1
        for b, g in enumerate(growers)
        if g is not None and g.frontier() == [-1]
    }
    _extend(growers, logits, first, params)
    while True:
        frontiers = [[] if g is None or g.done else g.frontier() for g in growers]
        if not any(frontiers):
            break
        rows = []
        for b, nodes in enumerate(frontiers):
            rows.append([_node_column(growers[b], node, roots[b]) for node in nodes])
        logits = forward(*_step_inputs(rows, trash, device))
        _extend(growers, logits, {b: 0 for b, nodes in enumerate(frontiers) if nodes}, params)
    return [DraftTree.empty() if g is None else g.tree() for g in growers]


def _extend(growers: list, logits: torch.Tensor, columns: dict[int, int], params) -> None:
    """Hand each row's grower its frontier's distributions (from column `columns[b]` on).
    Greedy chains, the common case, are served together: one argmax over the batch and one
    host transfer, instead of a handful of host syncs per row and level."""
    chains = [b for b in columns if isinstance(growers[b], ChainGrower) and growers[b].greedy]
    if chains:
        picked = logits[chains, [columns[b] for b in chains]].float().softmax(-1)
        top1, tokens = picked.max(-1)
        for b, token, prob in zip(chains, tokens.tolist(), top1.tolist(), strict=True):
            growers[b].extend_top(token, prob)
    for b, start in columns.items():
        if b not in chains:
            width = len(growers[b].frontier())
            growers[b].extend(draft_distribution(logits[b, start : start + width], params[b]))


def _node_column(grower, node: int, root: int) -> Column:
    """Node `node` of a grower's tree sits at slot root + 1 + node and RoPE position
    root + depth; it sees the prefix up to the root, its ancestors and itself."""
    ancestors = []
    parent = grower.parents[node]
    while parent >= 0:
        ancestors.append(root + 1 + parent)
        parent = grower.parents[parent]
    slot = root + 1 + node
    return (grower.tokens[node], root + grower.depths[node], slot, root + 1, ancestors + [slot])
