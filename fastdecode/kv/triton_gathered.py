"""Decode attention in Triton over gathered slots: one query token per row, reading only the
K cache rows that `indices` [B, Hkv, K] names (-1: padding, skipped).

Split-K like `triton_decode`: each program takes one slice of one (row, KV head)'s index
list, loads those K/V rows by index straight from the cache (no gathered copy is made) and
serves the whole GQA query group with one matrix product, so each selected row is read
once per KV head. The slices are merged by log-sum-exp with `triton_decode`'s merge kernel.
K is fixed per cache, so the launch has static shapes (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdecode.kv.triton_decode import (
    gather_block,
    merge_splits,
    online_softmax_block,
    split_scratch,
    split_size,
)


@triton.jit
def _gathered_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh,
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
    start = split * SPLIT
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    row = (b * num_kv_heads * GROUP + heads) * num_splits + split
    group_mask = g[:, None] < GROUP
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=group_mask, other=0.0
    )
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    idx_base = idx_ptr + b * stride_ib + kv_head * stride_ih
    end = tl.minimum(start + SPLIT, num_selected)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(0, SPLIT, BLOCK):
        n = start + i + tl.arange(0, BLOCK)
        slot = tl.load(idx_base + n, mask=n < end, other=-1)
        valid = slot >= 0
        k = tl.load(k_base + slot[:, None] * stride_ks + d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + d[None, :], mask=valid[:, None], other=0.0)
        m, total, acc = online_softmax_block(q, k, v, valid, m, total, acc, scale)
    # a slice of padding only (a short row) has total 0: weight 0 in the merge
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=group_mask)
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row, lse, mask=g < GROUP)


def gathered_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, 1, D]; caches [B, Hkv, S, D]; indices [B, Hkv, K] (-1: skip) -> [B, Hq, 1, D].

    Every (row, KV head) must name at least one slot (the current token always is)."""
    q = q.contiguous()
    indices = indices.contiguous()
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    num_selected = indices.shape[2]
    group = num_heads // num_kv_heads
    split = split_size(num_selected, batch * num_kv_heads)
    num_splits = triton.cdiv(num_selected, split)
    partial, lse = split_scratch(batch, num_heads, num_splits, head_dim, q.device)
    _gathered_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, indices, partial, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        indices.stride(0), indices.stride(1),
        num_selected, num_splits, head_dim**-0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        SPLIT=split, BLOCK=gather_block(split),
    )  # fmt: skip
    return merge_splits(partial, lse, batch, num_heads, num_splits, head_dim, k_cache.dtype)
