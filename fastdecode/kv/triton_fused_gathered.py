"""Sparse decode attention for the new token in one launch: RoPE, K/V store, gathered read.

The sparse-retrieval counterpart of `triton_decode.fused_decode_attention`. It takes the
raw QKV projection [B, (Hq + 2 Hkv) * D] of each row's new token and cos/sin [B, D] at its
position, rotates q and k, stores k and v at slot `position` of the cache, and attends over
the slots `indices` [B, Hkv, K] names (-1: padding) like `triton_gathered`: one launch
instead of RoPE, two index_put writes and the gathered kernel (plus the same tiny merge).
At 0.5B parameters a sparse decode step (TidalDecode, Quest, streaming reads) is bound by
kernel launches, so this is what lets reading 1/16 of the cache pay off.

Semantics: exactly the slots `indices` names are attended (the unfused path's contract),
and the new slot is attended iff it is listed. Race: program split 0 of each (row, KV head)
stores the new k/v while the other splits may be reading. No program loads slot `position`
from memory: a listed new slot is taken from registers (each program rotates k and loads v
of the new token itself, a few hundred bytes), so no program can see the slot half-written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdecode.kv.triton_decode import (
    _rope,
    gather_block,
    merge_splits,
    online_softmax_block,
    split_scratch,
    split_size,
)


@triton.jit
def _fused_gathered_kernel(
    qkv_ptr, k_ptr, v_ptr, idx_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, lse_ptr,
    stride_qkv,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_ih,
    num_selected, num_splits, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    position = tl.load(pos_ptr + b)
    start = split * SPLIT
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    one = tl.arange(0, 1)
    heads = kv_head * GROUP + g
    row = (b * num_kv_heads * GROUP + heads) * num_splits + split
    group_mask = g[:, None] < GROUP
    # the new token: q [G, D], k and v [1, D], rotated in fp32 and rounded to the cache dtype
    cos = tl.load(cos_ptr + b * HEAD_DIM + d).to(tl.float32)
    sin = tl.load(sin_ptr + b * HEAD_DIM + d).to(tl.float32)
    qkv_row = qkv_ptr + b * stride_qkv
    q = _rope(qkv_row, heads[:, None] * HEAD_DIM, d, cos, sin, HEAD_DIM, group_mask)
    q = q.to(k_ptr.dtype.element_ty)
    k_off = (num_kv_heads * GROUP + kv_head) * HEAD_DIM + one[:, None] * 0
    v_off = (num_kv_heads * (GROUP + 1) + kv_head) * HEAD_DIM + one[:, None] * 0
    k_new = _rope(qkv_row, k_off, d, cos, sin, HEAD_DIM, one[:, None] < 1)
    k_new = k_new.to(k_ptr.dtype.element_ty)
    v_new = tl.load(qkv_row + v_off + d[None, :]).to(v_ptr.dtype.element_ty)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    if split == 0:  # one program per (row, KV head) writes the new slot
        tl.store(k_base + position * stride_ks + d[None, :] + one[:, None] * 0, k_new)
        tl.store(v_base + position * stride_vs + d[None, :] + one[:, None] * 0, v_new)
    idx_base = idx_ptr + b * stride_ib + kv_head * stride_ih
    end = tl.minimum(start + SPLIT, num_selected)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(0, SPLIT, BLOCK):
        n = start + i + tl.arange(0, BLOCK)
        slot = tl.load(idx_base + n, mask=n < end, other=-1)
        valid = slot >= 0
        fresh = slot == position  # listed new slot: from registers, never from memory
        stored = (valid & (slot != position))[:, None]
        k = tl.load(k_base + slot[:, None] * stride_ks + d[None, :], mask=stored, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + d[None, :], mask=stored, other=0.0)
        k = tl.where(fresh[:, None], k_new, k)
        v = tl.where(fresh[:, None], v_new, v)
        m, total, acc = online_softmax_block(q, k, v, valid, m, total, acc, scale)
    # a slice of padding only (a short row) has total 0: weight 0 in the merge
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=group_mask)
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row, lse, mask=g < GROUP)


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
    """qkv [B, (Hq + 2 Hkv) * D] of the new token (pre-RoPE), cos/sin [B, D] at its position
    `positions` [B]. Stores its k, v at slot `positions` of caches [B, Hkv, S, D] and returns
    attention [B, Hq, 1, D] over the slots `indices` [B, Hkv, K] names (-1: skip; the new
    slot counts only if listed, and every (row, KV head) must name at least one slot)."""
    qkv, indices = qkv.contiguous(), indices.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, num_kv_heads, num_selected = indices.shape
    head_dim = k_cache.shape[3]
    group = num_heads // num_kv_heads
    split = split_size(num_selected, batch * num_kv_heads)
    num_splits = triton.cdiv(num_selected, split)
    partial, lse = split_scratch(batch, num_heads, num_splits, head_dim, qkv.device)
    _fused_gathered_kernel[(batch, num_kv_heads, num_splits)](
        qkv, k_cache, v_cache, indices, positions, cos, sin, partial, lse,
        qkv.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        indices.stride(0), indices.stride(1),
        num_selected, num_splits, head_dim**-0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        SPLIT=split, BLOCK=gather_block(split),
    )  # fmt: skip
    return merge_splits(partial, lse, batch, num_heads, num_splits, head_dim, k_cache.dtype)
