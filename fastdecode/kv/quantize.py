"""Low-bit KV quantization primitives (KIVI: "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache").

Asymmetric min/max quantization: x ~ code * scale + zero, code in [0, 2**bits). Keys are
quantized *per channel* over groups of `group` consecutive tokens (key outliers live in
fixed channels, so a channel shares one range); values *per token*, over groups of
`vgroup` channels (value errors average out across tokens in the attention sum).

Codes are packed along head_dim into uint8: channel d of a token lives in byte d // per
(per = 8 // bits) at bit offset (d % per) * bits. The Triton kernel unpacks the same way.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4)
MIN_SCALE = 1e-5  # a constant group (max == min) gets codes 0 and dequantizes exactly


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (each < 2**bits) -> packed uint8 [..., D * bits / 8]."""
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, device=codes.device, dtype=torch.uint8)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack`: packed uint8 [..., D * bits / 8] -> codes uint8 [..., D]."""
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.flatten(-2)


def _codes(x, low, scale, bits) -> torch.Tensor:
    """Round with the *stored* (possibly fp16) scale/zero, so dequantization matches."""
    q = ((x.float() - low.float()) / scale.float()).round_().clamp_(0, 2**bits - 1)
    return q.to(torch.uint8)


def _range(low: torch.Tensor, high: torch.Tensor, bits: int, meta_dtype: torch.dtype):
    scale = ((high - low) / (2**bits - 1)).clamp_(min=MIN_SCALE).to(meta_dtype)
    return scale, low.to(meta_dtype)


def quantize_keys(
    k: torch.Tensor,
    bits: int,
    group: int,
    meta_dtype: torch.dtype,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel over token groups: k [B, H, N, D] (N % group == 0) -> packed codes
    [B, H, N, D*bits/8], scale and zero [B, H, N/group, D]. `exclude` [B, H, N] (bool):
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
    return pack(codes.view(batch, heads, length, dim), bits), scale, zero


def quantize_values(
    v: torch.Tensor, bits: int, vgroup: int, meta_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token over channel groups: v [B, H, N, D] -> packed codes [B, H, N, D*bits/8],
    scale and zero [B, H, N, D/vgroup]."""
    *lead, dim = v.shape
    x = v.float().view(*lead, dim // vgroup, vgroup)
    scale, zero = _range(x.amin(-1), x.amax(-1), bits, meta_dtype)
    codes = _codes(x, zero[..., None], scale[..., None], bits)
    return pack(codes.view(*lead, dim), bits), scale, zero


def dequantize_keys(packed, scale, zero, bits: int, group: int) -> torch.Tensor:
    """Packed keys [B, H, N, D*bits/8] + per-group scale/zero -> float32 [B, H, N, D]."""
    codes = unpack(packed, bits).float()
    scale = scale.float().repeat_interleave(group, dim=2)
    return codes * scale + zero.float().repeat_interleave(group, dim=2)


def dequantize_values(packed, scale, zero, bits: int, vgroup: int) -> torch.Tensor:
    """Packed values [B, H, N, D*bits/8] + per-token scale/zero -> float32 [B, H, N, D]."""
    codes = unpack(packed, bits).float()
    scale = scale.float().repeat_interleave(vgroup, dim=-1)
    return codes * scale + zero.float().repeat_interleave(vgroup, dim=-1)
