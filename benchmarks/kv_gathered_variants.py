"""Dev benchmark: variants of the gathered sparse decode-attention kernel
(`fastdecode.kv.triton_gathered`) at the Qwen2.5-0.5B attention shape (14 query heads, 2 KV
heads of 64, bf16; 2048 of 32768 slots per (row, KV head)), against bandwidth ceilings.

Every time is taken inside a CUDA graph (LAUNCHES back-to-back launches, replayed, CUDA
events, divided), so launch latency is excluded as in the model's captured decode step.
Launches rotate over SETS separate K/V caches with one index tensor, as successive layers
do: the K/V rows a launch reads are never in L2 from the launch before, q and the indices
are (freshly written in the model). `cold idx` times the other way round: one cache, SETS
index sets that are disjoint per (row, KV head), so the indices come from DRAM too. Unlike
`triton.testing.do_bench`, no launch follows an L2 flush; `V0 shipped after L2 flush`
measures what that flush (a 256 MB zero_, L2 left full of dirty lines) costs.

Why the variants: compiled for sm_90 (`--compile-only` builds every kernel here and prints
registers / spills / shared memory), the shipped kernel waits on four serial memory round
trips per program: q, then the indices, then K, then V. Triton places each layout
conversion (q and V to shared memory, K to its transposed dot operand) right after the
load it converts, and a conversion waits for the data; so V's loads are issued only once
K's rows have arrived.

Variants (a program serves one (row, KV head, split) slice and the whole GQA group of 7
query heads, padded to 16 rows for tl.dot, with an online softmax; slices are merged by
log-sum-exp):

- V0: the shipped kernel + `triton_decode`'s merge kernel (`V0 shipped`: the shipped
  launch; `V0`: the same kernel under other launch configurations).
- V1: index prefetch: the next block's indices are loaded before this block's rows; the
  block's K and V rows in ONE [2 BLOCK, D] load (V addressed from K's base by the storage
  offset), so all are in flight together, with q. Merge kernel.
- V2: the merge fused into the shipped loop: each program stores its partial (out, lse),
  then bumps a per-(row, KV head) counter (acq_rel atomic); the last to arrive merges all
  slices, writes the bf16 output and resets the counter to 0 (CUDA-graph replay safe).
- V3: V1 + V2 (one kernel). Its SPLIT == BLOCK configurations load a slice's indices and
  rows in one go each.
- V4: V2 with K/V rows one block ahead (register double buffering: the next block's loads
  are issued before this block's math) and indices two ahead.
- `<variant> int32 idx`: the fastest fused variant's best configuration on int32 indices.

Ceilings: a same-size contiguous copy (torch), a Triton kernel that only gathers the indexed
K/V rows and sums them (`gather`), and a 1 GiB copy for the device bandwidth (read + write
bytes / time). GB/s is on the K/V bytes a variant must read (indices not counted).

    python benchmarks/kv_gathered_variants.py --batches 32 16 [--out DIR] [--budget-s 170]
    TRITON_INTERPRET=1 python benchmarks/kv_gathered_variants.py --selftest   # CPU, fp32
    python benchmarks/kv_gathered_variants.py --compile-only  # sm_90 build, no GPU needed

`--out DIR` writes DIR/kv_gathered_variants.json and .md. Run it alone on the card.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available() and "--compile-only" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import graph_timing  # noqa: E402
from graph_timing import large_copy_gbps  # noqa: E402

from fastdecode.bench.report import header_lines, meta  # noqa: E402
from fastdecode.kv import triton_gathered  # noqa: E402
from fastdecode.kv.triton_decode import (  # noqa: E402
    merge_splits,
    online_softmax_block,
    split_scratch,
    store_partial,
)

HEADS, KV_HEADS, HEAD_DIM, CONTEXT, SELECTED = 14, 2, 64, 32768, 2048
GROUP = HEADS // KV_HEADS
SETS = 8  # caches (or index sets) the timed launches rotate over
LAUNCHES = 50  # launches per captured graph
REPLAYS = 5  # timed graph replays (median)
TOLERANCE = 1e-2  # bf16 max abs error flagged in the progress lines

# variant -> (PREFETCH, FUSED); PREFETCH 0: the shipped loop, 1: next indices ahead and one
# joint K/V load, 2: K/V rows one block ahead and indices two ahead
VARIANTS = {"V1": (1, False), "V2": (0, True), "V3": (1, True), "V4": (2, True)}
# variant -> launch configurations (split, block, warps, stages), likeliest first: the sweep
# takes the first of every variant, then the second, ..., so --budget-s cuts all evenly
CONFIGS = {
    "V0": [(128, 128, 4, 3), (128, 64, 2, 2), (512, 128, 4, 3), (64, 64, 2, 1),
           (256, 128, 4, 3), (128, 128, 8, 1)],
    "V1": [(128, 128, 4, 1), (512, 128, 4, 1), (128, 128, 8, 1), (64, 64, 4, 1),
           (256, 64, 4, 1), (1024, 128, 8, 1)],
    "V2": [(128, 128, 4, 1), (128, 64, 2, 1), (64, 64, 2, 1), (128, 128, 4, 3),
           (256, 128, 4, 3), (512, 128, 4, 3)],
    "V3": [(128, 128, 4, 1), (512, 128, 4, 1), (128, 128, 8, 1), (64, 64, 4, 1),
           (256, 64, 4, 1), (128, 64, 4, 1), (256, 256, 8, 1), (512, 128, 8, 1),
           (1024, 128, 8, 1)],
    "V4": [(512, 64, 4, 1), (256, 64, 4, 1), (1024, 64, 4, 1), (512, 128, 8, 1),
           (128, 64, 4, 1), (1024, 128, 8, 1)],
}  # fmt: skip
GATHER_CONFIGS = [(128, 128, 4, 1), (64, 64, 2, 1), (256, 128, 4, 1), (512, 128, 8, 1)]
COMPILED: set = set()  # (variant, config) already built: --budget-s does not skip them


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rows(base, slot, stride, d):
    """Cache rows `slot` [BLOCK] of one (row, KV head): [BLOCK, D], zeros where slot < 0."""
    return tl.load(base + slot[:, None] * stride + d[None, :], mask=(slot >= 0)[:, None], other=0.0)


@triton.jit
def _kv_rows(k_base, slot2, half, stride, d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """K and V rows of one block in ONE load, so all are in flight before the first wait:
    slot2 [2 BLOCK] is the block's slots twice, half [2 BLOCK] 0 for the first BLOCK rows and
    V's storage offset from K's (elements; strides alike) for the rest. Returns K, V
    [BLOCK, D] (zeros where the slot < 0) and the slots [BLOCK]. (A [BLOCK, D, 2] load
    costs more registers and a full shared-memory pass per half; pointer joins lose the
    16-byte vector loads.)"""
    ptrs = k_base + slot2[:, None] * stride + d[None, :] + half[:, None]
    kv = tl.load(ptrs, mask=(slot2 >= 0)[:, None], other=0.0)
    k, v = tl.split(tl.permute(tl.reshape(kv, [2, BLOCK, HEAD_DIM]), (1, 2, 0)))
    slot, _ = tl.split(tl.permute(tl.reshape(slot2, [2, BLOCK]), (1, 0)))
    return k, v, slot


@triton.jit
def _tie(k, v, slot):
    """(k, v) unchanged (both are 0 where slot < 0), but each now computed from both, so
    neither's layout conversion (a wait for its data) is placed before the loads issued
    above this call. Holds in the compiled code for V4's loop-carried k, v; on freshly
    loaded ones Triton moves the select behind the conversions (hence V1's joint load)."""
    ok = (slot >= 0)[:, None]
    return tl.where(ok, k, v), tl.where(ok, v, k)


@triton.jit
def _merge_group(
    part_ptr, lse_ptr, out_ptr, b, kv_head, num_kv_heads, num_splits, stride_ob, stride_oh,
    GROUP: tl.constexpr, MERGE_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp merge of all slices of one (row, KV head)'s query group into out (bf16).
    Loads bypass L1 (.cg): the partials were written by other programs."""
    g = tl.arange(0, MERGE_PAD)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, SPLITS_PAD)
    g_ok = g < GROUP
    first = (b * num_kv_heads * GROUP + kv_head * GROUP + g) * num_splits  # [G] row of slice 0
    lse = tl.load(
        lse_ptr + first[:, None] + s[None, :],
        mask=g_ok[:, None] & (s[None, :] < num_splits),
        other=float("-inf"),
        cache_modifier=".cg",
    )
    top = tl.where(g_ok, tl.max(lse, 1), 0.0)  # finite: every (row, KV head) names a slot
    acc = tl.zeros([MERGE_PAD, HEAD_DIM], tl.float32)
    weight = tl.zeros([MERGE_PAD], tl.float32)
    for c in tl.static_range(0, SPLITS_PAD, MERGE_CHUNK):
        sc = c + tl.arange(0, MERGE_CHUNK)
        ok = g_ok[:, None] & (sc[None, :] < num_splits)
        lse_c = tl.load(
            lse_ptr + first[:, None] + sc[None, :], mask=ok, other=float("-inf"),
            cache_modifier=".cg",
        )  # fmt: skip
        w = tl.exp(lse_c - top[:, None])  # [G, C]
        parts = tl.load(
            part_ptr + ((first[:, None] + sc[None, :]) * HEAD_DIM)[:, :, None] + d[None, None, :],
            mask=(ok & (w > 0))[:, :, None],
            other=0.0,
            cache_modifier=".cg",
        )  # [G, C, D]
        acc += tl.sum(parts * w[:, :, None], 1)
        weight += tl.sum(w, 1)
    out = acc / tl.where(weight > 0, weight, 1.0)[:, None]
    heads = kv_head * GROUP + g
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None],
    )


@triton.jit
def _variant_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, part_ptr, lse_ptr, count_ptr, out_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ib, stride_ih, stride_ob, stride_oh,
    num_selected, num_splits, kv_offset, scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr, PREFETCH: tl.constexpr, FUSED: tl.constexpr,
    MERGE_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, num_selected)
    r = tl.arange(0, BLOCK)
    idx_base = idx_ptr + b * stride_ib + kv_head * stride_ih
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    kv_offset = kv_offset.to(tl.int64)  # V's storage from K's (elements; any sign)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + g
    q_ptrs = q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    if PREFETCH == 0:  # as shipped: q; per block indices, wait, K, wait, V, wait, math
        q = tl.load(q_ptrs, mask=g[:, None] < GROUP, other=0.0)
        for i in range(0, SPLIT, BLOCK):
            n = start + i + r
            slot = tl.load(idx_base + n, mask=n < end, other=-1)
            k = _rows(k_base, slot, stride_ks, d)
            v = _rows(v_base, slot, stride_vs, d)
            m, total, acc = online_softmax_block(q, k, v, slot >= 0, m, total, acc, scale)
    elif PREFETCH == 1:  # per block: next block's indices, then K and V in one load, math
        r2 = tl.arange(0, 2 * BLOCK)  # K's rows, then V's
        half = (r2 // BLOCK).to(tl.int64) * kv_offset
        n = start + r2 % BLOCK
        slot2 = tl.load(idx_base + n, mask=n < end, other=-1)
        q = tl.load(q_ptrs, mask=g[:, None] < GROUP, other=0.0)
        for i in range(0, SPLIT, BLOCK):
            n = start + i + BLOCK + r2 % BLOCK
            following = tl.load(idx_base + n, mask=n < end, other=-1)
            k, v, slot = _kv_rows(k_base, slot2, half, stride_ks, d, BLOCK, HEAD_DIM)
            m, total, acc = online_softmax_block(q, k, v, slot >= 0, m, total, acc, scale)
            slot2 = following
    else:  # rows one block ahead, indices two ahead (masked off past the slice); q late
        slot = tl.load(idx_base + start + r, mask=start + r < end, other=-1)
        k = _rows(k_base, slot, stride_ks, d)
        v = _rows(v_base, slot, stride_vs, d)
        n = start + BLOCK + r
        following = tl.load(idx_base + n, mask=n < end, other=-1)
        q = tl.load(q_ptrs, mask=g[:, None] < GROUP, other=0.0)
        for i in range(0, SPLIT, BLOCK):
            n = start + i + 2 * BLOCK + r
            after = tl.load(idx_base + n, mask=n < end, other=-1)
            k_next = _rows(k_base, following, stride_ks, d)
            v_next = _rows(v_base, following, stride_vs, d)
            k, v = _tie(k, v, slot)  # after the next loads: their issue does not wait
            m, total, acc = online_softmax_block(q, k, v, slot >= 0, m, total, acc, scale)
            slot, k, v, following = following, k_next, v_next, after
    row = (b * num_kv_heads * GROUP + heads) * num_splits + split
    store_partial(part_ptr, lse_ptr, row, g < GROUP, acc, m, total, d, HEAD_DIM)
    if FUSED:
        # every thread's partial stores happen before the (one-thread) release atomic; the
        # last program's acquire makes all slices' partials visible to its loads
        tl.debug_barrier()
        counter = count_ptr + b * num_kv_heads + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            _merge_group(
                part_ptr, lse_ptr, out_ptr, b, kv_head, num_kv_heads, num_splits,
                stride_ob, stride_oh, GROUP, MERGE_PAD, HEAD_DIM, SPLITS_PAD, MERGE_CHUNK,
            )  # fmt: skip
            tl.atomic_xchg(counter, 0, sem="relaxed")  # all slices arrived: ready to replay


@triton.jit
def _gather_kernel(
    k_ptr, v_ptr, idx_ptr, out_ptr,
    stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_ib, stride_ih,
    num_selected, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Ceiling: gather the indexed K and V rows of one slice and sum them (one float out)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, num_selected)
    d = tl.arange(0, HEAD_DIM)
    idx_base = idx_ptr + b * stride_ib + kv_head * stride_ih
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    for i in range(0, SPLIT, BLOCK):
        n = start + i + tl.arange(0, BLOCK)
        slot = tl.load(idx_base + n, mask=n < end, other=-1)
        k = _rows(k_base, slot, stride_ks, d)
        v = _rows(v_base, slot, stride_vs, d)
        acc += k.to(tl.float32) + v.to(tl.float32)
    program = (b * tl.num_programs(1) + kv_head) * tl.num_programs(2) + split
    tl.store(out_ptr + program, tl.sum(tl.sum(acc, 1), 0))


# ----------------------------------------------------------------------------- launchers
# A launcher is fn(i) -> output: launch i of a timed graph, reading caches[i % len] with
# indices sets[i % len] (caches: [(k, v)], sets: [idx]).


def _variant_meta(name: str, config, num_selected: int) -> tuple[int, dict]:
    """(slices per (row, KV head), compile-time arguments) of variant `name`."""
    prefetch, fused = VARIANTS[name]
    split, block, _, _ = config
    num_splits = triton.cdiv(num_selected, split)
    splits_pad = max(2, triton.next_power_of_2(num_splits))
    return num_splits, dict(
        GROUP=GROUP, GROUP_PAD=16, HEAD_DIM=HEAD_DIM, SPLIT=split, BLOCK=block,
        PREFETCH=prefetch, FUSED=fused, MERGE_PAD=triton.next_power_of_2(GROUP),
        SPLITS_PAD=splits_pad, MERGE_CHUNK=min(splits_pad, 8),
    )  # fmt: skip


def _v0(q, caches, sets, config):
    """(full, kernel-only) launchers of the shipped kernel with one launch configuration."""
    split, block, warps, stages = config
    batch, num_selected = q.shape[0], sets[0].shape[-1]
    num_splits = triton.cdiv(num_selected, split)
    partial, lse = split_scratch(batch, HEADS, num_splits, HEAD_DIM, q.device)

    def kernel(i: int) -> None:
        (k, v), idx = caches[i % len(caches)], sets[i % len(sets)]
        triton_gathered._gathered_split_kernel[(batch, KV_HEADS, num_splits)](
            q, k, v, idx, q, q, q, partial, lse, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            idx.stride(0), idx.stride(1), num_selected, num_splits, HEAD_DIM**-0.5,
            GROUP=GROUP, GROUP_PAD=16, HEAD_DIM=HEAD_DIM, SPLIT=split, BLOCK=block,
            NEW_TOKEN=False, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def full(i: int) -> torch.Tensor:
        kernel(i)
        return merge_splits(partial, lse, batch, HEADS, num_splits, HEAD_DIM, q.dtype)

    return full, kernel


def _variant(name, q, caches, sets, config):
    """(full, kernel-only or None) launchers of variant `name` with one configuration."""
    _, _, warps, stages = config
    batch, num_selected = q.shape[0], sets[0].shape[-1]
    num_splits, meta = _variant_meta(name, config, num_selected)
    partial, lse = split_scratch(batch, HEADS, num_splits, HEAD_DIM, q.device)
    counts = torch.zeros(batch * KV_HEADS, dtype=torch.int32, device=q.device)
    out = torch.empty_like(q)

    def kernel(i: int) -> None:
        (k, v), idx = caches[i % len(caches)], sets[i % len(sets)]
        assert k.stride() == v.stride() and k.dtype == v.dtype  # V addressed from K's base
        _variant_kernel[(batch, KV_HEADS, num_splits)](
            q, k, v, idx, partial, lse, counts, out, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            idx.stride(0), idx.stride(1), out.stride(0), out.stride(1),
            num_selected, num_splits, (v.data_ptr() - k.data_ptr()) // k.element_size(),
            HEAD_DIM**-0.5, **meta, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def full(i: int) -> torch.Tensor:
        kernel(i)
        if meta["FUSED"]:
            return out
        return merge_splits(partial, lse, batch, HEADS, num_splits, HEAD_DIM, q.dtype)

    return full, None if meta["FUSED"] else kernel


def _shipped(q, caches, sets):
    """`gathered_decode_attention` as shipped (its own launch configuration and merge)."""

    def full(i: int) -> torch.Tensor:
        (k, v), idx = caches[i % len(caches)], sets[i % len(sets)]
        return triton_gathered.gathered_decode_attention(q, k, v, idx)

    return full


def _launchers(name, q, caches, sets, config):
    if name == "V0":
        return _v0(q, caches, sets, config)
    return _variant(name, q, caches, sets, config)


def _gather(caches, sets, config):
    split, block, warps, stages = config
    batch, _, num_selected = sets[0].shape
    num_splits = triton.cdiv(num_selected, split)
    sink = torch.empty(batch * KV_HEADS * num_splits, device=sets[0].device)

    def kernel(i: int) -> torch.Tensor:
        (k, v), idx = caches[i % len(caches)], sets[i % len(sets)]
        _gather_kernel[(batch, KV_HEADS, num_splits)](
            k, v, idx, sink, k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1),
            num_selected, HEAD_DIM=HEAD_DIM, SPLIT=split, BLOCK=block,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return sink

    return kernel


# ----------------------------------------------------------------------------- inputs


def reference(q, k, v, idx):
    """fp32 PyTorch attention of q [B, Hq, 1, D] over the slots idx [B, Hkv, K] names."""
    batch, num_kv_heads, _ = idx.shape
    gather = idx.long().clamp(min=0)[..., None].expand(-1, -1, -1, k.shape[-1])
    keys, values = k.gather(2, gather).float(), v.gather(2, gather).float()
    qg = q.float().reshape(batch, num_kv_heads, -1, k.shape[-1])
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, keys) * k.shape[-1] ** -0.5
    scores = scores.masked_fill((idx < 0)[:, :, None, :], float("-inf"))
    out = torch.einsum("bhgn,bhnd->bhgd", scores.softmax(-1), values)
    return out.reshape(q.shape)


def _inputs(batch, context, selected, device, dtype=torch.bfloat16, caches=SETS):
    """q, `caches` (k, v) pairs and SETS index sets per pattern, disjoint per (row, KV head)
    (int64, as top-k gives): `tokens` (sorted random slots, as kv_gathered_sweep.py) and
    `pages` (selected/16 random pages of 16 consecutive slots)."""
    torch.manual_seed(0)
    shape = (batch, KV_HEADS, context, HEAD_DIM)
    pairs = [(torch.randn(shape, device=device, dtype=dtype),
              torch.randn(shape, device=device, dtype=dtype)) for _ in range(caches)]  # fmt: skip
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    sets = min(SETS, context // selected)
    perm = torch.rand(batch, KV_HEADS, context, device=device).argsort(-1)
    tokens = [perm[..., j * selected : (j + 1) * selected].sort(-1).values for j in range(sets)]
    pages = torch.rand(batch, KV_HEADS, context // 16, device=device).argsort(-1)
    per, offsets = selected // 16, torch.arange(16, device=device)
    pages = [
        (pages[..., j * per : (j + 1) * per].sort(-1).values[..., None] * 16 + offsets).flatten(-2)
        for j in range(sets)
    ]
    return q, pairs, {"tokens": tokens, "pages": pages}


def _worst(*errors: float) -> float:
    """The largest error, NaN if any is NaN (Python's max may skip a NaN)."""
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


def _error(full, ref) -> float:
    """Max abs error of launch 0 (caches[0], sets[0]) against ref."""
    return float((full(0).float() - ref).abs().max())


# ----------------------------------------------------------------------------- timing


def graph_us(fn, launches: int = LAUNCHES, replays: int = REPLAYS) -> float:
    """`graph_timing.graph_us` with this script's defaults."""
    return graph_timing.graph_us(fn, launches, replays)


def same_size_copy_us(nbytes: int) -> float:
    """A contiguous copy of nbytes, rotating over SETS sources (none L2-resident)."""
    src = torch.empty(SETS * nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return graph_us(lambda i: dst.copy_(src[(i % SETS) * nbytes : (i % SETS + 1) * nbytes]))


def after_flush_us(fn) -> float:
    """fn's time right after a 256 MB zero_ (do_bench's L2 flush, which leaves L2 full of
    dirty lines to write back), minus the zero_ alone."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

    def flushed(i: int) -> None:
        flush.zero_()
        fn(i)

    return graph_us(flushed, launches=20) - graph_us(lambda i: flush.zero_(), launches=20)


def _say(*parts) -> None:
    print(*parts, flush=True)


def _measure(name, config, q, caches, sets, ref, nbytes, label=None) -> dict:
    """Error and graph times (with the merge; the split kernel alone where there are two)
    of one variant and launch configuration; `failed` where the compiler rejects it."""
    row = {"variant": name, "config": config}
    try:
        full, kernel = _launchers(name, q, caches, sets, config)
        error = _error(full, ref)
        row["us"] = graph_us(full)
        row["kernel_us"] = graph_us(kernel) if kernel else None
        full(1).fill_(float("nan"))  # a fused variant must rewrite out (counters reset)
        row["error"] = _worst(error, _error(full, ref))
    except Exception as exc:  # a configuration the compiler rejects
        row["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        _say(f"  {label or name} {config}: {row['failed']}")
        return row
    finally:
        COMPILED.add((name, config))
    kernel_note = f" (kernel {row['kernel_us']:.1f})" if kernel else ""
    flag = "" if row["error"] < TOLERANCE else "  <-- ERROR ABOVE TOLERANCE"
    _say(
        f"  {label or name} {config}: {row['us']:.1f} us{kernel_note} "
        f"{nbytes / row['us'] / 1e3:.0f} GB/s, err {row['error']:.3g}{flag}"
    )
    return row


def bench(batch: int, copy_gbps: float, deadline: float) -> dict:
    q, caches, sets = _inputs(batch, CONTEXT, SELECTED, "cuda")
    tokens, pages = sets["tokens"][:1], sets["pages"][:1]  # hot: one index set, SETS caches
    cold = (caches[:1], sets["tokens"])  # one cache, SETS index sets
    nbytes = 2 * batch * KV_HEADS * SELECTED * HEAD_DIM * caches[0][0].element_size()
    ref = reference(q, *caches[0], tokens[0])
    ref_pages = reference(q, *caches[0], pages[0])
    result = {"batch": batch, "kv_bytes": nbytes, "large_copy_GBps": copy_gbps, "configs": []}
    result["copy_us"] = copy_us = same_size_copy_us(nbytes)
    _say(
        f"batch {batch}: {nbytes / 1e6:.1f} MB of K/V; large copy {copy_gbps:.0f} GB/s "
        f"(-> {nbytes / copy_gbps / 1e3:.1f} us floor); same-size copy {copy_us:.1f} us"
    )

    result["gather"] = gather = []
    for config in GATHER_CONFIGS:
        try:
            us = graph_us(_gather(caches, tokens, config))
        except Exception as exc:  # a configuration the compiler rejects
            _say(f"  gather ceiling {config}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        gather.append({"config": config, "us": us})
        _say(f"  gather ceiling {config}: {us:.1f} us ({nbytes / us / 1e3:.0f} GB/s)")
    if gather:
        best_gather = min(gather, key=lambda row: row["us"])
        best_gather["pages_us"] = graph_us(_gather(caches, pages, best_gather["config"]))
        best_gather["cold_us"] = graph_us(_gather(*cold, best_gather["config"]))

    split = triton_gathered.split_size(SELECTED, batch * KV_HEADS)
    config = (split, triton_gathered.gather_block(split), 4, 3)  # Triton's default warps/stages
    result["shipped"] = shipped = {
        "variant": "V0 shipped",
        "config": config,
        "us": graph_us(_shipped(q, caches, tokens)),
        "kernel_us": graph_us(_v0(q, caches, tokens, config)[1]),
        "pages_us": graph_us(_shipped(q, caches, pages)),
        "cold_us": graph_us(_shipped(q, *cold)),
        "after_flush_us": after_flush_us(_v0(q, caches, tokens, config)[0]),
        "error": _error(_shipped(q, caches, tokens), ref),
    }
    _say(
        f"  V0 shipped {config}: {shipped['us']:.1f} us (kernel {shipped['kernel_us']:.1f}, "
        f"pages {shipped['pages_us']:.1f}, cold idx {shipped['cold_us']:.1f}, after a "
        f"do_bench L2 flush {shipped['after_flush_us']:.1f}), err {shipped['error']:.3g}"
    )

    best = {}
    rounds = itertools.zip_longest(*[[(name, c) for c in cs] for name, cs in CONFIGS.items()])
    for name, config in (item for each in rounds for item in each if item):
        if time.monotonic() > deadline and (name, config) not in COMPILED:
            _say(f"  {name} {config}: skipped (--budget-s spent, not compiled yet)")
            continue
        row = _measure(name, config, q, caches, tokens, ref, nbytes)
        result["configs"].append(row)
        if "us" in row and (name not in best or row["us"] < best[name]["us"]):
            best[name] = row
    best = {name: best[name] for name in CONFIGS if name in best}
    for name, row in best.items():
        full, _ = _launchers(name, q, caches, pages, row["config"])
        row["pages_us"] = graph_us(full)
        row["pages_error"] = _error(full, ref_pages)
        row["cold_us"] = graph_us(_launchers(name, q, *cold, row["config"])[0])
    fused = [row for name, row in best.items() if name in VARIANTS and VARIANTS[name][1]]
    if fused:  # the fastest fused variant with int32 indices (top-k gives int64)
        top = min(fused, key=lambda row: row["us"])
        name, config = top["variant"], top["config"]
        narrow, label = [idx.int() for idx in tokens], f"{name} int32 idx"
        best[label] = row = _measure(name, config, q, caches, narrow, ref, nbytes, label)
        if "us" in row:
            full, _ = _launchers(name, q, caches, [idx.int() for idx in pages], config)
            row["pages_us"] = graph_us(full)
            row["pages_error"] = _error(full, ref_pages)
            narrow = [idx.int() for idx in cold[1]]
            row["cold_us"] = graph_us(_launchers(name, q, cold[0], narrow, config)[0])
    result["best"] = best
    result["table"] = table(result)
    _say(result["table"])
    return result


def table(result: dict) -> str:
    nbytes, copy_gbps, copy_us = result["kv_bytes"], result["large_copy_GBps"], result["copy_us"]

    def cell(value) -> str:
        return f"{value:.1f}" if value else "-"

    def line(name, row) -> str:
        us = row["us"]
        gbps = nbytes / us / 1e3
        config = "/".join(map(str, row["config"])) if row.get("config") else "-"
        error = _worst(row.get("error", 0.0), row.get("pages_error", 0.0))
        error = f"{error:.2g}" if "error" in row else "-"
        return (
            f"| {name} | {config} | {us:.1f} | {cell(row.get('kernel_us'))} | {gbps:.0f} | "
            f"{100 * gbps / copy_gbps:.0f}% | {100 * copy_us / us:.0f}% | "
            f"{cell(row.get('pages_us'))} | {cell(row.get('cold_us'))} | {error} |"
        )

    shipped = result["shipped"]
    lines = [
        f"batch {result['batch']}: {nbytes / 1e6:.1f} MB K/V read; large copy "
        f"{copy_gbps:.0f} GB/s (read + write); config = split/block/warps/stages",
        "",
        "| variant | best config | us (graph) | kernel-only us | GB/s | % large copy | "
        "% same-size copy (time) | pages us | cold idx us | max err |",
        "|---|---|---|---|---|---|---|---|---|---|",
        line("copy same bytes (torch)", {"us": copy_us}),
    ]
    if result["gather"]:
        lines.append(line("gather ceiling", min(result["gather"], key=lambda row: row["us"])))
    lines.append(line("V0 shipped", shipped))
    flushed = {"us": shipped["after_flush_us"], "config": shipped["config"]}
    lines.append(line("V0 shipped after L2 flush", flushed))
    lines += [line(name, row) for name, row in result["best"].items() if "us" in row]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def selftest() -> bool:
    """Every variant (and the shipped kernel) on tiny shapes against the fp32 reference,
    with slices that are partly and wholly padding (-1) and a non-power-of-2 slice count."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]
    if device == "cpu":  # the interpreter's bf16 tl.dot returns garbage (triton 3.6)
        print("bf16 skipped: Triton's interpreter mis-computes bf16 tl.dot", flush=True)
        dtypes = dtypes[:1]
    ok = True
    for dtype, tol in dtypes:
        q, caches, sets = _inputs(2, 256, 96, device, dtype, caches=1)
        idx = sets["tokens"][0].clone()
        idx[0, 0, 56:] = -1  # (row 0, KV head 0): slices past 56 are padding
        idx[1, 1, 5:20] = -1
        checks = [("V0 shipped", _shipped(q, caches, [idx]))]
        for name in ("V0", *VARIANTS):
            for config in ((16, 16, 4, 1), (32, 16, 4, 1), (64, 32, 4, 1), (96, 32, 4, 1)):
                if name == "V0" and config[0] not in (16, 32):
                    continue
                full, _ = _launchers(name, q, caches, [idx], config)
                checks.append((f"{name} {config[:2]}", full))
        for name in ("V3", "V4"):
            full, _ = _launchers(name, q, caches, [idx.int()], (32, 16, 4, 1))
            checks.append((f"{name} (32, 16) int32 indices", full))
        ref = reference(q, *caches[0], idx)
        for label, full in checks:
            errors = [_error(full, ref)]
            full(0).fill_(float("nan"))  # a fused variant must rewrite out (counters reset)
            errors.append(_error(full, ref))
            passed = _worst(*errors) < tol  # False for NaN
            ok &= passed
            print(f"{'pass' if passed else 'FAIL'} {str(dtype)[6:]:8} {label}: max err "
                  f"{_worst(*errors):.2e}", flush=True)  # fmt: skip
    return ok


def compile_only() -> None:
    """Build every kernel of the sweep for sm_90 (no GPU needed) and print its registers
    per thread, spill stores and shared memory (from ptxas -v)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    types = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "cos_ptr": "*bf16",
             "sin_ptr": "*bf16", "pos_ptr": "*bf16", "idx_ptr": "*i64", "count_ptr": "*i32",
             "out_ptr": "*fp32", "part_ptr": "*fp32", "lse_ptr": "*fp32", "kv_offset": "i64",
             "scale": "fp32"}  # fmt: skip

    def build(fn, constants, warps, stages, out="*fp32"):
        names = fn.arg_names
        sig = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
        sig["out_ptr"] = out
        aligned = {  # as the launcher specializes them: pointers, strides, sizes % 16 == 0
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(names)
            if sig[n].startswith("*")
            or n.startswith("stride")
            or n in ("num_selected", "kv_offset")
        }
        kernel = triton.compile(
            ASTSource(fn, sig, constants, aligned),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            args = [ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", Path(tmp) / "k.o"]
            log = subprocess.run(args, capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        return (f"{regs.group(1) if regs else '?'} regs, {spills.group(1) if spills else '?'} "
                f"B spilled, {kernel.metadata.shared} B shared")  # fmt: skip

    for config in GATHER_CONFIGS:
        split, block, warps, stages = config
        meta = dict(HEAD_DIM=HEAD_DIM, SPLIT=split, BLOCK=block)
        print("gather", config, build(_gather_kernel, meta, warps, stages), flush=True)
    for name, configs in CONFIGS.items():
        for config in configs:
            split, block, warps, stages = config
            if name == "V0":
                fn, out = triton_gathered._gathered_split_kernel, "*fp32"
                meta = dict(GROUP=GROUP, GROUP_PAD=16, HEAD_DIM=HEAD_DIM, SPLIT=split,
                            BLOCK=block, NEW_TOKEN=False)  # fmt: skip
            else:
                fn, out, meta = _variant_kernel, "*bf16", _variant_meta(name, config, SELECTED)[1]
            try:
                print(name, config, build(fn, meta, warps, stages, out), flush=True)
            except Exception as exc:
                print(name, config, f"FAILED {type(exc).__name__}: {str(exc)[:500]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--out", type=Path, help="write DIR/kv_gathered_variants.json + .md")
    parser.add_argument(
        "--budget-s", type=float, default=170.0, help="build no new configuration after this (s)"
    )
    parser.add_argument("--selftest", action="store_true", help="tiny shapes vs reference")
    parser.add_argument("--compile-only", action="store_true", help="sm_90 build, no GPU")
    args = parser.parse_args()
    if args.selftest:
        sys.exit(0 if selftest() else 1)
    if args.compile_only:
        compile_only()
        return
    deadline = time.monotonic() + args.budget_s
    report = {
        "device": torch.cuda.get_device_name(),
        "meta": meta(
            "python " + " ".join(sys.argv), torch.device("cuda"), {"triton": triton.__version__}
        ),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "launches_per_graph": LAUNCHES,
        "sets": SETS,
        "batches": [],
    }
    copy_gbps = large_copy_gbps()
    _say(f"{report['device']}: 1 GiB copy {copy_gbps:.0f} GB/s (read + write)")
    for batch in args.batches:
        report["batches"].append(bench(batch, copy_gbps, deadline))
        torch.cuda.empty_cache()
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "kv_gathered_variants.json").write_text(json.dumps(report, indent=1))
            head = header_lines("Gathered kernel variants", report["meta"])
            (args.out / "kv_gathered_variants.md").write_text(
                "\n".join(head) + f"\ntriton {triton.__version__}\n\n"
                + "\n\n".join(row["table"] for row in report["batches"]) + "\n"
            )  # fmt: skip


if __name__ == "__main__":
    main()
