"""The visibility of a verify (or tree-drafting) step, stored compactly: a cached prefix
plus a small block of slots right after it.

A verify step's queries (the last accepted token and the draft tree's nodes, written to
the consecutive slots right after the row's cached prefix) each see the whole prefix plus
their own ancestors in the tree. As a dense boolean mask that is [B, T, capacity] bytes and
forces attention through masked SDPA over the whole capacity; kept as (prefix, local) it
lets the tree-verify kernel read the prefix like a decode step (split-K, every query of a
KV head's group in one matrix product) and mask only the small tree block
(SpecInfer's tree attention, with the prefix handled as flash-decoding does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TreeMask(NamedTuple):
    """prefix [B] (long): slots 0..prefix-1 are visible to every query of the row.
    local [B, T, M] (bool): query t also sees slot prefix + j where local[b, t, j]
    (M = T for a verify step, whose columns sit at slots prefix..prefix+T-1)."""

    prefix: torch.Tensor
    local: torch.Tensor

    def dense(self, capacity: int) -> torch.Tensor:
        """The same visibility as a dense mask [B, 1, T, capacity] (SDPA, CPU, other caches)."""
        batch, width, block = self.local.shape
        device = self.local.device
        slots = torch.arange(capacity + block, device=device)
        mask = (slots[None, None, :] < self.prefix[:, None, None]).expand(batch, width, -1)
        columns = self.prefix[:, None] + torch.arange(block, device=device)  # [B, M]
        # block slots past the capacity (padding of a full row) land in the spill area
        mask = mask.clone().scatter_(2, columns[:, None, :].expand(batch, width, block), self.local)
        return mask[:, None, :, :capacity]

    def to(self, device: torch.device | str) -> TreeMask:
        return TreeMask(self.prefix.to(device), self.local.to(device))

    def padded(self, width: int, block: int | None = None) -> TreeMask:
        """`width` query columns and `block` local slots (CUDA graphs have static shapes).
        Extra columns see the prefix and the block's first slot only: their outputs are
        discarded, they just must stay finite."""
        batch, current, current_block = self.local.shape
        block = current_block if block is None else block
        if (width, block) == (current, current_block):
            return self
        local = torch.zeros(batch, width, block, dtype=torch.bool, device=self.local.device)
        local[:, :current, :current_block] = self.local
        local[:, current:, 0] = True
        return TreeMask(self.prefix, local)
