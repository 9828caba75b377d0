"""QuantKVCache: packed 2/4-bit KV storage with a full-precision recent window and a
full-precision salient set (KIVI + ZipCache; see fastdecode.kv.policies.quant). LOSSY.

Layout per layer, for each (row, KV head); every tensor is contiguous:

- quantized region, indexed by position (slot n holds position n). Codes are packed
  token-planar (fastdecode.kv.quantize: a tile of 8/bits * 16 tokens is one [16, D] block
  of bytes, one bit plane per 16 tokens), so a flush writes the L = max(G, tile) token
  block that holds its group, keeping the other planes' bits. `slots` = C rounded up to
  L, + L: the last block is a trash block that the writes of rows with nothing to flush
  land in, so a flush is one static-shape scatter with no host sync.
  kq uint8 [B, H, slots/tile, 16, D], vq [B, H, slots/tile, D, 16] (a tile's bytes:
  token rows for keys, channel rows for values); keys' scale/zero [B, H, slots/G, D] (per
  channel, per group of G tokens); values' scale/zero [B, H, slots, D/Gv] (per token);
  sal uint8 [B, H, slots/8]: bit n set = position n is salient (read from `fk` instead).
  Row b has quantized positions [0, nq[b]), nq a multiple of G.
- full-precision buffer fk/fv [B, H, F, D] with the position each slot holds, fpos
  [B, H, F] int32 (-1 empty): slots [0, S) the salient prompt tokens (chosen at prefill),
  slots [S, S + W) a ring of the recent tokens, position p at S + p % W, W = R + G.

A row's tokens move from the ring to the quantized region one whole group at a time, once
R tokens newer than the group exist, so the ring holds R..R+G-1 tokens. Every step first
flushes (at most ceil(T/G) groups, always from tokens written by earlier steps), then
writes its T <= R new tokens to the ring, then attends. Visibility is by position (a slot
is seen by queries at positions >= its own), so rolled-back draft tokens are ignored until
overwritten; flushed tokens are older than any draft as long as T <= R.

On CUDA a decode step's flush and ring write are one Triton launch per layer
(fastdecode.kv.triton_quant.flush_quantized: same arithmetic, identical codes; rows with
nothing to flush write nothing), instead of the ~110 small PyTorch kernels of `_flush` and
`_write_ring` that a CUDA graph would replay every step.

Single-token decode steps use the Triton kernel on CUDA (fastdecode.kv.triton_quant:
reads the packed bit planes as tensor-core operands, scales folded into q and p); prefill
is exact causal attention over the prompt; other steps (and CPU) use
`quant_attention_reference`, which dequantizes and runs SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from fastdecode.kv.attention import decode_kernel_available, prompt_attention
from fastdecode.kv.policies.quant import QuantPolicy
from fastdecode.kv.quantize import (
    PLANE,
    dequantize_keys,
    dequantize_values,
    key_codes,
    pack,
    quantize_keys,
    quantize_values,
    tile_tokens,
    value_codes,
)
from fastdecode.kv.step import StepContext


@dataclass
class QuantLayer:
    """One layer's storage (see the module docstring for shapes)."""

    kq: torch.Tensor
    ks: torch.Tensor
    kz: torch.Tensor
    vq: torch.Tensor
    vs: torch.Tensor
    vz: torch.Tensor
    sal: torch.Tensor
    fk: torch.Tensor
    fv: torch.Tensor
    fpos: torch.Tensor
    nq: torch.Tensor  # [B] int32: quantized positions per row

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(frozen=True)
class QuantSpec:
    """Static sizes shared by every layer of a cache (and by the kernel launch)."""

    bits: int
    group: int  # G: tokens per key scale group
    vgroup: int  # Gv: channels per value scale group
    residual: int  # R
    salient: int  # S: salient slots per (row, KV head)
    ring: int  # W = R + G
    slots: int  # quantized slots incl. the trash block
    tile: int  # tokens per packed tile (8 / bits planes of 16 tokens)
    block: int  # L = max(G, tile): the token block a flush rewrites (whole bytes)


