"""The KVPolicy interface: a policy only scores positions; storage and attention are the
cache's (fastdecode.kv.sparse), so a policy never needs its own attention loop.

Unlike simulating eviction with masks (kvpress's fault), the cache a policy drives really
holds fewer entries: each layer is allocated at the policy's capacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastdecode.kv.sparse import SparseKVCache


class KVPolicy:
    """Defaults: keep the most recent positions; evict the oldest first."""

    name = "base"
    needs_attention = False  # True: `observe` receives each decode step's attention weights

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"a KV budget must keep at least one position, got {budget}")
        self.budget = budget

    def capacity(self, layer: int, prompt_len: int, max_new: int) -> int:
        """Slots per (row, KV head) that layer `layer` is allocated."""
        return self.budget

    def prefill_scores(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, prompt_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Importance of each prompt position [B, Hkv, T] (higher is kept) given the
        prompt's queries q [B, Hq, T, D] and keys k [B, Hkv, T, D]."""
        positions = torch.arange(k.shape[2], device=k.device, dtype=torch.float32)
        return positions.expand(k.shape[0], k.shape[1], -1).clone()

    def protected(self, pos: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        """bool [B, Hkv, N]: positions `pos` never dropped while `newest` [B] is the latest
        (sinks, an observation or recent window)."""
        return torch.zeros_like(pos, dtype=torch.bool)

    def eviction_scores(self, layer: int, cache: SparseKVCache) -> torch.Tensor:
        """[B, Hkv, C] for a full layer: the lowest unprotected score is overwritten."""
        return cache.pos[layer].float()

    def observe(self, layer: int, cache: SparseKVCache, weights: torch.Tensor) -> None:
        """weights [B, Hkv, C]: attention each slot received this step (needs_attention)."""
