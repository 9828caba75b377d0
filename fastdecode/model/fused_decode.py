"""The single-token decode step with the fewest kernels per layer (CUDA + Triton).

Per layer: one QKV matmul; one Triton kernel that applies RoPE, stores K/V and attends
(plus a tiny merge); one compiled block for output projection, MLP, both residuals and the
*next* layer's input RMSNorm (so the residual add and that norm fuse into one kernel).
Same arithmetic as `Transformer.forward`, fewer launches: at 0.1-2B parameters a decode
step is bound by kernel count as much as by bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdecode.kv.cache import KVCache
from fastdecode.model.layers import LayerWeights, attention_output_and_mlp, rms_norm


def _embed_and_norm(tokens: torch.Tensor, embed: torch.Tensor, norm: torch.Tensor, eps: float):
    x = F.embedding(tokens, embed)
    return x, rms_norm(x, norm, eps)


def _finish_layer(
    x: torch.Tensor, attn: torch.Tensor, w: LayerWeights, next_norm: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    x = attention_output_and_mlp(x, attn, w, eps=eps)
    return x, rms_norm(x, next_norm, eps)


def fused_decode_supported(model) -> bool:
    """q/k norms (Qwen3) sit between projection and RoPE, which the kernel does not do."""
    return model.decode_kernel and not model.config.qk_norm


def compiled(fn: Callable, compile: bool) -> Callable:
    """`fn` compiled for fixed decode shapes (one graph, no recompiles), or as is."""
    return torch.compile(fn, fullgraph=True, dynamic=False) if compile else fn


@dataclass
class NewToken:
    """What every layer of one single-token decode step shares (computed once per step)."""

    positions: torch.Tensor  # [B]: the token's position (RoPE)
    lengths: torch.Tensor  # [B]: it sees slots 0..lengths-1 and is stored at lengths - 1
    # (= positions + 1 in a cache whose slot is the position)
    cos: torch.Tensor  # [B, D]: RoPE at `positions`
    sin: torch.Tensor  # [B, D]


class FusedDecodeStep:
    def __init__(self, model, compile: bool) -> None:
        self.model = model
        self.embed_and_norm = compiled(_embed_and_norm, compile)
        self.finish_layer = compiled(_finish_layer, compile)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache):
        """tokens, positions [B] -> logits [B, V] (float32); K/V stored at `positions`."""
        model, cfg = self.model, self.model.config
        eps = cfg.rms_norm_eps
        layers = model.layers
        token = self.new_token(positions, cache)
        x, h = self.embed_and_norm(tokens[:, None], model.embed, layers[0].attn_norm, eps)
        for i, w in enumerate(layers):
            qkv = F.linear(h[:, 0], w.qkv, w.qkv_bias)
            attn = self.attend(i, qkv, cache, token)
            next_norm = layers[i + 1].attn_norm if i + 1 < len(layers) else model.norm
            x, h = self.finish_layer(x, attn, w, next_norm, eps)
        cache.after_decode(positions, token.lengths)
        return F.linear(h[:, 0], model.lm_head).float()

    def new_token(self, positions: torch.Tensor, cache: KVCache) -> NewToken:
        model = self.model
        lengths = cache.decode_lengths(positions)
        return NewToken(positions, lengths, model.cos[positions], model.sin[positions])

    def attend(self, layer: int, qkv: torch.Tensor, cache: KVCache, token: NewToken):
        """Store the new token's k, v of `layer` (from its QKV projection [B, (Hq + 2 Hkv) * D])
        and attend over slots 0..position: [B, Hq, 1, D]. One kernel (and its merge)."""
        from fastdecode.kv.triton_decode import fused_decode_attention

        return fused_decode_attention(
            qkv, cache.k[layer], cache.v[layer], token.lengths, token.cos, token.sin,
            self.model.config.num_heads,
        )  # fmt: skip
