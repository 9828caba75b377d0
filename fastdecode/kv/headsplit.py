"""Budgeted KV storage where the KV heads of one layer keep different numbers of positions.

`SparseKVCache` gives every KV head of a layer the same capacity. When heads differ by
kind, not by a few slots (DuoAttention: retrieval heads keep the whole context, streaming
heads a few sinks plus a recent window), padding every head to the largest would save
nothing. Here each layer's KV heads are split into groups, and each group is its own
single-layer `SparseKVCache` over just those heads, at its own capacity and policy: a
streaming head really holds only sinks + window. A KV head and its query group stay
together (GQA is never expanded), so each group attends exactly as a whole layer would,
and the layer's output is the groups' outputs put back in head order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdecode.kv.policies.base import KVPolicy
from fastdecode.kv.sparse import SparseKVCache
from fastdecode.kv.step import StepContext


@dataclass
class HeadGroup:
    """KV heads `heads` of one layer, stored by `policy` at `capacity` slots each."""

    heads: list[int]
    policy: KVPolicy
    capacity: int


class HeadSplitKVCache:
    graph_safe = True  # each head group is a SparseKVCache

    def __init__(
        self,
        layers: list[list[HeadGroup]],
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.batch = batch
        self.num_kv_heads = num_kv_heads
        self.groups: list[list[tuple[torch.Tensor | None, SparseKVCache]]] = []
        for groups in layers:
            assert sorted(h for g in groups for h in g.heads) == list(range(num_kv_heads))
            stores = []
            for g in groups:
                if not g.heads:
                    continue
                every = g.heads == list(range(num_kv_heads))
                index = None if every else torch.tensor(g.heads, device=device)
                store = SparseKVCache(
                    g.policy, [g.capacity], batch, len(g.heads), head_dim, dtype, device
                )
                stores.append((index, store))
            self.groups.append(stores)

    @property
    def capacity(self) -> int:
        """The most slots any KV head of any layer holds."""
        return max(s.capacity for stores in self.groups for _, s in stores)

    def head_capacities(self, layer: int) -> list[int]:
        """Slots each KV head of `layer` holds."""
        caps = [0] * self.num_kv_heads
        for index, store in self.groups[layer]:
            heads = range(self.num_kv_heads) if index is None else index.tolist()
            for h in heads:
                caps[h] = store.capacity
        return caps

    def nbytes(self) -> int:
        return sum(s.nbytes() for stores in self.groups for _, s in stores)

    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        stores = self.groups[layer]
        if len(stores) == 1 and stores[0][0] is None:  # one kind of head: no split needed
            return stores[0][1].store_and_attend(0, q, k, v, step)
        batch, num_heads, length, head_dim = q.shape
        group = num_heads // self.num_kv_heads
        q_by_kv = q.view(batch, self.num_kv_heads, group, length, head_dim)
        out = torch.empty_like(q_by_kv)
        for index, store in stores:
            q_part = q_by_kv[:, index].flatten(1, 2)
            o = store.store_and_attend(0, q_part, k[:, index], v[:, index], step)
            out[:, index] = o.view(batch, len(index), group, length, head_dim)
        return out.view(batch, num_heads, length, head_dim)
