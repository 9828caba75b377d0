"""What one forward pass tells the KV cache about where its new tokens go and what they see."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdecode.kv.tree_mask import TreeMask


@dataclass
class StepContext:
    """positions [B, T]: RoPE positions of the new tokens. slots [B, T]: where a dense cache
    stores them. mask: folded [B, 1, G*T, S] visibility for a dense cache (None with
    `lengths`, the single-token decode kernel's [B] valid-slot counts). prefill: the rows
    start empty and T is the whole (right-padded) prompt: a budgeted cache compresses it here.
    tree (instead of mask): prefix + tree visibility of a verify step, for caches that read
    densely on CUDA (`tree_reads`)."""

    positions: torch.Tensor
    slots: torch.Tensor
    batch_index: torch.Tensor
    mask: torch.Tensor | None
    lengths: torch.Tensor | None = None
    prefill: bool = False
    prompt_lengths: torch.Tensor | None = None  # [B] real tokens per right-padded prefill row
    tree: TreeMask | None = None  # a verify step's visibility, kept compact (tree kernel)
