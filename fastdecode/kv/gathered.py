"""Decode attention over a gathered subset of cache slots (the read side of sparse
retrieval policies such as Quest and TidalDecode).

`indices` [B, Hkv, K] names the slots each (row, KV head) reads; -1 pads a row that has
fewer than K slots to read. The selection is per KV head and shared by its GQA query group,
so K/V are never repeated per query head. On CUDA the Triton kernel
(`fastdecode.kv.triton_gathered`) reads the rows by index in place; elsewhere the plain
PyTorch reference below gathers a copy and runs masked SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.kv.attention import decode_kernel_available


def gathered_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, 1, D]; caches [B, Hkv, S, D]; indices [B, Hkv, K] (-1: skip) -> [B, Hq, 1, D]."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    gather = indices.clamp(min=0)[..., None].expand(-1, -1, -1, head_dim)
    k = k_cache.gather(2, gather)  # [B, Hkv, K, D]
    v = v_cache.gather(2, gather)
    q = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # the query group
    mask = (indices >= 0)[:, :, None, :]  # [B, Hkv, 1, K], shared by the group
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, num_heads, 1, head_dim)


def gathered_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """The Triton kernel on CUDA, the PyTorch reference elsewhere (same contract)."""
    if decode_kernel_available(q.device):
        from fastdecode.kv.triton_gathered import gathered_decode_attention

        return gathered_decode_attention(q, k_cache, v_cache, indices)
    return gathered_attention_reference(q, k_cache, v_cache, indices)
