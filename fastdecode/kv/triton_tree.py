"""Tree-verify attention in Triton: T queries per row (the last accepted token and a draft
tree, or one level of a tree being drafted) over a long cached prefix plus a small block of
M slots right after it (the tree's own).

Every query of a row sees the whole prefix, so the prefix is read as a decode step reads
it (split-K, "flash-decoding"): each program takes one slice of one (row, KV head)'s
prefix and serves a tile of that head's G x T queries (the GQA group times the tree's
columns, folded into one axis) with one matrix product, so K/V are read once per query
tile instead of once per query head, and no [T, capacity] mask is built or read. One extra
slice per (row, KV head) attends to the block under the T x M tree mask (SpecInfer's tree
attention). The slices are merged by log-sum-exp with `triton_decode`'s merge kernel.

Masked SDPA over the capacity (the fallback) reads every slot of the capacity and a mask
of G x T x capacity bytes per row and layer; at 8K-32K contexts that made a verify step
cost several plain steps.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdecode.kv.triton_decode import (
    BLOCK_N,
    attend_slice,
    cache_rows,
    masked_softmax_block,
    merge_splits,
    split_scratch,
    split_size,
    store_partial,
)

QUERY_TILE = 64  # query rows (group x tree columns) per program


@triton.jit
def _tree_split_kernel(
    q_ptr, k_ptr, v_ptr, prefix_ptr, local_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    capacity, num_splits, scale,
    GROUP: tl.constexpr, LENGTH: tl.constexpr, LOCAL: tl.constexpr,
    ROWS: tl.constexpr, TILES: tl.constexpr,
    HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
    TREE_BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1) // TILES
    tile = tl.program_id(1) % TILES
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1) // TILES
    r = tile * ROWS + tl.arange(0, ROWS)  # query row within the KV head: g * LENGTH + t
    row_ok = r < GROUP * LENGTH
    t = r % LENGTH
    head = kv_head * GROUP + r // LENGTH
    d = tl.arange(0, HEAD_DIM)
    # merged row (b, head, t) = (b * Hkv + kv_head) * G * T + r; one partial per split
    out_row = ((b * num_kv_heads + kv_head) * GROUP * LENGTH + r) * num_splits + split
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    prefix = tl.load(prefix_ptr + b)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    if split == num_splits - 1:  # the tree's own slots, under the tree mask
        local = local_ptr + b * LENGTH * LOCAL + t[:, None] * LOCAL
        for i in range(0, LOCAL, TREE_BLOCK):
            j = i + tl.arange(0, TREE_BLOCK)
            n = prefix + j
            inside = (j < LOCAL) & (n < capacity)
            visible = tl.load(local + j[None, :], mask=row_ok[:, None] & inside[None, :], other=0)
            k = cache_rows(k_base, n, stride_ks, d, inside)
            v = cache_rows(v_base, n, stride_vs, d, inside)
            m, total, acc = masked_softmax_block(q, k, v, visible != 0, m, total, acc, scale)
    else:
        start = split * SPLIT
        m, total, acc = attend_slice(
            q, k_base, v_base, stride_ks, stride_vs, start, tl.minimum(start + SPLIT, prefix),
            d, m, total, acc, scale, lse_ptr, row_ok, SPLIT, BLOCK, False,
        )  # fmt: skip
    store_partial(out_ptr, lse_ptr, out_row, row_ok, acc, m, total, d, HEAD_DIM)


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix: torch.Tensor,
    local: torch.Tensor,
) -> torch.Tensor:
    """q [B, Hq, T, D]; caches [B, Hkv, S, D]; prefix [B] (slots every query sees); local
    [B, T, M] (query t also sees slot prefix + j where local[b, t, j]) -> [B, Hq, T, D].

    Every query must see at least one slot (column 0, the last accepted token, always is)."""
    q = q.contiguous()
    local = local.to(torch.int8).contiguous()
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    rows = min(QUERY_TILE, max(16, triton.next_power_of_2(group * length)))
    tiles = triton.cdiv(group * length, rows)
    split = split_size(capacity, batch * num_kv_heads)
    block = local.shape[2]
    tree_block = max(16, min(BLOCK_N, triton.next_power_of_2(block)))
    num_splits = triton.cdiv(capacity, split) + 1  # + the tree slice
    partial, lse = split_scratch(batch, num_heads * length, num_splits, head_dim, q.device)
    _tree_split_kernel[(batch, num_kv_heads * tiles, num_splits)](
        q, k_cache, v_cache, prefix, local, partial, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        capacity, num_splits, head_dim**-0.5,
        GROUP=group, LENGTH=length, LOCAL=block, ROWS=rows, TILES=tiles, HEAD_DIM=head_dim,
        SPLIT=split, BLOCK=BLOCK_N, TREE_BLOCK=tree_block,
    )  # fmt: skip
    return merge_splits(
        partial, lse, batch, num_heads, num_splits, head_dim, k_cache.dtype, length=length
    )
