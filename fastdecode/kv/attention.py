"""Attention over the KV cache: the one function a kernel (or a sparse policy) replaces.

GQA is handled by folding each query group into the query-length axis, so the cache is
read as stored (never repeated per query head) and any SDPA backend works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def visible_mask(positions: torch.Tensor, capacity: int) -> torch.Tensor:
    """Causal mask [B, 1, T, capacity]: a query at position p sees slots 0..p of its row."""
    slots = torch.arange(capacity, device=positions.device)
    return (slots[None, None, :] <= positions[:, :, None]).unsqueeze(1)


def fold_mask_for_gqa(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[B, 1, T, S] -> [B, 1, group * T, S], matching queries folded by `cache_attention`.

    Computed once per step, not once per layer.
    """
    if group == 1:
        return mask
    batch, _, length, capacity = mask.shape
    return mask.expand(batch, group, length, capacity).reshape(batch, 1, group * length, capacity)


def cache_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, T, D], caches [B, Hkv, S, D], folded mask [B, 1, G*T, S] -> [B, Hq, T, D]."""
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads * length, head_dim)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
    return out.reshape(batch, num_heads, length, head_dim)
