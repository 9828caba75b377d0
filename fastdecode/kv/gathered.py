"""Decode attention over a gathered subset of cache slots (the read side of sparse
retrieval policies such as Quest and TidalDecode).

`indices` [B, Hkv, K] names the slots each (row, KV head) reads; -1 pads a row that has
fewer than K slots to read. The selection is per KV head and shared by its GQA query group,
so K/V are never repeated per query head. On CUDA the Triton kernel
(`fastdecode.kv.triton_gathered`) reads the rows by index in place; elsewhere the plain
PyTorch reference below gathers a copy and runs masked SDPA.

`fused_gathered_attention` is the single-token decode step's version that also takes the
new token's raw QKV projection: it applies RoPE, stores k/v and attends in one Triton launch
(`fastdecode.kv.triton_gathered`); `fused_gathered_attention_reference` spells out the same
contract in PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.kv.attention import decode_kernel_available
from fastdecode.kv.cache import write_kv
from fastdecode.model.layers import split_heads
from fastdecode.model.rope import apply_rope


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


def rotate_new_token(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The new token's QKV projection [B, (Hq + 2 Hkv) * D] and cos/sin [B, D] ->
    q [B, Hq, 1, D], k, v [B, Hkv, 1, D], q and k rotated (as `attention_input` does)."""
    num_kv_heads = (qkv.shape[1] // head_dim - num_heads) // 2
    q, k, v = split_heads(qkv[:, None], num_heads, num_kv_heads, head_dim)
    cos, sin = cos[:, None, None], sin[:, None, None]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def fused_gathered_attention_reference(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """RoPE, store at slot `positions` [B], then attend over `indices` [B, Hkv, K] (only the
    listed slots, the new one included only if listed) -> [B, Hq, 1, D]."""
    q, k, v = rotate_new_token(qkv, cos, sin, num_heads, k_cache.shape[3])
    batch_index = torch.arange(qkv.shape[0], device=qkv.device)[:, None]
    write_kv(k_cache, v_cache, k, v, batch_index, positions[:, None])
    return gathered_attention_reference(q, k_cache, v_cache, indices)


def fused_gathered_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """The Triton kernel (on CUDA, or Triton's interpreter on CPU): the fused selective
    decode step only runs where the kernels do, so there is no fallback here."""
    from fastdecode.kv.triton_gathered import fused_gathered_attention as kernel

    return kernel(qkv, k_cache, v_cache, indices, positions, cos, sin, num_heads)
