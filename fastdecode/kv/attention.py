"""Attention over the KV cache: the one function a kernel (or a sparse policy) replaces.

GQA is handled by folding each query group into the query-length axis, so the cache is
read as stored (never repeated per query head) and any SDPA backend works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.kv.tree_mask import TreeMask


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


def prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Prefill of rows that start empty: causal attention among the prompt's own tokens
    (right padding comes after every real token, so no real query sees it). Reads T keys,
    not the cache's capacity, and needs no mask."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def decode_kernel_available(device: torch.device) -> bool:
    """The Triton decode kernel serves CUDA devices; elsewhere SDPA with a mask does."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cache_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    mask: torch.Tensor | None,
    lengths: torch.Tensor | None = None,
    tree: TreeMask | None = None,
) -> torch.Tensor:
    """q [B, Hq, T, D], caches [B, Hkv, S, D] -> [B, Hq, T, D].

    Either `mask` (folded [B, 1, G*T, S], any T), `lengths` [B] (T = 1, slots
    0..len-1 visible, the Triton decode kernel) or `tree` (a verify step: prefix + tree,
    the Triton tree kernel) says what each query sees.
    """
    if tree is not None:
        from fastdecode.kv.triton_tree import tree_attention

        return tree_attention(q, k_cache, v_cache, tree.prefix, tree.local)
    if lengths is not None:
        from fastdecode.kv.triton_decode import decode_attention

        return decode_attention(q, k_cache, v_cache, lengths)
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads * length, head_dim)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
    return out.reshape(batch, num_heads, length, head_dim)
