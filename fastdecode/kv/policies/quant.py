"""`quant`: KIVI-style 2/4-bit KV cache with ZipCache's salient-token mixed precision.

A LOSSY mode: every position is kept, but (outside a recent full-precision window and a
small salient set) at `bits` bits, so attention reads approximate keys and values.

- KIVI ("KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache"): keys quantized
  per channel over groups of `group` tokens, values per token (over groups of
  min(group, head_dim) channels), and the most recent `residual` tokens (up to
  residual + group - 1) stay in full precision until a whole group can be quantized.
- ZipCache ("ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
  Identification"): at prefill, each prompt token is scored by its *normalized* attention,
  the attention it received from an observation window of the last `window` prompt
  queries divided by how many of those queries could see it (a causal mask gives early
  tokens more queries; normalizing removes that bias, the paper's point). The top
  `salient` fraction of the prompt per (row, KV head) is kept in full precision (the
  paper's highest-precision tier: we keep it unquantized rather than 4/8-bit, so the
  kernel reads it with the residual window) and is excluded from its key group's range.
  Tokens generated later are not re-scored: they go to `bits` when they leave the window.

Storage and speed: codes are packed token-planar (fastdecode.kv.quantize) and read by a
Triton kernel that folds the scales into q and p (fastdecode.kv.triton_quant); groups of
>= 64 tokens (the default) cost the kernel one scale fold per 64-token tile or less.

Budget: unused. Quantization keeps every position; the memory is set by `bits`, `group`,
`residual` and `salient` (see `QuantKVCache.nbytes`). The budget is still validated by the
shared code (a fraction <= 1 or at most the context), so leave it at its default of 1.0.
"""

from __future__ import annotations

import math

import torch

from fastdecode.kv.policies.base import KVPolicy
from fastdecode.kv.policies.snapkv import window_attention
from fastdecode.kv.quantize import SUPPORTED_BITS

MIN_GROUP = 16  # a bit plane of the packed codes (16 tokens) must lie in one key group


class QuantPolicy(KVPolicy):
    name = "quant"
    storage = "quant"  # QuantKVCache: every position kept, packed low-bit

    def __init__(
        self,
        budget: int,
        bits: int = 2,
        group: int = 64,
        residual: int = 128,
        salient: float = 0.02,
        window: int = 32,
    ) -> None:
        super().__init__(budget)
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"quant bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        if not isinstance(group, int) or group < MIN_GROUP or group & (group - 1):
            raise ValueError(
                f"quant group must be a power of two >= {MIN_GROUP} tokens, got {group!r}"
            )
        if not isinstance(residual, int) or residual < 1:
            raise ValueError(
                f"quant residual (full-precision recent window) must be >= 1 token, got "
                f"{residual!r}"
            )
        if not 0 <= salient < 1:
            raise ValueError(f"quant salient fraction must be in [0, 1), got {salient!r}")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"quant observation window must be >= 1 query, got {window!r}")
        self.bits, self.group, self.residual = bits, group, residual
        self.salient, self.window = salient, window

    def new_cache(self, model, batch: int, prompt_len: int, max_new: int):
        """A QuantKVCache for `model`'s shape (ModelRunner calls this for storage "quant")."""
        from fastdecode.kv.quant import QuantKVCache

        cfg = model.config
        return QuantKVCache(
            self, cfg.num_layers, batch, cfg.num_kv_heads, prompt_len + max_new, prompt_len,
            cfg.head_dim, model.dtype, model.device,
        )  # fmt: skip

    def salient_count(self, prompt_len: int) -> int:
        """Full-precision salient slots per (row, KV head): fixed per cache (static shapes)."""
        return min(math.ceil(self.salient * prompt_len), prompt_len)

    def salient_scores(
        self, q: torch.Tensor, k: torch.Tensor, prompt_lengths: torch.Tensor
    ) -> torch.Tensor:
        """ZipCache's normalized attention [B, Hkv, T] of the prompt keys: attention summed
        over the window's queries (of each KV head's query group) / queries that see it."""
        window = min(self.window, k.shape[2])
        votes = window_attention(q, k, prompt_lengths, window)
        group = q.shape[1] // k.shape[1]
        ends = prompt_lengths.view(-1, 1)
        query_pos = (ends - window + torch.arange(window, device=q.device)).clamp(min=0)
        key_pos = torch.arange(k.shape[2], device=q.device)
        seen_by = (query_pos[:, :, None] >= key_pos[None, None, :]).sum(1) * group  # [B, T]
        return votes / seen_by.clamp(min=1)[:, None, :]
