"""Dev benchmark: launch configurations and structural variants of the quantized-KV decode
kernel (`fastdecode.kv.triton_quant`: KIVI 2/4-bit keys per channel / values per token,
group 64, 128-token full-precision ring + ZipCache salient tokens) at the Qwen2.5-0.5B
attention shape (14 query heads, 2 KV heads of 64, bf16), 32K context, batches 32 and 8.

Every time is taken inside a CUDA graph (LAUNCHES back-to-back calls, replayed, CUDA
events, divided), so Python launch latency is excluded as in the model's captured decode
step, and the calls rotate over several caches (filled by benchmarks/kv_quant.py's `fill`,
>= 200 MB in all), so no call finds its bytes in L2. GB/s is on the bytes the kernel must
read (benchmarks/kv_quant.py's `must_read`, its `quant_MB`). `V0 shipped, eager + L2
flush` is that script's way (CUDA events around one eager call after a 256 MB zero_).

Why the variants: compiled for sm_90 (`--compile-only` prints registers / spills / shared
memory and the instruction mix of each loop), the shipped tile loop has Triton's software
pipeline (cp.async, num_stages) for what feeds the tensor cores (the packed K and V codes,
the key scales, the broadcast key-zero tile), but the small per-tile vectors that do not
(each bit plane's int16 word of salient flags, its 16 value scales and 16 value zeros)
are plain loads issued a few instructions before their use, between shared-memory
barriers: per 2-bit tile (64 tokens) 1 + 4 serial DRAM round trips (1 + 2 per 4-bit tile
of 32 tokens). A one-warp program is then latency-bound: ~3.4 us per 2-bit tile at batch
32 (kv_quant.md: 165.8 us for 48 tiles per program, one wave), which is why 2 bits
(fewer bytes, more round trips per token) ran slower than 4. Two levers: fewer serial
waits per tile, and more programs in flight per SM (the shipped split gives ~5 one-warp
programs per SM at batch 32; 168 registers allow 12).

- V0: the shipped kernel + merge. `V0 shipped`: as fastdecode launches it; `V0`: under
  other launch configurations (slice tokens per program, warps, pipeline stages).
- V1: the per-tile metadata of tile t+1 (salient flags, key scales, value scales and
  zeros) loaded at the top of tile t's trip and carried in registers: no load in a trip
  is waited on before the trip's math (its first use is ~600 instructions later, at the
  next trip); the codes stay in Triton's cp.async pipeline. Same registers (167) as V0.
  The full-precision slices load K and V rows masked by the slice end only (in flight
  with the position tags; rows with an invalid tag get p = 0, and the buffer's stale rows
  are finite: zeros or real K/V) instead of masked by the loaded tags.
- V2: V1 with two tiles per trip (metadata of the next two loaded first): twice the bytes
  in flight per program and per cp.async stage, at 219-236 registers (8-9 programs per SM).

    python benchmarks/kv_quant_variants.py [--batches 32 8] [--bits 2 4] [--out DIR]
        [--budget-s 150]
    TRITON_INTERPRET=1 python benchmarks/kv_quant_variants.py --selftest   # CPU, tiny
    python benchmarks/kv_quant_variants.py --compile-only  # sm_90 build, no GPU needed

`--budget-s`: no new kernel is compiled after that many seconds (what is compiled is still
timed; results so far are written after every case). `--out DIR` writes
DIR/kv_quant_variants.json and .md. Run it alone on the card.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

if not torch.cuda.is_available() and "--compile-only" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import graph_timing  # noqa: E402
from graph_timing import large_copy_gbps  # noqa: E402
from kv_quant import fill, must_read  # noqa: E402

from fastdecode.kv import triton_quant as tq  # noqa: E402
from fastdecode.kv.quant import QuantLayer, quant_attention_reference  # noqa: E402
from fastdecode.kv.triton_decode import decode_attention  # noqa: E402
from fastdecode.kv.triton_quant import (  # noqa: E402
    _FBLOCK,
    _MAGIC,
    _PLANE,
    _VSCALE,
    FBLOCK,
    LOG2E,
    MERGE_CHUNK,
    _planes,
    bytes_per_token,
)

HEADS, KV_HEADS, HEAD_DIM, CONTEXT = 14, 2, 64, 32768
QGROUP = HEADS // KV_HEADS
KGROUP, RESIDUAL, SALIENT = 64, 128, 0.02  # the `quant` policy's defaults
LAUNCHES = 40  # calls per captured graph
REPLAYS = 5  # timed graph replays (median)
ROTATE_BYTES = 200e6  # the caches a graph rotates over hold at least this much in all
TOLERANCE = 3e-2  # bf16 max abs error (vs the float64 reference) flagged in progress lines
PEAK = 3.0e12  # the project's nominal H100 copy bandwidth (B/s)
GRACE_S = 45  # after --budget-s + this, nothing more is timed (results so far are written)

# variant -> (TRIP: tiles per loop trip, metadata one trip ahead; FP_EARLY: fp rows unmasked)
VARIANTS = {"V1": (1, True), "V2": (2, True)}
# variant -> (warps, stages) builds, likeliest first; the first is swept over SLICES, the
# others at each variant's best slice size
BUILDS = {
    "V0": [(1, 3), (1, 2), (1, 4), (2, 3)],
    "V1": [(1, 3), (1, 2), (1, 4), (2, 3)],
    "V2": [(1, 3), (1, 4)],
}
SLICES = [4096, 2048, 1024, 512, 256, 128]  # quantized tokens per program (+ the shipped)
COMPILED: set = set()  # (variant, bits, warps, stages) built: --budget-s does not skip them


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _tile_meta(
    t, ks_base, vs_base, vz_base, sal_base,
    HEAD_DIM: tl.constexpr, BITS: tl.constexpr, KGROUP: tl.constexpr, VGROUP: tl.constexpr,
):  # fmt: skip
    """Tile t's metadata as one flat tuple of raw loads: each plane's salient flags (an
    int16 word, index i), the key scales [D] of each key group starting in the tile (index
    PER + plane // planes per group; cdiv(TILE, KGROUP) of them), then per value group j and
    plane i the plane's value scales and zeros [PLANE] (index PER + NK + 2 (j PER + i) (+ 1))."""
    PER: tl.constexpr = 8 // BITS
    TILE: tl.constexpr = PER * _PLANE
    NV: tl.constexpr = HEAD_DIM // VGROUP
    r = tl.arange(0, _PLANE)
    d = tl.arange(0, HEAD_DIM)
    first = t * TILE
    meta = ()
    for i in tl.static_range(PER):
        meta = meta + (tl.load(sal_base + t * PER + i),)
    for i in tl.static_range(PER):
        if (i * _PLANE) % KGROUP == 0:
            meta = meta + (tl.load(ks_base + (first + i * _PLANE) // KGROUP * HEAD_DIM + d),)
    for j in tl.static_range(NV):
        for i in tl.static_range(PER):
            ptr = (first + i * _PLANE + r) * NV + j
            meta = meta + (tl.load(vs_base + ptr), tl.load(vz_base + ptr))
    return meta


@triton.jit
def _tile_pf(
    t, meta, q16, q_lo, m, total, acc, zsum,
    kq_base, kz_base, vq_base, lim,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BITS: tl.constexpr,
    KGROUP: tl.constexpr, VGROUP: tl.constexpr, ASM: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    """triton_quant._tile with tile t's key scales and value scales/zeros taken from `meta`
    (`_tile_meta`, loaded earlier) instead of loaded here; same arithmetic."""
    PER: tl.constexpr = 8 // BITS
    TILE: tl.constexpr = PER * _PLANE
    NV: tl.constexpr = HEAD_DIM // VGROUP
    NK: tl.constexpr = (TILE + KGROUP - 1) // KGROUP
    offset: tl.constexpr = 0.0 if CDT == tl.float32 else _MAGIC
    vscale: tl.constexpr = 1.0 if CDT == tl.float32 else _VSCALE
    r = tl.arange(0, _PLANE)
    d = tl.arange(0, HEAD_DIM)
    c = tl.arange(0, VGROUP)
    first = t * TILE
    tile_bytes = t * (_PLANE * HEAD_DIM)
    kbytes = tl.load(kq_base + tile_bytes + r[:, None] * HEAD_DIM + d[None, :])
    kplanes = _planes(kbytes, BITS, ASM, CDT)  # PER x [PLANE, D]
    scores = ()
    top = tl.full([_PLANE, GROUP_PAD], float("-inf"), tl.float32)
    for i in tl.static_range(PER):
        if (i * _PLANE) % KGROUP == 0:  # a key group starts here: fold its scale into q
            k_scale = meta[PER + (i * _PLANE) // KGROUP]
            q_scaled = q16 * k_scale.to(CDT)[:, None]  # [D, G]
            zrow = (first + i * _PLANE) // KGROUP * HEAD_DIM
            zero = tl.load(kz_base + zrow + 0 * r[:, None] + d[None, :]).to(CDT)  # [PLANE, D]
            base = tl.dot(zero, q16, out_dtype=tl.float32)
            if CDT != tl.float32:
                base = tl.dot(zero, q_lo, base, out_dtype=tl.float32)
                ones = tl.full([_PLANE, HEAD_DIM], 1.0, CDT)
                lift = offset * tl.dot(ones, q_scaled, out_dtype=tl.float32)
        scale_i = 1 << (BITS * i)
        if CDT != tl.float32:
            init = base * scale_i - lift
        else:
            init = base * scale_i
        raw = tl.dot(kplanes[i], q_scaled, init, out_dtype=tl.float32)  # [PLANE, G]
        s = raw * (1.0 / scale_i) if i > 0 else raw
        flags = meta[i].to(tl.int32)
        live = (((flags >> r) & 1) == 0) & (first + i * _PLANE < lim)
        s = tl.where(live[:, None], s, float("-inf"))
        top = tl.maximum(top, s)
        scores = scores + (s,)
    top = tl.maximum(m, tl.max(top, 0))
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    alpha = tl.exp2(m - top_safe)
    total = total * alpha[None, :]
    probs = ()
    for i in tl.static_range(PER):
        p = tl.exp2(scores[i] - top_safe[None, :])
        total += p
        probs = probs + (p,)
    unlift = tl.full([_PLANE, _PLANE], -offset / (vscale * _PLANE), CDT)
    new_acc = ()
    new_zsum = ()
    for j in tl.static_range(NV):
        vbytes = tl.load(vq_base + tile_bytes + (j * VGROUP + c)[:, None] * _PLANE + r[None, :])
        vplanes = _planes(vbytes, BITS, ASM, CDT)  # PER x [VGROUP, PLANE]
        a = acc[j] * alpha[None, :]
        z = zsum[j] * alpha[None, :]
        for i in tl.static_range(PER):
            weight = vscale / (1 << (BITS * i))
            v_scale = meta[PER + NK + 2 * (j * PER + i)].to(tl.float32) * weight
            v_zero = meta[PER + NK + 2 * (j * PER + i) + 1].to(tl.float32)
            pv = probs[i].to(CDT) * v_scale.to(CDT)[:, None]  # [PLANE, G]
            a = tl.dot(vplanes[i], pv, a, out_dtype=tl.float32)
            z += probs[i] * v_zero[:, None]
            if CDT != tl.float32:
                z = tl.dot(unlift, pv, z, out_dtype=tl.float32)
        new_acc = new_acc + (a,)
        new_zsum = new_zsum + (z,)
    return top, total, new_acc, new_zsum


@triton.jit
def _trip1(
    t, last, lim, meta0, q16, q_lo, m, total, acc, zsum,
    kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BITS: tl.constexpr,
    KGROUP: tl.constexpr, VGROUP: tl.constexpr, ASM: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    """V1's trip: tile t+1's metadata loads issued first, then tile t folded."""
    ahead = _tile_meta(
        tl.minimum(t + 1, last), ks_base, vs_base, vz_base, sal_base,
        HEAD_DIM, BITS, KGROUP, VGROUP,
    )  # fmt: skip
    m, total, acc, zsum = _tile_pf(
        t, meta0, q16, q_lo, m, total, acc, zsum, kq_base, kz_base, vq_base, lim,
        HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
    )  # fmt: skip
    return m, total, acc, zsum, ahead


@triton.jit
def _trip2(
    t, last, end, lim, meta0, meta1, q16, q_lo, m, total, acc, zsum,
    kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BITS: tl.constexpr,
    KGROUP: tl.constexpr, VGROUP: tl.constexpr, ASM: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    """V2's trip: tiles t+2, t+3's metadata loads issued first, then tiles t, t+1 folded
    (t+1 past the slice end: tile `last` again, all dead)."""
    ahead0 = _tile_meta(
        tl.minimum(t + 2, last), ks_base, vs_base, vz_base, sal_base,
        HEAD_DIM, BITS, KGROUP, VGROUP,
    )  # fmt: skip
    ahead1 = _tile_meta(
        tl.minimum(t + 3, last), ks_base, vs_base, vz_base, sal_base,
        HEAD_DIM, BITS, KGROUP, VGROUP,
    )  # fmt: skip
    m, total, acc, zsum = _tile_pf(
        t, meta0, q16, q_lo, m, total, acc, zsum, kq_base, kz_base, vq_base, lim,
        HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
    )  # fmt: skip
    m, total, acc, zsum = _tile_pf(
        tl.minimum(t + 1, last), meta1, q16, q_lo, m, total, acc, zsum,
        kq_base, kz_base, vq_base, tl.where(t + 1 < end, lim, 0),
        HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
    )  # fmt: skip
    return m, total, acc, zsum, ahead0, ahead1


@triton.jit
def _variant_kernel(
    q_ptr, kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr, sal_ptr,
    fk_ptr, fv_ptr, fpos_ptr, nq_ptr, pos_ptr, part_ptr, lse_ptr,
    num_kv_heads, slots, extra, q_splits, num_splits, tiles_per_split, extra_split, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr, KGROUP: tl.constexpr, VGROUP: tl.constexpr,
    ASM: tl.constexpr, CDT: tl.constexpr,
    INTERPRET: tl.constexpr, STATIC_TILES: tl.constexpr, STATIC_EXTRA: tl.constexpr,
    TRIP: tl.constexpr, FP_EARLY: tl.constexpr,
):  # fmt: skip
    """triton_quant._quant_decode_kernel (same arguments, partials and merge) with the tile
    metadata loaded one trip of TRIP tiles ahead (`_tile_meta`) and, with FP_EARLY, the fp
    rows loaded independently of their position tags."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = bh * GROUP + g
    head_mask = g[None, :] < GROUP
    part_col = (heads * num_splits + split)[None, :] * HEAD_DIM
    q = tl.load(q_ptr + heads[None, :] * HEAD_DIM + d[:, None], mask=head_mask, other=0.0)
    q = q.to(tl.float32) * qk_scale
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    if split < q_splits:
        PER: tl.constexpr = 8 // BITS
        TILE: tl.constexpr = PER * _PLANE
        NV: tl.constexpr = HEAD_DIM // VGROUP
        base = bh.to(tl.int64)
        kq_base = kq_ptr + base * (slots // PER) * HEAD_DIM
        vq_base = vq_ptr + base * (slots // PER) * HEAD_DIM
        ks_base = ks_ptr + base * (slots // KGROUP) * HEAD_DIM
        kz_base = kz_ptr + base * (slots // KGROUP) * HEAD_DIM
        vs_base = vs_ptr + base * slots * NV
        vz_base = vz_ptr + base * slots * NV
        sal_base = sal_ptr + base * (slots // _PLANE)
        nq = tl.load(nq_ptr + b)
        begin = split * tiles_per_split
        end = tl.minimum(begin + tiles_per_split, tl.cdiv(nq, TILE))
        last = tl.maximum(end - 1, begin)  # prefetches clamp here: always a stored tile
        q16 = q.to(CDT)
        q_lo = (q - q16.to(tl.float32)).to(CDT)
        total2 = tl.zeros([_PLANE, GROUP_PAD], tl.float32)
        acc = ()
        zsum = ()
        for _ in tl.static_range(NV):
            acc = acc + (tl.zeros([VGROUP, GROUP_PAD], tl.float32),)
            zsum = zsum + (tl.zeros([_PLANE, GROUP_PAD], tl.float32),)
        # a trip folds tiles t .. t + TRIP - 1 with their metadata loaded on the trip before;
        # a tile past the slice's end (odd counts) is read at `last` and folded as empty
        lim = tl.minimum(nq, end * TILE)  # positions past it are dead (the live test)
        meta0 = _tile_meta(
            begin, ks_base, vs_base, vz_base, sal_base, HEAD_DIM, BITS, KGROUP, VGROUP
        )
        if TRIP == 2:
            meta1 = _tile_meta(
                tl.minimum(begin + 1, last), ks_base, vs_base, vz_base, sal_base,
                HEAD_DIM, BITS, KGROUP, VGROUP,
            )  # fmt: skip
        if INTERPRET:
            for i in range(0, STATIC_TILES, TRIP):
                if begin + i < end:
                    if TRIP == 2:
                        m, total2, acc, zsum, meta0, meta1 = _trip2(
                            begin + i, last, end, lim, meta0, meta1, q16, q_lo, m, total2,
                            acc, zsum, kq_base, ks_base, kz_base, vq_base, vs_base, vz_base,
                            sal_base, HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
                        )  # fmt: skip
                    else:
                        m, total2, acc, zsum, meta0 = _trip1(
                            begin + i, last, lim, meta0, q16, q_lo, m, total2, acc, zsum,
                            kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base,
                            HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
                        )  # fmt: skip
        elif TRIP == 2:
            for t in range(begin, end, 2):
                m, total2, acc, zsum, meta0, meta1 = _trip2(
                    t, last, end, lim, meta0, meta1, q16, q_lo, m, total2, acc, zsum,
                    kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base,
                    HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
                )  # fmt: skip
        else:
            for t in range(begin, end):
                m, total2, acc, zsum, meta0 = _trip1(
                    t, last, lim, meta0, q16, q_lo, m, total2, acc, zsum,
                    kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base,
                    HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
                )  # fmt: skip
        vscale: tl.constexpr = 1.0 if CDT == tl.float32 else _VSCALE
        total = tl.sum(total2, 0)
        seen = total > 0
        inv = 1.0 / tl.where(seen, total, 1.0)
        c = tl.arange(0, VGROUP)
        for j in tl.static_range(NV):
            out = acc[j] * (1.0 / vscale) + tl.sum(zsum[j], 0)[None, :]
            dest = part_ptr + part_col + j * VGROUP + c[:, None]
            tl.store(dest, (out * inv[None, :]).to(part_ptr.dtype.element_ty), mask=head_mask)
    else:  # a slice of the full-precision buffer (salient tokens + recent ring)
        fdt: tl.constexpr = tl.float32 if INTERPRET else fk_ptr.dtype.element_ty
        position = tl.load(pos_ptr + b)
        total = tl.zeros([GROUP_PAD], tl.float32)
        facc = tl.zeros([HEAD_DIM, GROUP_PAD], tl.float32)
        qf = q.to(fdt)
        start = (split - q_splits) * extra_split
        fbase = bh.to(tl.int64) * extra
        for i in range(0, STATIC_EXTRA if INTERPRET else extra_split, _FBLOCK):
            n = start + i + tl.arange(0, _FBLOCK)
            tag = tl.load(fpos_ptr + fbase + n, mask=n < extra, other=-1)
            offs = (fbase + n)[:, None] * HEAD_DIM + d[None, :]
            if FP_EARLY:  # rows masked by the slice end only: in flight with the tags
                inside = (n < extra)[:, None]
                k = tl.load(fk_ptr + offs, mask=inside, other=0.0).to(fdt)
                v = tl.load(fv_ptr + offs, mask=inside, other=0.0).to(fdt)
                valid = (tag >= 0) & (tag <= position)  # p = 0 where not (stale rows: finite)
            else:
                valid = (tag >= 0) & (tag <= position)
                k = tl.load(fk_ptr + offs, mask=valid[:, None], other=0.0).to(fdt)
                v = tl.load(fv_ptr + offs, mask=valid[:, None], other=0.0).to(fdt)
            s = tl.dot(k, qf, out_dtype=tl.float32)  # [FBLOCK, G]
            s = tl.where(valid[:, None], s, float("-inf"))
            top = tl.maximum(m, tl.max(s, 0))
            top_safe = tl.where(top == float("-inf"), 0.0, top)
            alpha = tl.exp2(m - top_safe)
            p = tl.exp2(s - top_safe[None, :])
            total = total * alpha + tl.sum(p, 0)
            pt = p.to(fdt)
            facc = facc * alpha[None, :] + tl.dot(tl.trans(v), pt, out_dtype=tl.float32)
            m = top
        fout = facc / tl.where(total > 0, total, 1.0)[None, :]
        fout = fout.to(part_ptr.dtype.element_ty)
        tl.store(part_ptr + part_col + d[:, None], fout, mask=head_mask)
    lse = tl.where(total > 0, m + tl.log2(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + heads * num_splits + split, lse, mask=g < GROUP)


# ----------------------------------------------------------------------------- launchers
# A launcher is fn(i) -> output [B, Hq, 1, D]: call i of a timed graph, on layers[i % len].


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plan(spec, batch: int, extra: int, slice_tokens: int) -> tuple[int, int, int, int]:
    """triton_quant.launch_shape with the quantized slice size given (tokens, rounded to
    whole tiles): (tiles per split, quantized splits, fp slots per split, fp splits); the
    fp slices hold about as many bytes as the quantized ones (the shipped rule)."""
    tile_bytes = bytes_per_token(spec, HEAD_DIM) * spec.tile
    tiles = spec.slots // spec.tile
    per_split = max(1, min(tiles, slice_tokens // spec.tile))
    slot_bytes = 2 * HEAD_DIM * 2
    blocks = round(per_split * tile_bytes / slot_bytes / FBLOCK)
    extra_split = max(1, min(-(-extra // FBLOCK), blocks)) * FBLOCK
    return per_split, -(-tiles // per_split), extra_split, -(-extra // extra_split)


def shipped_slice(spec, batch: int, extra: int) -> int:
    """Quantized tokens per program of the shipped launch (its SM-count rule)."""
    sms = tq.sm_count(0) if torch.cuda.is_available() and not _interpreting() else 1
    return tq.launch_shape(spec, batch, KV_HEADS, extra, HEAD_DIM, sms)[0] * spec.tile


def shipped_splits(spec, batch: int, extra: int) -> str:
    """The shipped launch shape, as the `splits` column prints it."""
    sms = tq.sm_count(0) if torch.cuda.is_available() and not _interpreting() else 1
    per_split, q_splits, extra_split, f_splits = tq.launch_shape(
        spec, batch, KV_HEADS, extra, HEAD_DIM, sms
    )
    return f"{q_splits}x{per_split * spec.tile}+{f_splits}x{extra_split}fp"


def _launcher(name: str, layers, spec, q, positions, config):
    """(full, kernel-only) launchers of variant `name` (V0 = the shipped kernel) under
    config (slice tokens, warps, stages)."""
    slice_tokens, warps, stages = config
    batch = q.shape[0]
    extra = layers[0].fk.shape[2]
    per_split, q_splits, extra_split, f_splits = plan(spec, batch, extra, slice_tokens)
    num_splits = q_splits + f_splits
    rows = batch * HEADS * num_splits
    part_dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
    partial = torch.empty(rows, HEAD_DIM, device=q.device, dtype=part_dtype)
    lse = torch.empty(rows, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    interpret = _interpreting()
    cdt = tl.float32 if q.dtype == torch.float32 else tl.float16
    fn = tq._quant_decode_kernel if name == "V0" else _variant_kernel
    extra_meta = (
        {} if name == "V0" else dict(zip(("TRIP", "FP_EARLY"), VARIANTS[name], strict=True))
    )
    chunks = triton.cdiv(num_splits, MERGE_CHUNK)

    def kernel(i: int) -> None:
        lay = layers[i % len(layers)]
        fn[(num_splits, batch * KV_HEADS)](
            q, lay.kq, lay.ks, lay.kz, lay.vq, lay.vs, lay.vz, lay.sal.view(torch.int16),
            lay.fk, lay.fv, lay.fpos, lay.nq, positions, partial, lse,
            KV_HEADS, spec.slots, extra, q_splits, num_splits, per_split, extra_split,
            HEAD_DIM**-0.5 * LOG2E,
            GROUP=QGROUP, GROUP_PAD=max(8, triton.next_power_of_2(QGROUP)), HEAD_DIM=HEAD_DIM,
            BITS=spec.bits, KGROUP=spec.group, VGROUP=spec.vgroup,
            ASM=not interpret and cdt == tl.float16, CDT=cdt, INTERPRET=interpret,
            STATIC_TILES=per_split if interpret else 0,
            STATIC_EXTRA=extra_split if interpret else 0,
            **extra_meta, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    def full(i: int) -> torch.Tensor:
        kernel(i)
        tq._merge_kernel[(batch * HEADS,)](
            partial, lse, out, num_splits, chunks,
            CHUNK=MERGE_CHUNK, HEAD_DIM=HEAD_DIM, STATIC_CHUNKS=chunks if interpret else 0,
        )  # fmt: skip
        return out

    full.splits = f"{q_splits}x{per_split * spec.tile}+{f_splits}x{extra_split}fp"
    return full, kernel


def _shipped(layers, spec, q, positions):
    """`quant_decode_attention` as fastdecode calls it (its launch shape, its merge)."""

    def full(i: int) -> torch.Tensor:
        return tq.quant_decode_attention(q, layers[i % len(layers)], spec, positions)

    return full


def _dense(q, sets: int):
    """The dense bf16 decode kernel over the same context: (launcher, bytes it reads)."""
    batch = q.shape[0]
    shape = (batch, KV_HEADS, CONTEXT, HEAD_DIM)
    pairs = [(torch.randn(shape, device=q.device, dtype=q.dtype),
              torch.randn(shape, device=q.device, dtype=q.dtype)) for _ in range(sets)]  # fmt: skip
    lengths = torch.full((batch,), CONTEXT, device=q.device, dtype=torch.int32)

    def full(i: int) -> torch.Tensor:
        k, v = pairs[i % sets]
        return decode_attention(q, k, v, lengths)

    nbytes = 2 * pairs[0][0].numel() * pairs[0][0].element_size() + 2 * q.numel() * 2
    return full, nbytes


# ----------------------------------------------------------------------------- inputs


def _args():
    """The namespace benchmarks/kv_quant.py's `fill` reads."""
    return SimpleNamespace(
        group=KGROUP, residual=RESIDUAL, salient=SALIENT, kv_heads=KV_HEADS, head_dim=HEAD_DIM
    )


def inputs(batch: int, bits: int, context: int, sets: int, device, dtype=torch.bfloat16):
    """`sets` one-layer caches (benchmarks/kv_quant.py's fill: random codes and scales, every
    row at full context, the ring and a 2% salient set in full precision), their spec, nq,
    a query and the positions."""
    torch.manual_seed(0)
    caches = []
    for _ in range(sets):
        cache, nq = fill(_args(), batch, context, bits, device)
        caches.append(cache)
    layers = [c.layers[0] for c in caches]
    if dtype != torch.bfloat16:  # the interpreter's checks (fp32: exact path; fp16)
        for lay in layers:
            meta = torch.float16 if dtype == torch.float16 else dtype
            for name in ("ks", "kz", "vs", "vz"):
                setattr(lay, name, getattr(lay, name).to(meta))
            lay.fk, lay.fv = lay.fk.to(dtype), lay.fv.to(dtype)
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    positions = torch.full((batch,), context - 1, device=device, dtype=torch.int32)
    return layers, caches[0].spec, nq, q, positions


def _row(lay: QuantLayer, rows: int) -> QuantLayer:
    return QuantLayer(*(t[:rows] for t in lay.tensors()))


def reference(q, lay, spec, positions, rows: int) -> torch.Tensor:
    """float64 PyTorch reference (dequantize + SDPA) of the first `rows` rows."""
    return quant_attention_reference(
        q[:rows].double(), _row(lay, rows), spec, positions[:rows, None]
    )


def _errors(full, ref, shipped_out) -> tuple[float, float]:
    """(max abs error of call 0's first rows vs the float64 reference, max abs difference
    from the shipped kernel's output over every row)."""
    out = full(0).double()
    err = float((out[: ref.shape[0]] - ref).abs().max())
    diff = float((out - shipped_out.double()).abs().max()) if shipped_out is not None else 0.0
    return err, diff


# ----------------------------------------------------------------------------- timing


def graph_us(fn, launches: int = LAUNCHES, replays: int = REPLAYS) -> float:
    """`graph_timing.graph_us` with this script's defaults."""
    return graph_timing.graph_us(fn, launches, replays)


def eager_flushed_us(fn, repeats: int = 30) -> float:
    """benchmarks/kv_quant.py's timing: CUDA events around one eager call after a 256 MB
    zero_ (L2 flush), median (Python launch latency included where the GPU outruns it)."""
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    events = []
    for _ in range(repeats):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(0)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def same_size_copy_us(nbytes: int, sets: int) -> float:
    """A contiguous copy of nbytes (half read, half written), rotating over `sets` sources."""
    half = nbytes // 2
    src = torch.empty(sets * half, dtype=torch.uint8, device="cuda")
    dst = torch.empty(half, dtype=torch.uint8, device="cuda")
    return graph_us(lambda i: dst.copy_(src[(i % sets) * half : (i % sets + 1) * half]))


# ----------------------------------------------------------------------------- the sweep


def _say(*parts) -> None:
    print(*parts, flush=True)


def _measure(name, layers, spec, q, positions, config, ref, shipped_out, nbytes) -> dict:
    """Errors and graph times (full call; kernel alone) of one variant and configuration;
    `failed` where it does not compile or run."""
    row = {"variant": name, "config": list(config)}
    try:
        full, kernel = _launcher(name, layers, spec, q, positions, config)
        row["splits"] = full.splits
        row["error"], row["diff_vs_shipped"] = _errors(full, ref, shipped_out)
        row["us"] = graph_us(full)
        row["kernel_us"] = graph_us(kernel)
    except Exception as exc:  # a configuration the compiler rejects, out of resources, ...
        row["failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        _say(f"  {name} {config}: {row['failed']}")
        return row
    finally:
        COMPILED.add((name, spec.bits, *config[1:]))
    flag = "" if row["error"] < TOLERANCE else "  <-- ERROR ABOVE TOLERANCE"
    _say(
        f"  {name} {config} [{row['splits']}]: {row['us']:.1f} us (kernel "
        f"{row['kernel_us']:.1f}) {nbytes / row['us'] / 1e3:.0f} GB/s, err {row['error']:.3g}"
        f", vs shipped {row['diff_vs_shipped']:.3g}{flag}"
    )
    return row


def bench(batch: int, bits: int, copy_gbps: float, deadline: float, device="cuda") -> dict:
    cache_mb = batch * KV_HEADS * CONTEXT * (bits * HEAD_DIM / 4 + 5) / 1e6  # ~ per cache
    sets = max(2, min(8, math.ceil(ROTATE_BYTES / 1e6 / cache_mb)))
    layers, spec, nq, q, positions = inputs(batch, bits, CONTEXT, sets, device)
    nbytes = must_read(layers[0], spec, nq, q)
    extra = layers[0].fk.shape[2]
    result = {"batch": batch, "bits": bits, "context": CONTEXT, "sets": sets,
              "quant_bytes": nbytes, "large_copy_GBps": copy_gbps, "configs": []}  # fmt: skip
    result["copy_us"] = same_size_copy_us(nbytes, sets)
    _say(
        f"batch {batch}, {bits}-bit: {nbytes / 1e6:.1f} MB to read ({sets} caches rotated); "
        f"floor at the large copy rate {nbytes / copy_gbps / 1e3:.1f} us, at 70% of 3.0 TB/s "
        f"{nbytes / 0.7 / PEAK * 1e6:.1f} us; same-size copy {result['copy_us']:.1f} us"
    )
    ref = reference(q, layers[0], spec, positions, rows=2)
    shipped = _shipped(layers, spec, q, positions)
    shipped_out = shipped(0).clone()
    slice0 = shipped_slice(spec, batch, extra)
    err, _ = _errors(shipped, ref, None)
    result["shipped"] = row = {
        "variant": "V0 shipped",
        "config": [slice0, 1, 3],
        "splits": shipped_splits(spec, batch, extra),
        "us": graph_us(shipped),
        "eager_flushed_us": eager_flushed_us(shipped),
        "error": err,
        "diff_vs_shipped": 0.0,
    }
    _say(
        f"  V0 shipped [{row['splits']}]: {row['us']:.1f} us "
        f"({nbytes / row['us'] / 1e3:.0f} GB/s; eager + L2 flush as kv_quant.py: "
        f"{row['eager_flushed_us']:.1f} us), err {err:.3g}"
    )
    try:
        dense, dense_bytes = _dense(q, sets=2)
        result["dense"] = {"us": graph_us(dense), "bytes": dense_bytes}
        _say(f"  dense bf16: {result['dense']['us']:.1f} us, "
             f"{dense_bytes / result['dense']['us'] / 1e3:.0f} GB/s on its {dense_bytes / 1e6:.0f}"
             " MB")  # fmt: skip
        del dense
    except Exception as exc:  # noqa: BLE001 (keep the quant numbers)
        _say(f"  dense bf16: {type(exc).__name__}: {exc}"[:300])
    torch.cuda.empty_cache()

    slices = sorted({s for s in SLICES + [slice0] if spec.tile <= s <= nq}, reverse=True)
    best: dict = {}

    def run(name, config) -> None:
        if time.monotonic() > deadline + GRACE_S:
            _say(f"  {name} {config}: skipped (--budget-s + {GRACE_S} s spent)")
            return
        if time.monotonic() > deadline and (name, bits, *config[1:]) not in COMPILED:
            _say(f"  {name} {config}: skipped (--budget-s spent, not compiled yet)")
            return
        row = _measure(name, layers, spec, q, positions, config, ref, shipped_out, nbytes)
        result["configs"].append(row)
        if "us" in row and (name not in best or row["us"] < best[name]["us"]):
            best[name] = row

    for name, builds in BUILDS.items():  # the first build of each, over the slice sizes
        for slice_tokens in slices:
            run(name, (slice_tokens, *builds[0]))
    for name, builds in BUILDS.items():  # the other builds at the variant's best slice
        if name not in best:
            continue
        for build in builds[1:]:
            run(name, (best[name]["config"][0], *build))
    result["best"] = best
    result["table"] = table(result)
    _say(result["table"])
    return result


def table(result: dict) -> str:
    nbytes, copy_gbps = result["quant_bytes"], result["large_copy_GBps"]

    def line(name, row, nb=nbytes) -> str:
        us = row["us"]
        gbps = nb / us / 1e3
        config = "/".join(map(str, row["config"])) if row.get("config") else "-"
        kernel = f"{row['kernel_us']:.1f}" if row.get("kernel_us") else "-"
        err = f"{row['error']:.2g}" if "error" in row else "-"
        diff = f"{row['diff_vs_shipped']:.2g}" if "diff_vs_shipped" in row else "-"
        return (
            f"| {name} | {config} | {row.get('splits', '-')} | {us:.1f} | {kernel} | "
            f"{gbps:.0f} | {100 * gbps * 1e9 / PEAK:.1f}% | {100 * gbps / copy_gbps:.1f}% | "
            f"{err} | {diff} |"
        )

    shipped = result["shipped"]
    lines = [
        f"batch {result['batch']}, {result['bits']}-bit, {result['context']} context: "
        f"{nbytes / 1e6:.1f} MB to read; large copy {copy_gbps:.0f} GB/s; config = slice "
        "tokens/warps/stages; splits = quantized slices x tokens + fp slices x slots",
        "",
        "| variant | best config | splits | us (graph) | kernel-only us | GB/s | % 3.0 TB/s | "
        "% large copy | max err vs ref | max diff vs shipped |",
        "|---|---|---|---|---|---|---|---|---|---|",
        line("copy same bytes (torch)", {"us": result["copy_us"]}),
    ]
    if "dense" in result:
        dense = result["dense"]
        lines.append(line("dense bf16 (own bytes)", {"us": dense["us"]}, dense["bytes"]))
    lines.append(line("V0 shipped", shipped))
    eager = {"us": shipped["eager_flushed_us"], "config": shipped["config"]}
    lines.append(line("V0 shipped, eager + L2 flush", eager))
    lines += [line(name, row) for name, row in result["best"].items()]
    lines += ["", "all configurations (us graph / kernel-only us):", ""]
    for row in result["configs"]:
        config = "/".join(map(str, row["config"]))
        if "us" in row:
            lines.append(f"- {row['variant']} {config} [{row['splits']}]: {row['us']:.1f} / "
                         f"{row['kernel_us']:.1f}, err {row['error']:.2g}")  # fmt: skip
        else:
            lines.append(f"- {row['variant']} {config}: {row['failed'][:120]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- checks


def selftest() -> bool:
    """Every variant (and the shipped kernel) on tiny shapes against the float64 reference,
    2 and 4 bits, fp32 (the exact path) and fp16 (the 16-bit path: offset codes, folded
    scales, minus the PTX); a ragged row (fewer quantized tokens, empty slices)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    cases = [(torch.float32, 1e-4), (torch.float16, 5e-3)]
    for dtype, tol in cases:
        for bits in (2, 4):
            context = 640  # 512 quantized positions (8 or 16 tiles) + the ring
            layers, spec, nq, q, positions = inputs(2, bits, context, 1, device, dtype)
            layers[0].nq[1] = nq // 2  # row 1: half the quantized positions (empty slices)
            ref = reference(q, layers[0], spec, positions, rows=2)
            checks = [("V0 shipped", _shipped(layers, spec, q, positions))]
            for name in ("V0", *VARIANTS):
                for slice_tokens in (2 * spec.tile, 3 * spec.tile, 8 * spec.tile):
                    config = (slice_tokens, 1, 3)
                    full, _ = _launcher(name, layers, spec, q, positions, config)
                    checks.append((f"{name} {config} [{full.splits}]", full))
            for label, full in checks:
                err, _ = _errors(full, ref, None)
                passed = err < tol  # False for NaN
                ok &= passed
                print(f"{'pass' if passed else 'FAIL'} {str(dtype)[6:]:8} {bits}-bit {label}: "
                      f"max err {err:.2e}", flush=True)  # fmt: skip
    return ok


def _loop_stats(sass: str) -> str:
    """Instruction counts of every loop of >= 64 instructions in cuobjdump SASS (a backward
    branch to its target): plain global loads (LDG: each a wait at its first use), cp.async
    copies (LDGSTS), HMMA, barriers (BAR). The quantized tile loop is the first, then the
    full-precision one."""
    import re

    ins = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    addr = [int(a, 16) for a, _ in ins]
    loops = []
    for k, (_, text) in enumerate(ins):
        jump = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if jump and int(jump.group(1), 16) < addr[k] and int(jump.group(1), 16) in addr:
            lo = addr.index(int(jump.group(1), 16))
            if k - lo >= 64:
                loops.append([text for _, text in ins[lo : k + 1]])

    def count(body, op: str) -> int:
        return sum(1 for text in body if re.search(rf"(^|\s){op}(\.|\s|$)", text))

    return (
        "; ".join(
            f"loop {len(body)} instr: LDG {count(body, 'LDG')}, LDGSTS {count(body, 'LDGSTS')}, "
            f"HMMA {count(body, 'HMMA')}, BAR {count(body, 'BAR')}"
            for body in loops
        )
        or "no loop found"
    )


def compile_only() -> None:
    """Build the shipped kernel and every variant for sm_90 (no GPU needed); print
    registers per thread, spill stores, shared memory (ptxas -v) and the main loop's
    instruction mix (cuobjdump SASS)."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    types = {"q_ptr": "*bf16", "kq_ptr": "*u8", "ks_ptr": "*fp16", "kz_ptr": "*fp16",
             "vq_ptr": "*u8", "vs_ptr": "*fp16", "vz_ptr": "*fp16", "sal_ptr": "*i16",
             "fk_ptr": "*bf16", "fv_ptr": "*bf16", "fpos_ptr": "*i32", "nq_ptr": "*i32",
             "pos_ptr": "*i32", "part_ptr": "*fp16", "lse_ptr": "*fp32",
             "qk_scale": "fp32"}  # fmt: skip

    def build(fn, constants, warps, stages) -> str:
        names = fn.arg_names
        sig = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
        aligned = {  # as the launcher specializes them: pointers, sizes % 16 == 0
            (i,): [["tt.divisibility", 16]]
            for i, n in enumerate(names)
            if sig[n].startswith("*") or n in ("slots", "extra")
        }
        kernel = triton.compile(
            ASTSource(fn, sig, constants, aligned),
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(kernel.asm["ptx"])
            args = [bindir / "ptxas", "-v", "--gpu-name=sm_90a", ptx, "-o", Path(tmp) / "k.o"]
            log = subprocess.run(args, capture_output=True, text=True).stderr
            sass = subprocess.run(
                [bindir / "cuobjdump", "-sass", Path(tmp) / "k.o"], capture_output=True, text=True
            ).stdout
        regs = re.search(r"Used (\d+) registers", log)
        spills = re.search(r"(\d+) bytes spill stores", log)
        return (f"{regs.group(1) if regs else '?'} regs, {spills.group(1) if spills else '?'} "
                f"B spilled, {kernel.metadata.shared} B shared; {_loop_stats(sass)}")  # fmt: skip

    for bits in (2, 4):
        for name, builds in BUILDS.items():
            for warps, stages in builds:
                constants = dict(
                    GROUP=QGROUP, GROUP_PAD=8, HEAD_DIM=HEAD_DIM, BITS=bits, KGROUP=KGROUP,
                    VGROUP=min(KGROUP, HEAD_DIM), ASM=True, CDT=tl.float16, INTERPRET=False,
                    STATIC_TILES=0, STATIC_EXTRA=0,
                )  # fmt: skip
                if name == "V0":
                    fn = tq._quant_decode_kernel
                else:
                    fn = _variant_kernel
                    constants.update(zip(("TRIP", "FP_EARLY"), VARIANTS[name], strict=True))
                try:
                    info = build(fn, constants, warps, stages)
                except Exception as exc:
                    info = f"FAILED {type(exc).__name__}: {str(exc)[:500]}"
                print(f"{bits}-bit {name} warps {warps} stages {stages}: {info}", flush=True)


# ----------------------------------------------------------------------------- main


def write(report: dict, out: Path) -> None:
    from fastdecode.bench.report import header_lines

    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_quant_variants.json").write_text(json.dumps(report, indent=1) + "\n")
    head = header_lines("Quantized-KV decode kernel variants", report["meta"])
    (out / "kv_quant_variants.md").write_text(
        "\n".join(head) + f"\ntriton {triton.__version__}; CUDA graphs of {LAUNCHES} calls, "
        f"median of {REPLAYS} replays; caches rotated (>= {ROTATE_BYTES / 1e6:.0f} MB)\n\n"
        + "\n\n".join(case["table"] for case in report["cases"]) + "\n"
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out", type=Path, help="write DIR/kv_quant_variants.json + .md")
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="compile nothing new after this (s)"
    )
    parser.add_argument("--selftest", action="store_true", help="tiny shapes vs reference")
    parser.add_argument("--compile-only", action="store_true", help="sm_90 build, no GPU")
    args = parser.parse_args()
    if args.selftest:
        sys.exit(0 if selftest() else 1)
    if args.compile_only:
        compile_only()
        return
    if not torch.cuda.is_available():
        sys.exit("kv_quant_variants.py: no CUDA device (on CPU: --selftest, --compile-only)")
    deadline = time.monotonic() + args.budget_s
    from fastdecode.bench.report import meta

    report = {
        "meta": meta(
            "python " + " ".join(sys.argv), torch.device("cuda"), {"triton": triton.__version__}
        ),
        "launches_per_graph": LAUNCHES,
        "cases": [],
    }
    copy_gbps = large_copy_gbps()
    _say(f"{torch.cuda.get_device_name()}: 1 GiB copy {copy_gbps:.0f} GB/s (read + write)")
    for batch in args.batches:
        for bits in args.bits:
            try:
                report["cases"].append(bench(batch, bits, copy_gbps, deadline))
            except Exception:  # noqa: BLE001 (keep the other cases)
                traceback.print_exc()
            torch.cuda.empty_cache()
            if args.out:
                write(report, args.out)
    if args.out:
        _say(f"wrote {args.out / 'kv_quant_variants.json'} and .md")


if __name__ == "__main__":
    main()
