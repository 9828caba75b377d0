"""StreamingLLM's selection (attention sinks + the most recent window; Xiao et al.) as a
*read* policy: everything stays stored and each decode step reads only sinks + window.

On its own it is the streaming baseline without eviction; its purpose is the draft of
lossless sparse self-speculation (TriForce / MagicDec): the draft reads a fixed, cheap
subset while verification reads the full cache that is still there.
"""

from __future__ import annotations

import torch

from fastdecode.kv.policies.base import ReadPolicy


class StreamingReadPolicy(ReadPolicy):
    name = "streaming_read"
    shared_selection = True  # sinks + window: the same slots in every layer

    def __init__(self, budget: int, sinks: int = 4) -> None:
        super().__init__(budget)
        self.sinks = min(sinks, budget)

    def decode_reads_qk(self, layer, cache) -> bool:
        return False  # positions only

    def select(self, layer, cache, q, visible) -> torch.Tensor:
        """The first `sinks` and the last K - sinks visible slots (a chain's visible slots
        are a prefix); rows that see at most K slots read all of them."""
        k = cache.read_size
        num_kv_heads = cache.k[layer].shape[1]
        seen = visible.sum(-1, keepdim=True)  # [B, 1]
        index = torch.arange(k, device=visible.device)[None, :]  # [1, K]
        window = k - self.sinks
        recent = seen - window + (index - self.sinks)
        slots = torch.where((index < self.sinks) | (seen <= k), index, recent)
        slots = torch.where(slots < seen, slots, -1)
        return slots[:, None, :].expand(-1, num_kv_heads, -1)
