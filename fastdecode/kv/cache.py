"""Preallocated KV storage: one [batch, kv_heads, capacity, head_dim] buffer per layer.

Row b, slot j holds the key/value written for sequence b at slot j. Slots are given
explicitly on every write, so a verify step can write K draft tokens and the engine can
roll back by simply forgetting slots (they are masked until overwritten), or compact an
accepted tree path with `move`.
"""

from __future__ import annotations

import torch

from fastdecode.kv.attention import cache_attention, prompt_attention
from fastdecode.kv.step import StepContext


class KVCache:
    # A decode step reads every slot 0..position, so the fused decode kernel (RoPE + store +
    # attention in one launch) may stand in for `store_and_attend`.
    dense_reads = True
    # A decode step has static shapes and no host syncs: the runner may capture it as a
    # CUDA graph (caches whose step syncs with the host, like ShadowKV's, say False).
    graph_safe = True
    # A multi-token step may read through the tree-verify kernel (`StepContext.tree`).
    tree_reads = True
    # A finished request's slots may be overwritten: a batch loop runs such a row at slot 0,
    # where its attention reads one slot instead of its whole context (a static batch runs
    # until its slowest row is done; finished rows ride along in every step).
    finished_rows_scratch = True

    def __init__(
        self,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch = batch
        self.capacity = capacity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def decode_lengths(self, positions: torch.Tensor) -> torch.Tensor:
        """[B]: the slots 0..n-1 a fused decode step reads; it stores the new token at n-1.
        Here slot = position; a compacted cache (`SparseKVCache` in append mode) differs."""
        return positions + 1

    def after_decode(self, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        """Bookkeeping after a fused decode step wrote slot lengths - 1 of every layer."""

    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        """Store the new k, v [B, Hkv, T, D] of `layer`, then attend q [B, Hq, T, D] over the
        row's visible slots. Every cache kind implements this one method."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        write_kv(k_cache, v_cache, k, v, step.batch_index, step.slots)
        if step.prefill:
            return prompt_attention(q, k, v)
        return cache_attention(q, k_cache, v_cache, step.mask, step.lengths, step.tree)

    def move(self, batch_index: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy slots src -> dst (same row) in every layer: compacts an accepted tree path."""
        for cache in self.k + self.v:
            rows = cache.permute(0, 2, 1, 3)
            rows[batch_index, dst] = rows[batch_index, src]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch_index: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store k, v [B, Hkv, T, D] at slots [B, T] of each row (in place, graph-capturable)."""
    k_cache.permute(0, 2, 1, 3).index_put_((batch_index, slots), k.transpose(1, 2))
    v_cache.permute(0, 2, 1, 3).index_put_((batch_index, slots), v.transpose(1, 2))
