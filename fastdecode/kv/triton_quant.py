"""Decode attention in Triton over the quantized KV cache (fastdecode.kv.quant): one query
token per row, GQA-aware, split-K. KIVI's point is that a step reads `bits`-bit codes
instead of 16-bit K/V; this kernel is written so that reading them is the whole cost.

Why the first version reached ~10% of HBM bandwidth: it was issue-bound, not memory-bound.
Compiled for sm_90 its loop spent ~125 warp instructions per token (70% of 3 TB/s at 2
bits, ~40 bytes per token and KV head, allows ~18 at most): codes unpacked per element
through a 3-D broadcast + reshape (shared-memory shuffles), int -> fp32 conversions (I2F
runs at 1/8 rate), keys' and values' scale and zero applied to every element in fp32 and
rounded to bf16 for the dot, salient flags gathered per token, GQA groups padded to 16
rows (group 7: half the softmax work on padding), 64-token blocks.

This version (~10 warp instructions per token at 2 bits, ~13 at 4, counted in the sm_90
SASS of the loop; the token-planar layout is in fastdecode.kv.quantize):

- A tile of 8 // bits * 16 tokens is one contiguous [16, D] block of bytes per K and V,
  and its bit plane i is 16 consecutive tokens' codes, read in place by a mask (never
  shifted) as fp16 with the 0x6400 trick: 0x64 << 8 | (byte & mask) is the fp16 number
  1024 + code * 2**(bits*i). On the GPU that is inline PTX over 4 bytes at a time (2 PRMT,
  then one AND per 2 codes per plane): no int -> float conversion. The factor 2**(bits*i)
  is a power of two folded into the score (keys) or into p (values); the 1024 offset is
  removed on the idle tensor cores (a product with a constant tile), never per code.
- Keys (per-channel scale s and zero z over a group of tokens): q.k = (q*s).code + q.z, so
  q*s is formed once per group as the fp16 operand and q.z (q split in two fp16 halves for
  ~22-bit accuracy) is a tensor-core product with a broadcast zero tile.
- Values (per-token scale and zero): p.v = (p*s).code + p.z: p*s is the dot operand and
  p.z an elementwise sum; both reductions over tokens are left to the end of the slice.
- Everything is computed transposed, tokens x heads: the GQA group is the N side of each
  mma (8 for groups of <= 8 heads, no padding to 16 rows), codes are the A operand
  straight from the loaded bytes, and p*s reaches the second product through ldmatrix.
- The softmax runs once per tile (max over its planes). Salient positions (ZipCache: read
  from the full-precision buffer instead) are one 16-bit word of flags per plane.
- Split-K over tiles, sized from the SM count so that batch 1 still fills the GPU, with
  one-warp programs (every reduction stays inside a warp); each program reads only tiles
  below its row's nq (a device-side loop bound), so ragged rows cost what they hold. The
  last splits read the full-precision buffer (salient set + recent ring, visible when
  0 <= fpos <= position). Slices merge by log-sum-exp (base 2).

`flush_quantized` is the cache's other per-step cost in one launch: the ring write and, when
due, a group's quantization and packing (the PyTorch path is ~110 small kernels per layer).

nq and positions live on the device and every shape is fixed per cache, so a launch needs
no host sync (CUDA-graph safe). Under TRITON_INTERPRET=1 (CPU tests) the same code runs,
with the PTX replaced by the equivalent masks and the tile loop bounded statically; fp32
inputs skip the fp16 tricks (offset 0, VSCALE 1), so that path is exact.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastdecode.kv.quant import QuantLayer, QuantSpec
from fastdecode.kv.quantize import PLANE
from fastdecode.kv.triton_decode import streaming_multiprocessors

LOG2E = 1.4426950408889634
FBLOCK = 32  # full-precision slots per block
MERGE_CHUNK = 16  # slices the merge reads at a time
PROGRAMS_PER_SM = 6  # one-warp programs: ~5 resident per SM keep enough loads in flight
MIN_SPLIT_BYTES = 16384  # shorter slices cost more in partial outputs than they save
# Quantized slices of at most this many tokens: each program waits on a chain of small
# loads per tile (salient flags, value scales / zeros), so more, shorter programs overlap
# more of them. Timed in CUDA graphs at 32K (`kv_quant_variants.md`, H100): batch 32
# 2-bit 115.6 -> 82.7 us, 4-bit 124.9 -> 97.4 us against ~5 programs per SM (3072-token
# slices); 256 and 1024 tokens were slower than 512.
MAX_SLICE_TOKENS = 512
# constants the kernels read (Triton globals must be constexpr)
_PLANE = tl.constexpr(PLANE)
_FBLOCK = tl.constexpr(FBLOCK)
_MAGIC = tl.constexpr(1024.0)  # fp16 0x6400: a code in the low mantissa bits reads 1024 + code
_VSCALE = tl.constexpr(64.0)  # p * scale enters the fp16 dot times this (clear of subnormals;
# fp16 overflows only for a value scale > 1023, i.e. a token whose values span > 3000)


def planes_ptx(bits: int) -> str:
    """PTX for `tl.inline_asm_elementwise(pack=4)`: input $N holds 4 packed bytes b0..b3
    (element k in byte k); output plane i is registers $2i ($2i+1): the fp16 pairs for
    (b0, b1) ((b2, b3)), element k in the low half first. prmt builds 0x64|b1|0x64|b0 and
    0x64|b3|0x64|b2 (fp16 1024 + byte, twice); an AND keeps plane i's bits of each half."""
    per = 8 // bits
    lines = ["{", ".reg .b32 lo, hi;"]
    lines.append(f"prmt.b32 lo, ${2 * per}, 0x64, 0x4140;")
    lines.append(f"prmt.b32 hi, ${2 * per}, 0x64, 0x4342;")
    for i in range(per):
        half = 0xFF00 | ((1 << bits) - 1) << (bits * i)
        lines.append(f"and.b32 ${2 * i}, lo, 0x{half:04X}{half:04X};")
        lines.append(f"and.b32 ${2 * i + 1}, hi, 0x{half:04X}{half:04X};")
    lines.append("}")
    return "\n".join(lines)


