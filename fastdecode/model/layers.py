"""The decoder layer as one pure function of tensors.

Being a plain function of (activations, weights, cache) lets the engine hand the same
compiled kernel to every layer (one torch.compile, not one per layer) and capture the whole
step in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastdecode.kv.step import StepContext
from fastdecode.model.rope import apply_rope


class LayerWeights(NamedTuple):
    attn_norm: torch.Tensor
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]: q, k, v projections fused
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate and up fused
    down: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32, as the HF reference does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def split_heads(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection qkv [B, T, (Hq + 2 Hkv) * D] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]."""
    batch, length, _ = qkv.shape
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
    q = q.view(batch, length, num_heads, head_dim).transpose(1, 2)
    k = k.view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    return q, k, v


def attention_input(
    x: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Norm, fused QKV projection, (q/k norm), RoPE: x [B, T, hidden] -> q, k, v [B, H, T, D]."""
    h = rms_norm(x, w.attn_norm, eps)
    qkv = F.linear(h, w.qkv, w.qkv_bias)
    q, k, v = split_heads(qkv, num_heads, num_kv_heads, head_dim)
    if w.q_norm is not None:
        q = rms_norm(q, w.q_norm, eps)
        k = rms_norm(k, w.k_norm, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention_output_and_mlp(
    x: torch.Tensor, attn: torch.Tensor, w: LayerWeights, *, eps: float
) -> torch.Tensor:
    """Output projection + residual, then the SwiGLU MLP + residual. attn is [B, H, T, D]."""
    batch, num_heads, length, head_dim = attn.shape
    x = x + F.linear(attn.transpose(1, 2).reshape(batch, length, num_heads * head_dim), w.o)
    h = rms_norm(x, w.mlp_norm, eps)
    gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, w.down)


class LayerFunctions(NamedTuple):
    """The two dense halves of a layer; the engine may swap in compiled versions."""

    attention_input: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    attention_output_and_mlp: Callable[..., torch.Tensor]


def decoder_layer(
    fns: LayerFunctions,
    x: torch.Tensor,
    w: LayerWeights,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache,
    layer: int,
    step: StepContext,
) -> torch.Tensor:
    """One pre-norm block: x [B, T, hidden] -> x [B, T, hidden].

    Storing K/V and attending stay outside the dense halves and belong to the cache
    (`store_and_attend`): that is the part a KV policy or a custom kernel replaces.
    """
    q, k, v = fns.attention_input(x, w, cos, sin)
    attn = cache.store_and_attend(layer, q, k, v, step)
    return fns.attention_output_and_mlp(x, attn, w)
