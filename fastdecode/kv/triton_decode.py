"""Decode attention in Triton: one query token per row over its first `length` cache slots.

Split-K ("flash-decoding"): each program reads one slice of one row's keys for one KV head
and serves the whole GQA query group with one matrix product, so K/V are read once per
KV head and never repeated. A second small kernel merges the slices by log-sum-exp.
Reads only the valid slots (lengths live on the device, so it is CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT_SIZE = 256
BLOCK_N = 64


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    num_splits, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(len_ptr + b)
    start = split * SPLIT
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    row = (b * tl.num_programs(1) * GROUP + heads) * num_splits + split
    if start >= length:
        tl.store(lse_ptr + row, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=g < GROUP)
        return
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g[:, None] < GROUP,
        other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    end = tl.minimum(start + SPLIT, length)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    for n0 in range(start, end, BLOCK):
        n = n0 + tl.arange(0, BLOCK)
        valid = n < end
        k = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * stride_vs + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    out = acc / total[:, None]
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=g[:, None] < GROUP)
    tl.store(lse_ptr + row, m + tl.log(total), mask=g < GROUP)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (batch, query head)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    lse = tl.load(lse_ptr + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))
    parts = tl.load(
        part_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
        mask=(s[:, None] < num_splits) & (weights[:, None] > 0),
        other=0.0,
    )
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, 1, D]; caches [B, Hkv, S, D]; lengths [B] (slots 0..len-1) -> [B, Hq, 1, D]."""
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    num_splits = triton.cdiv(capacity, SPLIT_SIZE)
    q = q.contiguous()
    partial = torch.empty(batch * num_heads * num_splits, head_dim, device=q.device)
    lse = torch.empty(batch * num_heads * num_splits, device=q.device)
    _split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, lengths, partial, lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_splits, head_dim**-0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        SPLIT=SPLIT_SIZE, BLOCK=BLOCK_N,
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(batch * num_heads,)](
        partial, lse, out, num_splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim,
    )  # fmt: skip
    return out