_PTX2 = tl.constexpr(planes_ptx(2))
_PTX4 = tl.constexpr(planes_ptx(4))


@triton.jit
def _planes(packed, BITS: tl.constexpr, ASM: tl.constexpr, CDT: tl.constexpr):
    """The 8 // BITS bit planes of packed bytes (any shape): a tuple of CDT tensors, plane
    i = MAGIC + code * 2**(BITS*i), or code * 2**(BITS*i) when CDT is fp32."""
    f16 = tl.float16
    if ASM:
        if BITS == 2:
            out = tl.inline_asm_elementwise(
                _PTX2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [packed],
                dtype=(f16, f16, f16, f16), is_pure=True, pack=4,
            )  # fmt: skip
        else:
            out = tl.inline_asm_elementwise(
                _PTX4, "=r,=r,=r,=r,r", [packed], dtype=(f16, f16), is_pure=True, pack=4
            )
    else:
        offset: tl.constexpr = 0.0 if CDT == tl.float32 else _MAGIC
        out = ()
        for i in tl.static_range(8 // BITS):
            mask = ((1 << BITS) - 1) << (BITS * i)
            out = out + (((packed & mask).to(tl.float32) + offset).to(CDT),)
    return out


@triton.jit
def _tile(
    t, q16, q_lo, m, total, acc, zsum,
    kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base, nq,
    HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BITS: tl.constexpr,
    KGROUP: tl.constexpr, VGROUP: tl.constexpr, ASM: tl.constexpr, CDT: tl.constexpr,
):  # fmt: skip
    """Fold quantized tile t (8 // BITS planes of PLANE tokens) into the running softmax
    state of the query group, kept transposed (tokens x heads: the GQA group is the small
    N side of every product, so a group of <= 8 heads pads to 8, not to 16 rows).

    q16, q_lo [D, G]: the scaled query (q = q16 + q_lo). State (base 2): max m [G];
    per-token sums of p `total` [PLANE, G] and, per value group j, of p*zero (and of the
    codes' offset) zsum[j] [PLANE, G], both reduced at the end; acc[j] [VGROUP, G] of
    codes^T @ (p*scale*VSCALE)."""
    PER: tl.constexpr = 8 // BITS
    TILE: tl.constexpr = PER * _PLANE
    NV: tl.constexpr = HEAD_DIM // VGROUP
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
            meta = (first + i * _PLANE) // KGROUP * HEAD_DIM
            q_scaled = q16 * tl.load(ks_base + meta + d).to(CDT)[:, None]  # [D, G]
            # q.zero and the codes' MAGIC offset as [PLANE, G] tiles (all rows equal):
            # products on the idle tensor cores instead of reductions over D
            zero = tl.load(kz_base + meta + 0 * r[:, None] + d[None, :]).to(CDT)  # [PLANE, D]
            base = tl.dot(zero, q16, out_dtype=tl.float32)
            if CDT != tl.float32:
                base = tl.dot(zero, q_lo, base, out_dtype=tl.float32)
                ones = tl.full([_PLANE, HEAD_DIM], 1.0, CDT)
                lift = offset * tl.dot(ones, q_scaled, out_dtype=tl.float32)
        scale_i = 1 << (BITS * i)  # plane i reads code * scale_i (+ offset)
        if CDT != tl.float32:
            init = base * scale_i - lift
        else:
            init = base * scale_i
        raw = tl.dot(kplanes[i], q_scaled, init, out_dtype=tl.float32)  # [PLANE, G]
        s = raw * (1.0 / scale_i) if i > 0 else raw
        flags = tl.load(sal_base + t * PER + i).to(tl.int32)  # bit r: salient (kept in fp)
        live = (((flags >> r) & 1) == 0) & (first + i * _PLANE < nq)
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
    # [PLANE, PLANE] constant: unlift @ pv puts -MAGIC * sum(pv) / VSCALE, spread over the
    # PLANE rows that zsum sums at the end (powers of two: exact)
    unlift = tl.full([_PLANE, _PLANE], -offset / (vscale * _PLANE), CDT)
    new_acc = ()
    new_zsum = ()
    for j in tl.static_range(NV):
        vbytes = tl.load(vq_base + tile_bytes + (j * VGROUP + c)[:, None] * _PLANE + r[None, :])
        vplanes = _planes(vbytes, BITS, ASM, CDT)  # PER x [VGROUP, PLANE]
        a = acc[j] * alpha[None, :]
        z = zsum[j] * alpha[None, :]
        meta_ptr = (first + r) * NV + j
        for i in tl.static_range(PER):
            weight = vscale / (1 << (BITS * i))
            v_scale = tl.load(vs_base + meta_ptr + i * _PLANE * NV).to(tl.float32) * weight
            v_zero = tl.load(vz_base + meta_ptr + i * _PLANE * NV).to(tl.float32)
            pv = probs[i].to(CDT) * v_scale.to(CDT)[:, None]  # [PLANE, G]
            a = tl.dot(vplanes[i], pv, a, out_dtype=tl.float32)
            z += probs[i] * v_zero[:, None]
            if CDT != tl.float32:  # the codes' offset: -MAGIC * sum(pv), on the tensor cores
                z = tl.dot(unlift, pv, z, out_dtype=tl.float32)
        new_acc = new_acc + (a,)
        new_zsum = new_zsum + (z,)
    return top, total, new_acc, new_zsum


@triton.jit
def _quant_decode_kernel(
    q_ptr, kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr, sal_ptr,
    fk_ptr, fv_ptr, fpos_ptr, nq_ptr, pos_ptr, part_ptr, lse_ptr,
    num_kv_heads, slots, extra, q_splits, num_splits, tiles_per_split, extra_split, qk_scale,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr, KGROUP: tl.constexpr, VGROUP: tl.constexpr,
    ASM: tl.constexpr, CDT: tl.constexpr,
    INTERPRET: tl.constexpr, STATIC_TILES: tl.constexpr, STATIC_EXTRA: tl.constexpr,
):  # fmt: skip
    """Program (split, row * Hkv + KV head): splits < q_splits fold tiles_per_split tiles
    of quantized positions each, the others extra_split slots of the full-precision buffer;
    each writes its normalized partial output (transposed) and base-2 log-sum-exp. Split
    sizes are runtime values (one compile per model shape, not per batch size); under the
    interpreter, loops run to STATIC_* (it cannot loop to a runtime bound)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // num_kv_heads
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    heads = bh * GROUP + g  # == b * Hq + kv_head * GROUP + g
    head_mask = g[None, :] < GROUP
    part_col = (heads * num_splits + split)[None, :] * HEAD_DIM  # partial rows, transposed
    # the query group, transposed [D, G], times the softmax scale and log2(e) (base 2)
    q = tl.load(q_ptr + heads[None, :] * HEAD_DIM + d[:, None], mask=head_mask, other=0.0)
    q = q.to(tl.float32) * qk_scale
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    if split < q_splits:  # a run of quantized tiles
        PER: tl.constexpr = 8 // BITS
        TILE: tl.constexpr = PER * _PLANE
        NV: tl.constexpr = HEAD_DIM // VGROUP
        base = bh.to(tl.int64)
        kq_base = kq_ptr + base * (slots // PER) * HEAD_DIM  # bytes per (row, head)
        vq_base = vq_ptr + base * (slots // PER) * HEAD_DIM
        ks_base = ks_ptr + base * (slots // KGROUP) * HEAD_DIM
        kz_base = kz_ptr + base * (slots // KGROUP) * HEAD_DIM
        vs_base = vs_ptr + base * slots * NV
        vz_base = vz_ptr + base * slots * NV
        sal_base = sal_ptr + base * (slots // _PLANE)
        nq = tl.load(nq_ptr + b)
        begin = split * tiles_per_split
        end = tl.minimum(begin + tiles_per_split, tl.cdiv(nq, TILE))
        q16 = q.to(CDT)
        q_lo = (q - q16.to(tl.float32)).to(CDT)  # q = q16 + q_lo to ~22 bits (for q.zero)
        total2 = tl.zeros([_PLANE, GROUP_PAD], tl.float32)
        acc = ()
        zsum = ()
        for _ in tl.static_range(NV):
            acc = acc + (tl.zeros([VGROUP, GROUP_PAD], tl.float32),)
            zsum = zsum + (tl.zeros([_PLANE, GROUP_PAD], tl.float32),)
        if INTERPRET:
            for i in range(0, STATIC_TILES):
                if begin + i < end:
                    m, total2, acc, zsum = _tile(
                        begin + i, q16, q_lo, m, total2, acc, zsum,
                        kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base, nq,
                        HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
                    )  # fmt: skip
        else:
            for t in range(begin, end):
                m, total2, acc, zsum = _tile(
                    t, q16, q_lo, m, total2, acc, zsum,
                    kq_base, ks_base, kz_base, vq_base, vs_base, vz_base, sal_base, nq,
                    HEAD_DIM, GROUP_PAD, BITS, KGROUP, VGROUP, ASM, CDT,
                )  # fmt: skip
        vscale: tl.constexpr = 1.0 if CDT == tl.float32 else _VSCALE
        total = tl.sum(total2, 0)
        seen = total > 0  # an empty slice weighs nothing in the merge
        inv = 1.0 / tl.where(seen, total, 1.0)
        c = tl.arange(0, VGROUP)
        for j in tl.static_range(NV):
            out = acc[j] * (1.0 / vscale) + tl.sum(zsum[j], 0)[None, :]  # [VGROUP, G]
            dest = part_ptr + part_col + j * VGROUP + c[:, None]
            tl.store(dest, (out * inv[None, :]).to(part_ptr.dtype.element_ty), mask=head_mask)
    else:  # a slice of the full-precision buffer (salient tokens + recent ring)
        fdt: tl.constexpr = tl.float32 if INTERPRET else fk_ptr.dtype.element_ty  # (no bf16 dot)
        position = tl.load(pos_ptr + b)
        total = tl.zeros([GROUP_PAD], tl.float32)
        facc = tl.zeros([HEAD_DIM, GROUP_PAD], tl.float32)
        qf = q.to(fdt)
        start = (split - q_splits) * extra_split
        fbase = bh.to(tl.int64) * extra
        for i in range(0, STATIC_EXTRA if INTERPRET else extra_split, _FBLOCK):
            n = start + i + tl.arange(0, _FBLOCK)
            tag = tl.load(fpos_ptr + fbase + n, mask=n < extra, other=-1)
            valid = (tag >= 0) & (tag <= position)
            offs = (fbase + n)[:, None] * HEAD_DIM + d[None, :]
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


@triton.jit
def _merge_kernel(
    part_ptr, lse_ptr, out_ptr, num_splits, chunks,
    CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, STATIC_CHUNKS: tl.constexpr,
):  # fmt: skip
    """out[row] = the partial outputs of its slices weighted by 2**lse (base-2 log-sum-exp),
    CHUNK slices at a time (`chunks` of them; STATIC_CHUNKS under the interpreter)."""
    row = tl.program_id(0)  # (batch, query head)
    s = tl.arange(0, CHUNK)
    d = tl.arange(0, HEAD_DIM)
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for i in range(0, STATIC_CHUNKS if STATIC_CHUNKS > 0 else chunks):
        idx = i * CHUNK + s
        lse = tl.load(lse_ptr + row * num_splits + idx, mask=idx < num_splits, other=float("-inf"))
        top = tl.maximum(m, tl.max(lse, 0))
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        w = tl.exp2(lse - top_safe)
        alpha = tl.exp2(m - top_safe)
        parts = tl.load(
            part_ptr + (row * num_splits + idx)[:, None] * HEAD_DIM + d[None, :],
            mask=(w[:, None] > 0), other=0.0,
        )  # fmt: skip
        acc = acc * alpha + tl.sum(parts.to(tl.float32) * w[:, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = top
    tl.store(out_ptr + row * HEAD_DIM + d, (acc / total).to(out_ptr.dtype.element_ty))


@triton.jit
def _round_even(x):
    """Round half to even, as torch.round (fp32 addition of 1.5 * 2**23 rounds so)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _pack_store(codes, base, first, TOKEN_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                BITS: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    """OR one group's codes [GROUP, D] (tokens first..first+GROUP-1, int32) into the packed
    tiles at `base`, keeping the other planes' bits (quantize.pack's layout: a tile is
    [PLANE, D] bytes when TOKEN_ROWS (keys), [D, PLANE] otherwise (values))."""
    PER: tl.constexpr = 8 // BITS
    TILE: tl.constexpr = PER * _PLANE
    NT: tl.constexpr = GROUP // TILE if GROUP >= TILE else 1  # tiles the group touches
    PP: tl.constexpr = PER if GROUP >= TILE else GROUP // _PLANE  # its planes per tile
    r = tl.arange(0, _PLANE)
    d = tl.arange(0, HEAD_DIM)
    plane0 = (first % TILE) // _PLANE  # 0 unless GROUP < TILE
    shifts = BITS * (plane0 + tl.arange(0, PP))
    planes = tl.reshape(codes, (NT, PP, _PLANE, HEAD_DIM)) << shifts[None, :, None, None]
    bits = tl.sum(planes, 1)  # [NT, PLANE, D]: disjoint bit fields, so sum == or
    keep = ~tl.sum(((1 << BITS) - 1) << shifts, 0)  # the other planes' bits
    tiles = first // TILE + tl.arange(0, NT)
    if TOKEN_ROWS:
        inner = r[None, :, None] * HEAD_DIM + d[None, None, :]
    else:
        inner = d[None, None, :] * _PLANE + r[None, :, None]
    ptrs = base + tiles[:, None, None] * (_PLANE * HEAD_DIM) + inner
    old = tl.load(ptrs).to(tl.int32)
    tl.store(ptrs, ((old & keep) | bits).to(tl.uint8))


@triton.jit
def _flush_kernel(
    fk_ptr, fv_ptr, fpos_ptr, nq_ptr, end_ptr, nq_out_ptr,
    kq_ptr, ks_ptr, kz_ptr, vq_ptr, vs_ptr, vz_ptr,
    k_ptr, v_ptr, stride_kb, stride_kh, stride_vb, stride_vh,
    num_kv_heads, slots, extra, salient, ring, residual,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr,
    NEW_TOKEN: tl.constexpr,
):  # fmt: skip
    """QuantKVCache._flush in one launch per layer: for each (row, KV head) whose ring holds
    a group of G tokens with R newer ones, quantize it (keys per channel, values per token
    and VGROUP channels), pack it into its tiles' planes, write the scales and zeros, free
    its ring slots; nq_out[b] = the row's new nq. Same arithmetic as fastdecode.kv.quantize
    (round half to even, IEEE division), so the codes are identical. With NEW_TOKEN, then
    store a decode step's k, v [B, H, 1, D] in the ring at position end - 1 (_write_ring)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    bh = b * num_kv_heads + h
    nq = tl.load(nq_ptr + b)
    end = tl.load(end_ptr + b)
    target = tl.maximum(end - residual, 0) // GROUP * GROUP
    do = nq + GROUP <= target
    if h == 0:
        tl.store(nq_out_ptr + b, tl.where(do, nq + GROUP, nq))
    if do:
        NV: tl.constexpr = HEAD_DIM // VGROUP
        LEVELS: tl.constexpr = (1 << BITS) - 1
        meta_ty = ks_ptr.dtype.element_ty
        g = tl.arange(0, GROUP)
        d = tl.arange(0, HEAD_DIM)
        slot = salient + (nq + g) % ring
        rows = (bh.to(tl.int64) * extra + slot)[:, None] * HEAD_DIM + d[None, :]
        k = tl.load(fk_ptr + rows).to(tl.float32)  # [G, D]
        v = tl.load(fv_ptr + rows).to(tl.float32)
        # keys: per channel over the group's tokens
        low = tl.min(k, 0)
        step = tl.maximum(tl.math.div_rn(tl.max(k, 0) - low, LEVELS), 1e-5).to(meta_ty)
        zero = low.to(meta_ty)
        # IEEE division (div_rn; `/` is approximate on the GPU), as PyTorch divides
        codes = tl.math.div_rn(k - zero.to(tl.float32)[None, :], step.to(tl.float32)[None, :])
        codes = tl.minimum(tl.maximum(_round_even(codes), 0.0), LEVELS).to(tl.int32)
        meta = (bh.to(tl.int64) * (slots // GROUP) + nq // GROUP) * HEAD_DIM + d
        tl.store(ks_ptr + meta, step)
        tl.store(kz_ptr + meta, zero)
        PER: tl.constexpr = 8 // BITS
        packed = bh.to(tl.int64) * (slots // PER) * HEAD_DIM  # packed bytes per (row, head)
        _pack_store(codes, kq_ptr + packed, nq, True, HEAD_DIM, BITS, GROUP)
        # values: per token over groups of VGROUP channels
        v3 = tl.reshape(v, (GROUP, NV, VGROUP))
        vlow = tl.min(v3, 2)
        vstep = tl.maximum(tl.math.div_rn(tl.max(v3, 2) - vlow, LEVELS), 1e-5).to(meta_ty)
        vzero = vlow.to(meta_ty)
        vcodes = tl.math.div_rn(
            v3 - vzero.to(tl.float32)[:, :, None], vstep.to(tl.float32)[:, :, None]
        )
        vcodes = tl.minimum(tl.maximum(_round_even(vcodes), 0.0), LEVELS).to(tl.int32)
        j = tl.arange(0, NV)
        vmeta = (bh.to(tl.int64) * slots + nq + g)[:, None] * NV + j[None, :]
        tl.store(vs_ptr + vmeta, vstep)
        tl.store(vz_ptr + vmeta, vzero)
        vcodes = tl.reshape(vcodes, (GROUP, HEAD_DIM))
        _pack_store(vcodes, vq_ptr + packed, nq, False, HEAD_DIM, BITS, GROUP)
        tl.store(fpos_ptr + bh.to(tl.int64) * extra + slot, tl.full([GROUP], -1, tl.int32))
    if NEW_TOKEN:  # the new token's ring slot may be one just flushed: after every read
        tl.debug_barrier()
        d = tl.arange(0, HEAD_DIM)
        position = end - 1
        slot = salient + position % ring
        dest = (bh.to(tl.int64) * extra + slot) * HEAD_DIM + d
        k_new = tl.load(k_ptr + b * stride_kb + h * stride_kh + d)
        v_new = tl.load(v_ptr + b * stride_vb + h * stride_vh + d)
        tl.store(fk_ptr + dest, k_new.to(fk_ptr.dtype.element_ty))
        tl.store(fv_ptr + dest, v_new.to(fv_ptr.dtype.element_ty))
        tl.store(fpos_ptr + bh.to(tl.int64) * extra + slot, position)


def flush_quantized(
    lay: QuantLayer,
    spec: QuantSpec,
    end: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> None:
    """One launch for QuantKVCache._flush (end [B]: each row's length after this step) and,
    given a decode step's k, v [B, H, 1, D] (at positions end - 1), its _write_ring. Rows
    with nothing to flush write nothing (no trash block): CUDA-graph safe, no host sync."""
    batch, num_kv_heads, extra, head_dim = lay.fk.shape
    nq_out = torch.empty_like(lay.nq)
    new_token = k is not None
    if new_token:
        k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
    else:
        k = v = lay.fk  # unused
    _flush_kernel[(batch, num_kv_heads)](
        lay.fk, lay.fv, lay.fpos, lay.nq, end.to(torch.int32), nq_out,
        lay.kq, lay.ks, lay.kz, lay.vq, lay.vs, lay.vz,
        k, v, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads, spec.slots, extra, spec.salient, spec.ring, spec.residual,
        GROUP=spec.group, HEAD_DIM=head_dim, BITS=spec.bits, VGROUP=spec.vgroup,
        NEW_TOKEN=new_token, num_warps=4,
    )  # fmt: skip
    lay.nq.copy_(nq_out)


sm_count = streaming_multiprocessors  # the quant kernels' launch shape depends on it


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_shape(
    spec: QuantSpec, batch: int, num_kv_heads: int, extra: int, head_dim: int, sms: int
) -> tuple[int, int, int, int]:
    """(tiles per quantized split, quantized splits, slots per fp split, fp splits) per
    (row, KV head): slices of about equal bytes, enough one-warp programs to keep `sms` SMs
    PROGRAMS_PER_SM deep, but none under MIN_SPLIT_BYTES (each slice costs a partial output
    of GROUP x D, written and read again by the merge) unless that leaves SMs idle, and no
    quantized slice over MAX_SLICE_TOKENS."""
    tile_bytes = bytes_per_token(spec, head_dim) * spec.tile
    slot_bytes = 2 * head_dim * 2  # a full-precision K + V slot (16-bit)
    tiles = spec.slots // spec.tile
    total = (tiles * tile_bytes + extra * slot_bytes) * batch * num_kv_heads
    floor = min(MIN_SPLIT_BYTES, total / sms)  # small steps: one program per SM at least
    target = max(floor, total / (sms * PROGRAMS_PER_SM))
    # capped, and the full-precision slices with it (they hold about as many bytes)
    target = min(target, max(1, MAX_SLICE_TOKENS // spec.tile) * tile_bytes)
    per_split = max(1, min(tiles, round(target / tile_bytes)))
    blocks = max(1, min(-(-extra // FBLOCK), round(target / slot_bytes / FBLOCK)))
    extra_split = blocks * FBLOCK
    return per_split, -(-tiles // per_split), extra_split, -(-extra // extra_split)


def quant_decode_attention(
    q: torch.Tensor,
    lay: QuantLayer,
    spec: QuantSpec,
    positions: torch.Tensor,
    sms: int | None = None,
) -> torch.Tensor:
    """q [B, Hq, 1, D] at positions [B] over one layer's quantized storage -> [B, Hq, 1, D].

    The query's own token must already be stored (it is always visible, so no row is empty).
    `sms` overrides the SM count the split is sized for (tests: many slices on the CPU).
    """
    q = q.contiguous()
    batch, num_heads, _, head_dim = q.shape
    num_kv_heads, extra = lay.fk.shape[1], lay.fk.shape[2]
    group = num_heads // num_kv_heads
    interpret = _interpreting()
    if sms is None:
        on_gpu = q.device.type == "cuda" and not interpret
        sms = sm_count(q.device.index if q.device.index is not None else 0) if on_gpu else 1
    per_split, q_splits, extra_split, f_splits = launch_shape(
        spec, batch, num_kv_heads, extra, head_dim, sms
    )
    num_splits = q_splits + f_splits
    rows = batch * num_heads * num_splits
    # partial outputs: fp16 for 16-bit models (half the merge traffic), exact for fp32
    part_dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
    partial = torch.empty(rows, head_dim, device=q.device, dtype=part_dtype)
    lse = torch.empty(rows, device=q.device, dtype=torch.float32)
    cdt = tl.float32 if q.dtype == torch.float32 else tl.float16
    _quant_decode_kernel[(num_splits, batch * num_kv_heads)](
        q, lay.kq, lay.ks, lay.kz, lay.vq, lay.vs, lay.vz, lay.sal.view(torch.int16),
        lay.fk, lay.fv, lay.fpos, lay.nq, positions, partial, lse,
        num_kv_heads, spec.slots, extra, q_splits, num_splits, per_split, extra_split,
        head_dim**-0.5 * LOG2E,
        GROUP=group, GROUP_PAD=max(8, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BITS=spec.bits, KGROUP=spec.group, VGROUP=spec.vgroup,
        ASM=not interpret and cdt == tl.float16, CDT=cdt, INTERPRET=interpret,
        STATIC_TILES=per_split if interpret else 0,
        STATIC_EXTRA=extra_split if interpret else 0,
        num_warps=1,
    )  # fmt: skip
    out = torch.empty(batch, num_heads, 1, head_dim, device=q.device, dtype=q.dtype)
    chunks = triton.cdiv(num_splits, MERGE_CHUNK)
    _merge_kernel[(batch * num_heads,)](
        partial, lse, out, num_splits, chunks,
        CHUNK=MERGE_CHUNK, HEAD_DIM=head_dim, STATIC_CHUNKS=chunks if interpret else 0,
    )  # fmt: skip
    return out


def bytes_per_token(spec: QuantSpec, head_dim: int, meta_bytes: int = 2) -> float:
    """Bytes the kernel reads per quantized token and KV head: K and V codes, values'
    scale + zero (per token), keys' scale + zero (per channel, shared by `group` tokens),
    the salient flag bit."""
    codes = 2 * head_dim * spec.bits / 8
    value_meta = 2 * (head_dim // spec.vgroup) * meta_bytes
    key_meta = 2 * head_dim * meta_bytes / spec.group
    return codes + value_meta + key_meta + 1 / 8


__all__ = [
    "bytes_per_token",
    "flush_quantized",
    "launch_shape",
    "quant_decode_attention",
    "sm_count",
]
