"""Decode attention in Triton: one query token per row over its first `length` cache slots.

Split-K ("flash-decoding"): each program reads one slice of one row's keys for one KV head
and serves the whole GQA query group with one matrix product, so K/V are read once per
KV head and never repeated. A second small kernel merges the slices by log-sum-exp.
Reads only the valid slots (lengths live on the device, so it is CUDA-graph safe).

`fused_decode_attention` also takes the raw QKV projection of the new token: it applies
RoPE to q and k, stores k and v in the cache, and attends, in one launch. That replaces
four to five small kernels per layer, and at these model sizes kernel count, not bytes,
is what a decode step pays for.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64
TARGET_SPLITS = 16  # slices per row and KV head: enough programs to fill the GPU at batch 1


def gather_block(split: int) -> int:
    """Rows per loop trip of the gathered kernels: a whole slice (up to 128) at once, so
    every index and K/V row load of a slice is in flight together (each trip waits twice:
    for the indices, then for the rows they name)."""
    return min(split, 2 * BLOCK_N)


def split_size(capacity: int, rows: int = 1) -> int:
    """Slots per program: few loop trips (latency) but not thousands of slices to merge, and
    enough programs for the GPU: `rows` (row, KV head) pairs x slices >= two waves of SMs.
    At batch 1 a long context otherwise runs on a few dozen programs, each streaming its
    slice alone (flash-decoding's point: split the sequence until the machine is full)."""
    slices = max(TARGET_SPLITS, triton.cdiv(2 * streaming_multiprocessors(), rows))
    return min(1024, max(BLOCK_N, triton.next_power_of_2(triton.cdiv(capacity, slices))))


@functools.cache
def streaming_multiprocessors(device_index: int | None = None) -> int:
    """A GPU's SM count (cached: no query in the hot loop); 132, an H100 SXM's, without
    one (Triton's interpreter)."""
    if not torch.cuda.is_available():
        return 132
    index = torch.cuda.current_device() if device_index is None else device_index
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def _rope(x_ptr, offs_row, d, cos, sin, HEAD_DIM: tl.constexpr, mask):
    """Load rows x[offs_row + d] and rotate them (HF's rotate-half convention), in fp32."""
    half: tl.constexpr = HEAD_DIM // 2
    x = tl.load(x_ptr + offs_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    pair = tl.load(x_ptr + offs_row + ((d + half) % HEAD_DIM)[None, :], mask=mask, other=0.0)
    sign = tl.where(d < half, -1.0, 1.0)
    return x * cos[None, :] + sign[None, :] * pair.to(tl.float32) * sin[None, :]


@triton.jit
def _dot(a, b):
    """a @ b in fp32. float32 operands (the tests' precision) get IEEE products rather than
    the TF32 default, so the GPU kernels match the PyTorch references as tightly as on CPU."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b).to(tl.float32)


@triton.jit
def online_softmax_block(q, k, v, valid, m, total, acc, scale):
    """Fold one block of keys/values into the running (max, sum, weighted values) of the
    query group q [G, D]; invalid columns count for nothing (also when all are invalid)."""
    return masked_softmax_block(q, k, v, valid[None, :], m, total, acc, scale)


@triton.jit
def masked_softmax_block(q, k, v, visible, m, total, acc, scale):
    """`online_softmax_block` with a per-query mask `visible` [G, BLOCK] (tree attention)."""
    return softmax_fold(_dot(q, tl.trans(k)) * scale, v, visible, m, total, acc)


@triton.jit
def softmax_fold(scores, v, visible, m, total, acc):
    """Fold scaled logits `scores` [G, BLOCK] (masked by `visible`) of one block into the
    running (max, sum, weighted values)."""
    scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
    return m_new, total, acc


@triton.jit
def cache_rows(base, n, stride, d, valid):
    """Cache rows n [BLOCK] of one (row, KV head): [BLOCK, D], zeros where not valid."""
    return tl.load(base + n[:, None] * stride + d[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def attend_slice(
    q, k_base, v_base, stride_ks, stride_vs, start, end, d, m, total, acc, scale,
    score_rows, score_ok, SPLIT: tl.constexpr, BLOCK: tl.constexpr, SCORES: tl.constexpr,
):  # fmt: skip
    """Fold the contiguous slots start..end-1 (within one SPLIT-slot slice) of one (row, KV
    head) into the running softmax of the query tile q. SCORES: also store each query's
    scaled logit of each slot n at score_rows [G, 1] + n (rows where score_ok [G])."""
    for i in range(0, SPLIT, BLOCK):
        n = start + i + tl.arange(0, BLOCK)
        valid = n < end
        k = cache_rows(k_base, n, stride_ks, d, valid)
        v = cache_rows(v_base, n, stride_vs, d, valid)
        scores = _dot(q, tl.trans(k)) * scale
        if SCORES:
            tl.store(score_rows + n[None, :], scores, mask=score_ok[:, None] & valid[None, :])
        m, total, acc = softmax_fold(scores, v, valid[None, :], m, total, acc)
    return m, total, acc


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, len_ptr, out_ptr, lse_ptr, cos_ptr, sin_ptr, score_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    num_splits, scale, capacity,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, NEW_TOKEN: tl.constexpr, SCORES: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    length = tl.load(len_ptr + b)
    start = split * SPLIT
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    row = (b * num_kv_heads * GROUP + heads) * num_splits + split
    if start >= length:
        tl.store(lse_ptr + row, tl.full([GROUP_PAD], float("-inf"), tl.float32), mask=g < GROUP)
        return
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    group_mask = g[:, None] < GROUP
    if NEW_TOKEN:
        # q_ptr is the QKV projection [B, (Hq + 2 Hkv) * D]: rotate q and k here, store k, v.
        position = length - 1
        cos = tl.load(cos_ptr + b * HEAD_DIM + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * HEAD_DIM + d).to(tl.float32)
        qkv_row = q_ptr + b * stride_qb
        q = _rope(qkv_row, heads[:, None] * HEAD_DIM, d, cos, sin, HEAD_DIM, group_mask)
        k_off = (num_kv_heads * GROUP + kv_head) * HEAD_DIM
        v_off = (num_kv_heads * (GROUP + 1) + kv_head) * HEAD_DIM
        one = tl.arange(0, 1)
        k_new = _rope(qkv_row, k_off + one[:, None] * 0, d, cos, sin, HEAD_DIM, one[:, None] < 1)
        v_new = tl.load(qkv_row + v_off + d).to(tl.float32)
        end = tl.minimum(start + SPLIT, position)  # the new slot is handled from registers
        q = q.to(k_ptr.dtype.element_ty)
    else:
        q = tl.load(
            q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
            mask=group_mask,
            other=0.0,
        )
        end = tl.minimum(start + SPLIT, length)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    # SCORES: logits [B, Hq, capacity] (fp32) for a selection layer's policy
    score_rows = score_ptr + (b * num_kv_heads * GROUP + heads[:, None]) * capacity
    m, total, acc = attend_slice(
        q, k_base, v_base, stride_ks, stride_vs, start, end, d, m, total, acc, scale,
        score_rows, g < GROUP, SPLIT, BLOCK, SCORES,
    )  # fmt: skip
    if NEW_TOKEN:
        if position < start + SPLIT:  # this split owns the new slot: store it, attend to it
            tl.store(k_base + position * stride_ks + d[None, :] + one[:, None] * 0,
                     k_new.to(k_ptr.dtype.element_ty))  # fmt: skip
            tl.store(v_base + position * stride_vs + d, v_new.to(v_ptr.dtype.element_ty))
            k_rounded = k_new.to(k_ptr.dtype.element_ty).to(tl.float32)
            v_rounded = v_new.to(v_ptr.dtype.element_ty).to(tl.float32)
            score = tl.sum(q.to(tl.float32) * k_rounded, 1) * scale
            if SCORES:
                tl.store(score_rows + position, score[:, None], mask=(g < GROUP)[:, None])
            m_new = tl.maximum(m, score)
            alpha = tl.exp(m - m_new)
            p_new = tl.exp(score - m_new)
            total = total * alpha + p_new
            acc = acc * alpha[:, None] + p_new[:, None] * v_rounded[None, :]
            m = m_new
    store_partial(out_ptr, lse_ptr, row, g < GROUP, acc, m, total, d, HEAD_DIM)


@triton.jit
def store_partial(out_ptr, lse_ptr, row, row_ok, acc, m, total, d, HEAD_DIM: tl.constexpr):
    """Write one slice's normalized output and log-sum-exp for rows `row` [R] where row_ok
    [R]; a slice that saw nothing (padding, past a row's length) gets lse -inf, i.e.
    weight 0 in the merge."""
    seen = total > 0
    out = acc / tl.where(seen, total, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None])
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)  # (batch, query head, query)
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


def split_scratch(batch: int, num_heads: int, num_splits: int, head_dim: int, device):
    """Per-slice partial outputs and log-sum-exps that `merge_splits` combines."""
    rows = batch * num_heads * num_splits
    return torch.empty(rows, head_dim, device=device), torch.empty(rows, device=device)


def merge_splits(
    partial, lse, batch, num_heads, num_splits, head_dim, dtype, length: int = 1
) -> torch.Tensor:
    """Combine the slices of every (row, query head, query) by log-sum-exp: [B, Hq, T, D]."""
    out = torch.empty(batch, num_heads, length, head_dim, device=partial.device, dtype=dtype)
    _merge_kernel[(batch * num_heads * length,)](
        partial, lse, out, num_splits,
        SPLITS_PAD=max(2, triton.next_power_of_2(num_splits)), HEAD_DIM=head_dim,
    )  # fmt: skip
    return out


def _launch(q, k_cache, v_cache, lengths, cos, sin, num_heads, new_token, scores=None):
    """Attention [B, Hq, 1, D] and the slices' log-sum-exps [B, Hq, splits]; `scores`
    [B, Hq, capacity] (fp32), when given, receives every visible slot's scaled logit."""
    batch = lengths.shape[0]
    num_kv_heads, capacity, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = num_heads // num_kv_heads
    split = split_size(capacity, batch * num_kv_heads)
    num_splits = triton.cdiv(capacity, split)
    partial, lse = split_scratch(batch, num_heads, num_splits, head_dim, q.device)
    _split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, lengths, partial, lse, cos, sin,
        lse if scores is None else scores,
        q.stride(0), q.stride(1) if not new_token else head_dim,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_splits, head_dim**-0.5, capacity,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        SPLIT=split, BLOCK=BLOCK_N, NEW_TOKEN=new_token, SCORES=scores is not None,
    )  # fmt: skip
    out = merge_splits(partial, lse, batch, num_heads, num_splits, head_dim, k_cache.dtype)
    return out, lse.view(batch, num_heads, num_splits)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, 1, D]; caches [B, Hkv, S, D]; lengths [B] (slots 0..len-1) -> [B, Hq, 1, D]."""
    q = q.contiguous()
    return _launch(q, k_cache, v_cache, lengths, q, q, q.shape[1], new_token=False)[0]


def fused_decode_attention(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """qkv [B, (Hq + 2 Hkv) * D] of the new token (pre-RoPE), cos/sin [B, D] at its position
    (= lengths - 1). Stores its k, v at that slot and returns attention [B, Hq, 1, D]."""
    qkv = qkv.contiguous()
    return _launch(qkv, k_cache, v_cache, lengths, cos, sin, num_heads, new_token=True)[0]


def fused_decode_attention_scored(
    qkv: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_decode_attention` that also returns what a selection layer ranks slots by:
    (attention [B, Hq, 1, D], logits [B, Hq, capacity] (fp32, scaled; garbage past each
    row's length), slice log-sum-exps [B, Hq, splits]); softmax = exp(logit - logsumexp).
    The logits come out of the attention's own pass over K, so scoring costs no second
    read of the cache (TidalDecode's selection layers otherwise re-read all keys)."""
    qkv = qkv.contiguous()
    batch, capacity = lengths.shape[0], k_cache.shape[2]
    scores = torch.empty(batch, num_heads, capacity, device=qkv.device, dtype=torch.float32)
    out, lse = _launch(qkv, k_cache, v_cache, lengths, cos, sin, num_heads, True, scores)
    return out, scores, lse