class QuantKVCache:
    graph_safe = True  # flushes write whole groups on the device (a trash group): no sync
    dense_reads = False  # the fused dense decode kernel cannot read packed codes

    def __init__(
        self,
        policy: QuantPolicy,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        context: int,
        prompt_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        group = policy.group
        vgroup = min(group, head_dim)
        if head_dim % vgroup:
            raise ValueError(f"quant KV: head_dim {head_dim} is not a multiple of {vgroup}")
        tile = tile_tokens(policy.bits)
        block = max(group, tile)
        capacity = -(-context // block) * block
        self.spec = QuantSpec(
            bits=policy.bits,
            group=group,
            vgroup=vgroup,
            residual=policy.residual,
            salient=policy.salient_count(prompt_len),
            ring=policy.residual + group,
            slots=capacity + block,
            tile=tile,
            block=block,
        )
        self.policy = policy
        self.batch, self.capacity, self.num_layers = batch, context, num_layers
        self.dtype = dtype
        meta = torch.float16 if dtype.itemsize == 2 else dtype  # scales: fp16 for 16-bit models
        s, base = self.spec, (batch, num_kv_heads)
        tiles = s.slots // s.tile
        extra = s.salient + s.ring

        def layer() -> QuantLayer:
            kw = dict(device=device)
            return QuantLayer(
                kq=torch.zeros(*base, tiles, PLANE, head_dim, dtype=torch.uint8, **kw),
                ks=torch.ones(*base, s.slots // group, head_dim, dtype=meta, **kw),
                kz=torch.zeros(*base, s.slots // group, head_dim, dtype=meta, **kw),
                vq=torch.zeros(*base, tiles, head_dim, PLANE, dtype=torch.uint8, **kw),
                vs=torch.ones(*base, s.slots, head_dim // vgroup, dtype=meta, **kw),
                vz=torch.zeros(*base, s.slots, head_dim // vgroup, dtype=meta, **kw),
                sal=torch.zeros(*base, s.slots // 8, dtype=torch.uint8, **kw),
                fk=torch.zeros(*base, extra, head_dim, dtype=dtype, **kw),
                fv=torch.zeros(*base, extra, head_dim, dtype=dtype, **kw),
                fpos=torch.full((*base, extra), -1, dtype=torch.int32, **kw),
                nq=torch.zeros(batch, dtype=torch.int32, **kw),
            )

        self.layers = [layer() for _ in range(num_layers)]
        # flushes: on CUDA the Triton kernel, one launch per layer (the PyTorch version is
        # ~100 small kernels per layer and step); both write bit-identical codes
        # (tests/test_kv_quant.py::test_triton_flush_matches_pytorch, on the GPU too).
        self.triton_flush = decode_kernel_available(torch.device(device))

    def nbytes(self) -> int:
        """The true footprint: packed codes, scales, salient bits, the full-precision
        buffer and its positions."""
        return sum(t.numel() * t.element_size() for lay in self.layers for t in lay.tensors())

    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        lay = self.layers[layer]
        if step.prefill:
            self._prefill(lay, q, k, v, step.prompt_lengths)
            return prompt_attention(q, k, v)
        if step.mask is not None:
            raise NotImplementedError(
                "the quant KV cache supports causal steps only (no tree-masked verification)"
            )
        if k.shape[2] > self.spec.residual:
            raise ValueError(
                f"quant KV: a step of {k.shape[2]} tokens exceeds the residual window "
                f"({self.spec.residual}); raise `residual`"
            )
        positions = step.positions.to(torch.int32)
        if self.triton_flush and k.shape[2] == 1:  # decode: flush + ring write, one launch
            from fastdecode.kv.triton_quant import flush_quantized

            flush_quantized(lay, self.spec, positions[:, 0] + 1, k, v)
        else:
            for _ in range(-(-k.shape[2] // self.spec.group)):
                self._flush(lay, positions[:, -1] + 1)
            self._write_ring(lay, k, v, positions)
        if q.shape[2] == 1 and decode_kernel_available(q.device):
            if _kernel_fits(self.spec, q.shape[-1]):
                from fastdecode.kv.triton_quant import quant_decode_attention

                return quant_decode_attention(q, lay, self.spec, positions[:, 0])
        return quant_attention_reference(q, lay, self.spec, positions)

    def move(self, batch_index, src, dst) -> None:
        raise NotImplementedError("the quant KV cache cannot compact tree paths (move)")

    # -- prefill: quantize the prompt, keep the recent window and the salient set in fp --
    def _prefill(self, lay: QuantLayer, q, k, v, prompt_lengths: torch.Tensor) -> None:
        s = self.spec
        batch, heads, length, _ = k.shape
        lengths = prompt_lengths.to(torch.int32)
        lay.nq.copy_((lengths - s.residual).clamp(min=0) // s.group * s.group)
        lay.fpos.fill_(-1)
        lay.sal.zero_()
        salient = torch.zeros(batch, heads, length, dtype=torch.bool, device=k.device)
        count = min(s.salient, length)
        if count:
            scores = self.policy.salient_scores(q, k, prompt_lengths).float()
            key_pos = torch.arange(length, device=k.device)
            candidate = (key_pos[None, :] < lay.nq[:, None])[:, None, :].expand_as(scores)
            scores = scores.masked_fill(~candidate, float("-inf"))
            chosen = scores.topk(count, dim=-1).indices  # [B, H, count]
            picked = candidate.gather(-1, chosen)
            gather = chosen[..., None].expand(-1, -1, -1, k.shape[-1])
            lay.fk[:, :, :count] = k.gather(2, gather)
            lay.fv[:, :, :count] = v.gather(2, gather)
            lay.fpos[:, :, :count] = torch.where(picked, chosen, -1).to(torch.int32)
            salient.scatter_(-1, chosen, picked)
            bits = F.pad(salient, (0, s.slots - length)).view(batch, heads, -1, 8)
            weights = 2 ** torch.arange(8, device=k.device, dtype=torch.uint8)
            lay.sal.copy_((bits.to(torch.uint8) * weights).sum(-1, dtype=torch.uint8))
        full = length // s.group * s.group  # whole groups; rows see only [0, nq)
        if full:
            kq, ks, kz = quantize_keys(
                k[:, :, :full], s.bits, s.group, lay.ks.dtype, salient[:, :, :full]
            )
            vq, vs, vz = quantize_values(v[:, :, :full], s.bits, s.vgroup, lay.vs.dtype)
            lay.kq[:, :, : kq.shape[2]], lay.vq[:, :, : vq.shape[2]] = kq, vq  # whole tiles
            lay.ks[:, :, : full // s.group], lay.kz[:, :, : full // s.group] = ks, kz
            lay.vs[:, :, :full], lay.vz[:, :, :full] = vs, vz
        # the ring: each row's last W prompt positions that are not quantized
        pos = lengths[:, None] - s.ring + torch.arange(s.ring, device=k.device)  # [B, W]
        keep = (pos >= lay.nq[:, None]) & (pos >= 0)  # W consecutive positions: distinct slots
        src = pos.clamp(min=0).long()
        self._ring_put(lay, k.gather(2, _index(src, k)), v.gather(2, _index(src, v)), pos, keep)

    # -- decode / multi-token steps --
    def _flush(self, lay: QuantLayer, end: torch.Tensor) -> None:
        """Quantize each row's oldest ring group once R newer tokens exist (end = the row's
        length after this step); rows with nothing to flush write the trash block."""
        if self.triton_flush:
            from fastdecode.kv.triton_quant import flush_quantized

            return flush_quantized(lay, self.spec, end)
        s = self.spec
        target = (end - s.residual).clamp(min=0) // s.group * s.group
        do = lay.nq + s.group <= target  # [B]
        pos = lay.nq[:, None] + torch.arange(s.group, device=end.device)  # [B, G]
        ring_slot = (s.salient + pos % s.ring).long()
        k = lay.fk.gather(2, _index(ring_slot, lay.fk))
        v = lay.fv.gather(2, _index(ring_slot, lay.fv))
        kc, ks, kz = key_codes(k, s.bits, s.group, lay.ks.dtype)
        vc, vs, vz = value_codes(v, s.bits, s.vgroup, lay.vs.dtype)
        first = torch.where(do, lay.nq, s.slots - s.block)  # [B]: the trash block if not
        rows = torch.arange(end.shape[0], device=end.device)
        self._put_codes(lay.kq, rows, first, kc, channel_major=False)
        self._put_codes(lay.vq, rows, first, vc, channel_major=True)
        dest = (first[:, None] + torch.arange(s.group, device=end.device)).long()  # [B, G]
        _put_tokens(lay.vs, rows, dest, vs)
        _put_tokens(lay.vz, rows, dest, vz)
        group_dest = dest[:, :1] // s.group
        _put_tokens(lay.ks, rows, group_dest, ks)
        _put_tokens(lay.kz, rows, group_dest, kz)
        old = lay.fpos.gather(2, ring_slot[:, None].expand(-1, lay.fpos.shape[1], -1))
        cleared = torch.where(do[:, None, None], -1, old)
        lay.fpos.scatter_(2, ring_slot[:, None].expand_as(cleared), cleared)
        lay.nq.add_(do.to(torch.int32) * s.group)

    def _put_codes(self, buf: torch.Tensor, rows, first, codes: torch.Tensor, channel_major):
        """Write one group's codes [B, H, G, D] at tokens first[b] + [0, G) of the packed
        buf [B, H, tiles, *tile bytes*]: repack the L-token block that holds them, keeping
        the bits of the block's other tokens (when G < tile, a group fills some planes)."""
        s = self.spec
        batch, heads, group, dim = codes.shape
        base = first // s.block * s.block
        count = s.block // s.tile
        tiles = (base[:, None] // s.tile + torch.arange(count, device=first.device)).long()
        flat = buf.view(batch, heads, buf.shape[2], -1)  # [B, H, tiles, PLANE * D]
        if group == s.block:  # the group is whole tiles: overwrite
            new = pack(codes, s.bits, channel_major)
        else:
            at = ((first - base)[:, None] + torch.arange(group, device=first.device)).long()
            block = codes.new_zeros(batch, heads, s.block, dim)
            block.scatter_(2, _index(at, block), codes)
            ones = codes.new_zeros(batch, 1, s.block, 1)
            ones.scatter_(2, at[:, None, :, None], 2**s.bits - 1)
            old = flat.gather(2, _index(tiles, flat)).view(batch, heads, count, *buf.shape[3:])
            new = (old & ~pack(ones, s.bits, channel_major)) | pack(block, s.bits, channel_major)
        _put_tokens(flat, rows, tiles, new.reshape(batch, heads, count, -1))

    def _write_ring(self, lay: QuantLayer, k, v, positions: torch.Tensor) -> None:
        self._ring_put(lay, k, v, positions, torch.ones_like(positions, dtype=torch.bool))

    def _ring_put(self, lay: QuantLayer, k, v, pos: torch.Tensor, keep: torch.Tensor) -> None:
        """Store k, v [B, H, N, D] of positions pos [B, N] in the ring (keep False: -1)."""
        s = self.spec
        slot = (s.salient + pos % s.ring).long()  # remainder: >= 0 for negative pos too
        lay.fk.scatter_(2, _index(slot, lay.fk), k.to(lay.fk.dtype))
        lay.fv.scatter_(2, _index(slot, lay.fv), v.to(lay.fv.dtype))
        tags = torch.where(keep, pos, -1).to(torch.int32)[:, None].expand(-1, k.shape[1], -1)
        lay.fpos.scatter_(2, slot[:, None].expand_as(tags), tags)


def _kernel_fits(spec: QuantSpec, head_dim: int) -> bool:
    """Shapes the Triton kernels handle: a power-of-two head_dim >= 16 (tl.arange and
    tl.dot tiles; vgroup >= 16 follows from group >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def _index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, N] slot indices -> a gather/scatter index for `like` [B, H, *, D] along dim 2."""
    return idx[:, None, :, None].expand(-1, like.shape[1], -1, like.shape[3])


def _put_tokens(buf: torch.Tensor, rows: torch.Tensor, dest: torch.Tensor, x: torch.Tensor):
    """buf[b, :, dest[b, j]] = x[b, :, j] (in place, static shapes)."""
    buf.permute(0, 2, 1, 3).index_put_((rows[:, None], dest), x.permute(0, 2, 1, 3))


def quant_visibility(lay: QuantLayer, positions: torch.Tensor) -> torch.Tensor:
    """bool [B, H, T, slots + F]: what a query at positions [B, T] sees, quantized slots
    first (position n < nq, not salient) then the full-precision buffer (0 <= fpos <= p)."""
    slots = lay.sal.shape[-1] * 8
    n = torch.arange(slots, device=positions.device)
    salient = (lay.sal[..., None] >> torch.arange(8, device=n.device, dtype=torch.uint8)) & 1
    salient = salient.flatten(-2).bool()  # [B, H, slots]
    quant = (n[None, :] < lay.nq[:, None])[:, None, None, :] & ~salient[:, :, None, :]
    quant = quant & (n[None, None, None, :] <= positions[:, None, :, None])
    fpos = lay.fpos[:, :, None, :]
    full = (fpos >= 0) & (fpos <= positions[:, None, :, None])
    return torch.cat([quant, full], dim=-1)


def quant_attention_reference(
    q: torch.Tensor, lay: QuantLayer, spec: QuantSpec, positions: torch.Tensor
) -> torch.Tensor:
    """q [B, Hq, T, D] at positions [B, T] over one layer's quantized storage: dequantize
    everything, then masked SDPA with each KV head's query group folded into the query
    axis (as kv/attention.py does; K/V are never repeated per query head)."""
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads = lay.fk.shape[1]
    group = num_heads // num_kv_heads
    k = dequantize_keys(lay.kq, lay.ks, lay.kz, spec.bits, spec.group)
    v = dequantize_values(lay.vq, lay.vs, lay.vz, spec.bits, spec.vgroup)
    k = torch.cat([k.to(q.dtype), lay.fk.to(q.dtype)], dim=2)
    v = torch.cat([v.to(q.dtype), lay.fv.to(q.dtype)], dim=2)
    mask = quant_visibility(lay, positions)  # [B, Hkv, T, N]
    mask = mask[:, :, None].expand(-1, -1, group, -1, -1).flatten(2, 3)
    q = q.reshape(batch, num_kv_heads, group * length, head_dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.reshape(batch, num_heads, length, head_dim)
