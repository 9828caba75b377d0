"""Low-bit KV quantization primitives (KIVI: "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache").

Asymmetric min/max quantization: x ~ code * scale + zero, code in [0, 2**bits). Keys are
quantized *per channel* over groups of `group` consecutive tokens (key outliers live in
fixed channels, so a channel shares one range); values *per token*, over groups of
`vgroup` channels (value errors average out across tokens in the attention sum).

Codes are packed *token-planar*: tokens come in tiles of `tile_tokens(bits)` =
PLANE * (8 // bits) tokens, and byte (row r, channel d) of tile t holds the codes of
tokens t*tile + i*PLANE + r, i = 0 .. 8//bits - 1, at bits [i*bits, (i+1)*bits) ("bit
plane" i). So a tile is one contiguous block of PLANE * D bytes, and each of its bit
planes is a [PLANE, D] matrix of 16 consecutive tokens' codes, got with one mask over
the whole block: no per-element gathers, no reshapes, and every plane is directly one
tl.dot operand (keys: q @ plane^T, values: p @ plane) in the Triton decode kernel
(fastdecode.kv.triton_quant). Keys store a tile as [PLANE, D] (a token's channels are
consecutive: the K dimension of q @ K^T), values as [D, PLANE] (`channel_major`: a
channel's tokens are consecutive, the K dimension of p @ V), so either operand's 4
consecutive K-elements are one 32-bit word. Packing along tokens (not channels) also
keeps every channel addressable as its own column, which value groups narrower than
head_dim need.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4)
MIN_SCALE = 1e-5  # a constant group (max == min) gets codes 0 and dequantizes exactly
PLANE = 16  # tokens per bit plane: the smallest tl.dot tile


def tile_tokens(bits: int) -> int:
    """Tokens per packed tile: one [PLANE, D] block of bytes, 8 // bits planes."""
    return PLANE * (8 // bits)


def pack(codes: torch.Tensor, bits: int, channel_major: bool = False) -> torch.Tensor:
    """uint8 codes [..., N, D] (each < 2**bits) -> packed uint8 [..., tiles, PLANE, D]
    (token-planar, see the module docstring; a partial last tile is zero-padded), or
    [..., tiles, D, PLANE] with `channel_major` (values: a tile is then the transposed
    [PLANE, D] operand the kernel's p @ V wants, 4 tokens' codes per 32-bit word)."""
    per, tile = 8 // bits, tile_tokens(bits)
    *lead, length, dim = codes.shape
    if length % tile:
        pad = codes.new_zeros(*lead, tile - length % tile, dim)
        codes = torch.cat([codes, pad], dim=-2)
    planes = codes.reshape(*lead, -1, per, PLANE, dim)  # [..., tiles, plane, row, D]
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    packed = (planes << shifts[:, None, None]).sum(-3, dtype=torch.uint8)
    return packed.transpose(-1, -2).contiguous() if channel_major else packed


def unpack(packed: torch.Tensor, bits: int, channel_major: bool = False) -> torch.Tensor:
    """Inverse of `pack`: [..., tiles, PLANE, D] (or [..., tiles, D, PLANE]) -> codes uint8
    [..., tiles * tile, D] (padding included)."""
    if channel_major:
        packed = packed.transpose(-1, -2)
    *lead, tiles, rows, dim = packed.shape
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = (packed[..., None, :, :] >> shifts[:, None, None]) & (2**bits - 1)
    return codes.reshape(*lead, -1, dim)  # [..., tiles, plane, row, D] flattened


def _codes(x, low, scale, bits) -> torch.Tensor:
    """Round with the *stored* (possibly fp16) scale/zero, so dequantization matches."""
    q = ((x.float() - low.float()) / scale.float()).round_().clamp_(0, 2**bits - 1)
    return q.to(torch.uint8)


def _range(low: torch.Tensor, high: torch.Tensor, bits: int, meta_dtype: torch.dtype):
    # Divide by a tensor, not a Python number: CUDA PyTorch turns division by a scalar into
    # multiplication by its reciprocal (1 ulp off IEEE division now and then), and the
    # Triton flush (fastdecode.kv.triton_quant) divides exactly, as the CPU does.
    levels = torch.full_like(high, 2**bits - 1)
    scale = ((high - low) / levels).clamp_(min=MIN_SCALE).to(meta_dtype)
    return scale, low.to(meta_dtype)


def key_codes(
    k: torch.Tensor,
    bits: int,
    group: int,
    meta_dtype: torch.dtype,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel over token groups: k [B, H, N, D] (N % group == 0) -> unpacked codes
    uint8 [B, H, N, D], scale and zero [B, H, N/group, D]. `exclude` [B, H, N] (bool):
    tokens kept elsewhere at higher precision (ZipCache's salient tokens) do not widen
    their group's range."""
    batch, heads, length, dim = k.shape
    x = k.float().view(batch, heads, length // group, group, dim)
    lo_src, hi_src = x, x
    if exclude is not None:
        skip = exclude.view(batch, heads, length // group, group, 1)
        lo_src = x.masked_fill(skip, float("inf"))
        hi_src = x.masked_fill(skip, float("-inf"))
    low, high = lo_src.amin(3), hi_src.amax(3)
    empty = torch.isinf(low)  # every token of the group excluded
    low, high = low.masked_fill(empty, 0.0), high.masked_fill(empty, 0.0)
    scale, zero = _range(low, high, bits, meta_dtype)
    codes = _codes(x, zero[:, :, :, None], scale[:, :, :, None], bits)
    return codes.view(batch, heads, length, dim), scale, zero


def value_codes(
    v: torch.Tensor, bits: int, vgroup: int, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over channel groups: v [B, H, N, D] -> unpacked codes uint8 [B, H, N, D],
    scale and zero [B, H, N, D/vgroup]."""
    *lead, dim = v.shape
    x = v.float().view(*lead, dim // vgroup, vgroup)
    scale, zero = _range(x.amin(-1), x.amax(-1), bits, meta_dtype)
    codes = _codes(x, zero[..., None], scale[..., None], bits)
    return codes.view(*lead, dim), scale, zero


def quantize_keys(k, bits: int, group: int, meta_dtype, exclude=None):
    """`key_codes`, packed: (packed [B, H, tiles, PLANE, D], scale, zero)."""
    codes, scale, zero = key_codes(k, bits, group, meta_dtype, exclude)
    return pack(codes, bits), scale, zero


def quantize_values(v, bits: int, vgroup: int, meta_dtype):
    """`value_codes`, packed channel-major: (packed [B, H, tiles, D, PLANE], scale, zero)."""
    codes, scale, zero = value_codes(v, bits, vgroup, meta_dtype)
    return pack(codes, bits, channel_major=True), scale, zero


def dequantize_keys(packed, scale, zero, bits: int, group: int) -> torch.Tensor:
    """Packed keys + per-group scale/zero [B, H, N/group, D] -> float32 [B, H, N, D]."""
    length = scale.shape[2] * group
    codes = unpack(packed, bits)[:, :, :length].float()
    scale = scale.float().repeat_interleave(group, dim=2)
    return codes * scale + zero.float().repeat_interleave(group, dim=2)


def dequantize_values(packed, scale, zero, bits: int, vgroup: int) -> torch.Tensor:
    """Packed values + per-token scale/zero [B, H, N, D/vgroup] -> float32 [B, H, N, D]."""
    codes = unpack(packed, bits, channel_major=True)[:, :, : scale.shape[2]].float()
    scale = scale.float().repeat_interleave(vgroup, dim=-1)
    return codes * scale + zero.float().repeat_interleave(vgroup, dim=-1)
