"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"):
keep the positions with the largest accumulated attention ("heavy hitters") plus a recent
window; the accumulation goes on during decoding, and the lowest one is evicted."""

from __future__ import annotations

import torch

from fastdecode.kv.policies.base import KVPolicy


def accumulated_attention(
    q: torch.Tensor, k: torch.Tensor, prompt_lengths: torch.Tensor, chunk: int = 512
) -> torch.Tensor:
    """Causal attention weights summed over all real prompt queries: [B, Hkv, T]."""
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    key_pos = torch.arange(length, device=q.device)
    total = torch.zeros(batch, num_kv_heads, length, device=q.device)
    for start in range(0, length, chunk):  # chunks of queries bound the T x T memory
        stop = min(start + chunk, length)
        qc = q[:, :, start:stop].reshape(batch, num_kv_heads, group * (stop - start), head_dim)
        logits = qc.float() @ k.float().transpose(-1, -2) * head_dim**-0.5
        query_pos = torch.arange(start, stop, device=q.device).repeat(group)
        causal = key_pos[None, :] <= query_pos[:, None]
        real = query_pos[None, :] < prompt_lengths[:, None]  # [B, G*chunk]
        weights = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        total += (weights * real[:, None, :, None]).sum(2)
    return total


class H2OPolicy(KVPolicy):
    name = "h2o"
    needs_attention = True

    def __init__(self, budget: int, recent: int | None = None) -> None:
        super().__init__(budget)
        self.recent = budget // 2 if recent is None else min(recent, budget)

    def protected(self, pos, newest):
        return pos > newest[:, None, None] - self.recent

    def prefill_scores(self, layer, q, k, prompt_lengths):
        return accumulated_attention(q, k, prompt_lengths)

    def eviction_scores(self, layer, cache):
        return cache.score[layer]

    def observe(self, layer, cache, weights):
        cache.score[layer] += weights
