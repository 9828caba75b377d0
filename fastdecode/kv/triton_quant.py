"""Decode attention in Triton over the quantized KV cache (fastdecode.kv.quant): one query
token per row, GQA-aware, split-K; packed 2/4-bit codes and their scales are read and
dequantized in registers (KIVI's point: the bytes read per step shrink with the bits).

Grid (row, KV head, split): the first `q_splits` splits each take one slice of the
quantized positions [0, nq) (salient positions skipped: their bit is set), the rest take
slices of the full-precision buffer (salient set + recent ring, visible when
0 <= fpos <= position). Each program serves the whole query group with one matrix product
(K/V read once per KV head, never repeated), and the slices are merged by log-sum-exp with
`triton_decode`'s merge kernel. nq and positions live on the device and every shape is
fixed per cache, so a launch needs no host sync (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastdecode.kv.quant import QuantLayer, QuantSpec
from fastdecode.kv.triton_decode import (
    merge_splits,
    online_softmax_block,
    split_scratch,
    split_size,
)


@triton.jit
def _unpack(ptr, token, valid, PACKED: tl.constexpr, BITS: tl.constexpr):
    """Codes [BLOCK, D] (float32) of tokens `token`: each token's PACKED bytes are loaded
    once (contiguous) and split into 8 // BITS codes each, channel d = byte * per + j."""
    per: tl.constexpr = 8 // BITS
    offs = token[:, None] * PACKED + tl.arange(0, PACKED)[None, :]
    byte = tl.load(ptr + offs, mask=valid[:, None], other=0).to(tl.int32)
    shift = (tl.arange(0, per) * BITS)[None, None, :]
    codes = (byte[:, :, None] >> shift) & ((1 << BITS) - 1)
    return tl.reshape(codes, (token.shape[0], PACKED * per)).to(tl.float32)


@triton.jit
def _quant_split_kernel(
    q_ptr, kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr, sal_ptr,
    fk_ptr, fv_ptr, fpos_ptr, nq_ptr, pos_ptr, out_ptr, lse_ptr,
    slots, extra, q_splits, num_splits, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr, QGROUP: tl.constexpr, VGROUP: tl.constexpr,
    SPLIT: tl.constexpr, EXTRA_SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    bh = b * num_kv_heads + kv_head
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    row = (b * num_kv_heads * GROUP + heads) * num_splits + split
    group_mask = g[:, None] < GROUP
    q = tl.load(
        q_ptr + (b * num_kv_heads * GROUP + heads)[:, None] * HEAD_DIM + d[None, :],
        mask=group_mask,
        other=0.0,
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if split < q_splits:  # a slice of the quantized positions
        PACKED: tl.constexpr = HEAD_DIM * BITS // 8
        start = split * SPLIT
        end = tl.minimum(start + SPLIT, tl.load(nq_ptr + b))
        kq_base = kq_ptr + bh * slots * PACKED
        vq_base = vq_ptr + bh * slots * PACKED
        for i in range(0, SPLIT, BLOCK):  # blocks past `end` load nothing (masked)
            first = start + i
            n = first + tl.arange(0, BLOCK)
            flags = tl.load(sal_ptr + bh * (slots // 8) + n // 8, mask=n < end, other=1)
            valid = (n < end) & (((flags >> (n % 8)) & 1) == 0)
            # keys: one scale/zero row per channel for the block's group (BLOCK | QGROUP)
            meta = (bh * (slots // QGROUP) + first // QGROUP) * HEAD_DIM + d
            k_scale = tl.load(ks_ptr + meta).to(tl.float32)
            k_zero = tl.load(kz_ptr + meta).to(tl.float32)
            k = _unpack(kq_base, n, valid, PACKED, BITS) * k_scale[None, :] + k_zero[None, :]
            # values: scale/zero per token and group of VGROUP channels
            v = _unpack(vq_base, n, valid, PACKED, BITS)
            if VGROUP == HEAD_DIM:  # one scale per token: a [BLOCK] load
                v_scale = tl.load(vs_ptr + bh * slots + n, mask=valid, other=0.0)
                v_zero = tl.load(vz_ptr + bh * slots + n, mask=valid, other=0.0)
                v = v * v_scale.to(tl.float32)[:, None] + v_zero.to(tl.float32)[:, None]
            else:
                vmeta = (bh * slots + n)[:, None] * (HEAD_DIM // VGROUP) + (d // VGROUP)[None, :]
                v_scale = tl.load(vs_ptr + vmeta, mask=valid[:, None], other=0.0)
                v_zero = tl.load(vz_ptr + vmeta, mask=valid[:, None], other=0.0)
                v = v * v_scale.to(tl.float32) + v_zero.to(tl.float32)
            m, total, acc = online_softmax_block(
                q, k.to(q.dtype), v.to(q.dtype), valid, m, total, acc, scale
            )
    else:  # a slice of the full-precision buffer (salient tokens + recent ring)
        position = tl.load(pos_ptr + b)
        start = (split - q_splits) * EXTRA_SPLIT
        for i in range(0, EXTRA_SPLIT, BLOCK):
            n = start + i + tl.arange(0, BLOCK)
            tag = tl.load(fpos_ptr + bh * extra + n, mask=n < extra, other=-1)
            valid = (tag >= 0) & (tag <= position)
            offs = (bh * extra + n)[:, None] * HEAD_DIM + d[None, :]
            k = tl.load(fk_ptr + offs, mask=valid[:, None], other=0.0)
            v = tl.load(fv_ptr + offs, mask=valid[:, None], other=0.0)
            m, total, acc = online_softmax_block(q, k, v, valid, m, total, acc, scale)
    seen = total > 0  # an empty slice weighs nothing in the merge
    out = acc / tl.where(seen, total, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=group_mask)
    lse = tl.where(seen, m + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + row, lse, mask=g < GROUP)


def launch_shape(spec: QuantSpec, extra: int) -> tuple[int, int, int, int]:
    """(slots per quantized split, quantized splits, slots per fp split, fp splits)."""
    split = max(split_size(spec.slots), spec.group)  # whole key groups per split
    extra_split = split_size(extra)
    return split, triton.cdiv(spec.slots, split), extra_split, triton.cdiv(extra, extra_split)


def quant_decode_attention(
    q: torch.Tensor, lay: QuantLayer, spec: QuantSpec, positions: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, 1, D] at positions [B] over one layer's quantized storage -> [B, Hq, 1, D].

    The query's own token must already be stored (it is always visible, so no row is empty).
    """
    q = q.contiguous()
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, extra = lay.fk.shape[1], lay.fk.shape[2]
    group = num_heads // num_kv_heads
    split, q_splits, extra_split, f_splits = launch_shape(spec, extra)
    num_splits = q_splits + f_splits
    partial, lse = split_scratch(batch, num_heads, num_splits, head_dim, q.device)
    _quant_split_kernel[(batch, num_kv_heads, num_splits)](
        q, lay.kq, lay.ks, lay.kz, lay.vq, lay.vs, lay.vz, lay.sal,
        lay.fk, lay.fv, lay.fpos, lay.nq, positions, partial, lse,
        spec.slots, extra, q_splits, num_splits, head_dim**-0.5,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BITS=spec.bits, QGROUP=spec.group, VGROUP=spec.vgroup,
        SPLIT=split, EXTRA_SPLIT=extra_split, BLOCK=min(64, spec.group),
    )  # fmt: skip
    return merge_splits(partial, lse, batch, num_heads, num_splits, head_dim, q.dtype)
