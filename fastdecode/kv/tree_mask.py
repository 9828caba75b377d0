"""The visibility of a verify step, stored compactly: a cached prefix plus a small tree.

A verify step's queries (the last accepted token and the draft tree's nodes, written to
the consecutive slots right after the row's cached prefix) each see the whole prefix plus
their own ancestors in the tree. As a dense boolean mask that is [B, T, capacity] bytes and
forces attention through masked SDPA over the whole capacity; kept as (prefix, local) it
lets the tree-verify kernel read the prefix like a decode step (split-K, every query of a
KV head's group in one matrix product) and mask only the T x T tree part
(SpecInfer's tree attention, with the prefix handled as flash-decoding does).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class TreeMask(NamedTuple):
    """prefix [B] (long): slots 0..prefix-1 are visible to every query of the row.
    local [B, T, T] (bool): query t also sees slot prefix + j where local[b, t, j]."""

    prefix: torch.Tensor
    local: torch.Tensor

    def dense(self, capacity: int) -> torch.Tensor:
        """The same visibility as a dense mask [B, 1, T, capacity] (SDPA, CPU, other caches)."""
        batch, width, _ = self.local.shape
        device = self.local.device
        slots = torch.arange(capacity + width, device=device)
        mask = (slots[None, None, :] < self.prefix[:, None, None]).expand(batch, width, -1)
        columns = self.prefix[:, None] + torch.arange(width, device=device)  # [B, T]
        # columns past the capacity (padding queries of a full row) land in the spill area
        mask = mask.clone().scatter_(2, columns[:, None, :].expand(batch, width, width), self.local)
        mask = mask[:, :, :capacity]
        return mask[:, None]

    def to(self, device: torch.device | str) -> TreeMask:
        return TreeMask(self.prefix.to(device), self.local.to(device))

    def padded(self, width: int) -> TreeMask:
        """Extra query columns that see the prefix and column 0 only (the padding columns of a
        CUDA-graph width bucket: their outputs are discarded, they just must stay finite)."""
        batch, current, _ = self.local.shape
        if width == current:
            return self
        local = torch.zeros(batch, width, width, dtype=torch.bool, device=self.local.device)
        local[:, :current, :current] = self.local
        local[:, current:, 0] = True
        return TreeMask(self.prefix, local)
