"""Decode attention in Triton over gathered slots: one query token per row, reading only the
K cache rows that `indices` [B, Hkv, K] names (-1: padding, skipped).

Split-K like `triton_decode`: each program takes one slice of one (row, KV head)'s index
list, loads those K/V rows by index straight from the cache (no gathered copy is made) and
serves the whole GQA query group with one matrix product, so each selected row is read
once per KV head. The slices are merged by log-sum-exp with `triton_decode`'s merge kernel.
K is fixed per cache, so the launch has static shapes (CUDA-graph safe).

`fused_gathered_attention` is the sparse-retrieval counterpart of
`triton_decode.fused_decode_attention`: from the raw QKV projection [B, (Hq + 2 Hkv) * D] of
each row's new token and cos/sin [B, D] at its position, the same launch rotates q and k,
stores k and v at slot `position` and attends -- one launch instead of RoPE, two index_put
writes and the gathered kernel. At 0.5B parameters a sparse decode step (TidalDecode,
Quest, streaming reads) is bound by kernel launches, so this is what lets reading 1/16 of
the cache pay off. Exactly the slots `indices` names are attended (the new slot only if it
is listed). Race: split 0 of each (row, KV head) stores the new k/v while other splits may
be reading; no program loads slot `position` from memory -- a listed new slot is taken
from registers (each program rotates k and loads v of the new token itself).
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
    store_partial,
)


@triton.jit
def _gathered_split_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_ih,
    num_selected, num_splits, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, NEW_TOKEN: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    start = split * SPLIT
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    one = tl.arange(0, 1)
    heads = kv_head * GROUP + g
    row = (b * num_kv_heads * GROUP + heads) * num_splits + split
    group_mask = g[:, None] < GROUP
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    if NEW_TOKEN:
        # q_ptr is the QKV projection: q [G, D], k and v [1, D] of the new token, rotated
        # in fp32 and rounded to the cache dtype
        position = tl.load(pos_ptr + b)
        cos = tl.load(cos_ptr + b * HEAD_DIM + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * HEAD_DIM + d).to(tl.float32)
        qkv_row = q_ptr + b * stride_qb
        q = _rope(qkv_row, heads[:, None] * HEAD_DIM, d, cos, sin, HEAD_DIM, group_mask)
        q = q.to(k_ptr.dtype.element_ty)
        k_off = (num_kv_heads * GROUP + kv_head) * HEAD_DIM + one[:, None] * 0
        v_off = (num_kv_heads * (GROUP + 1) + kv_head) * HEAD_DIM + one[:, None] * 0
        k_new = _rope(qkv_row, k_off, d, cos, sin, HEAD_DIM, one[:, None] < 1)
        k_new = k_new.to(k_ptr.dtype.element_ty)
        v_new = tl.load(qkv_row + v_off + d[None, :]).to(v_ptr.dtype.element_ty)
        if split == 0:  # one program per (row, KV head) writes the new slot
            tl.store(k_base + position * stride_ks + d[None, :] + one[:, None] * 0, k_new)
            tl.store(v_base + position * stride_vs + d[None, :] + one[:, None] * 0, v_new)
    else:
        position = -1  # no slot is taken from registers
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=group_mask,
            other=0.0,
        )
    idx_base = idx_ptr + b * stride_ib + kv_head * stride_ih
    end = tl.minimum(start + SPLIT, num_selected)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for i in range(0, SPLIT, BLOCK):
        n = start + i + tl.arange(0, BLOCK)
        slot = tl.load(idx_base + n, mask=n < end, other=-1)
        valid = slot >= 0
        stored = (valid & (slot != position))[:, None]
        k = tl.load(k_base + slot[:, None] * stride_ks + d[None, :], mask=stored, other=0.0)
        v = tl.load(v_base + slot[:, None] * stride_vs + d[None, :], mask=stored, other=0.0)
        if NEW_TOKEN:  # a listed new slot: from registers, never from memory
            fresh = (slot == position)[:, None]
            k = tl.where(fresh, k_new, k)
            v = tl.where(fresh, v_new, v)
        m, total, acc = online_softmax_block(q, k, v, valid, m, total, acc, scale)
    store_partial(out_ptr, lse_ptr, row, g < GROUP, acc, m, total, d, HEAD_DIM)


def _launch(q, k_cache, v_cache, indices, positions, cos, sin, num_heads, new_token):
    indices = indices.contiguous()
    batch, num_kv_heads, num_selected = indices.shape
    head_dim = k_cache.shape[3]
    group = num_heads // num_kv_heads
    split = split_size(num_selected, batch * num_kv_heads)
    num_splits = triton.cdiv(num_selected, split)
    partial, lse = split_scratch(batch, num_heads, num_splits, head_dim, q.device)
    _gathered_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, indices, positions, cos, sin, partial, lse,
        q.stride(0), q.stride(1) if not new_token else head_dim,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        indices.stride(0), indices.stride(1),
        num_selected, num_splits, head_dim**-0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        SPLIT=split, BLOCK=gather_block(split), NEW_TOKEN=new_token,
    )  # fmt: skip
    return merge_splits(partial, lse, batch, num_heads, num_splits, head_dim, k_cache.dtype)


def gathered_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, 1, D]; caches [B, Hkv, S, D]; indices [B, Hkv, K] (-1: skip) -> [B, Hq, 1, D].

    Every (row, KV head) must name at least one slot (the current token always is)."""
    q = q.contiguous()
    return _launch(q, k_cache, v_cache, indices, q, q, q, q.shape[1], new_token=False)


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
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    return _launch(qkv, k_cache, v_cache, indices, positions, cos, sin, num_heads, True)
