"""The KVPolicy interface: a policy only scores positions; storage and attention are the
cache's (fastdecode.kv.sparse), so a policy never needs its own attention loop.

Unlike simulating eviction with masks (kvpress's fault), the cache a policy drives really
holds fewer entries: each layer is allocated at the policy's capacity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastdecode.kv.selective import SelectiveKVCache
    from fastdecode.kv.sparse import SparseKVCache


class KVPolicy:
    """Defaults: keep the most recent positions; evict the oldest first."""

    name = "base"
    needs_attention = False  # True: `observe` receives each decode step's attention weights
    # "evict": the cache keeps only `capacity` entries (SparseKVCache); "select": the cache
    # keeps everything and each decode step reads a subset (SelectiveKVCache, ReadPolicy)
    storage = "evict"
    # True: decode steps never evict (the cache has room for every generated token), so new
    # tokens append after the kept prompt slots and a decode step is dense attention over
    # slots 0..filled: the fused dense decode kernel serves it (SnapKV).
    appends_in_decode = False

    def __init__(self, budget: int) -> None:
        if budget < 1:
            raise ValueError(f"a KV budget must keep at least one position, got {budget}")
        self.budget = budget

    def capacity(self, layer: int, prompt_len: int, max_new: int) -> int:
        """Slots per (row, KV head) that layer `layer` is allocated."""
        return self.budget

    def prompt_keep(self, layer: int, capacity: int) -> int:
        """How many prompt positions prefill keeps (the rest of `capacity` stays free for
        generated tokens). Default: fill the layer; new tokens then evict."""
        return capacity

    def prefill_scores(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, prompt_lengths: torch.Tensor
    ) -> torch.Tensor:
        """Importance of each prompt position [B, Hkv, T] (higher is kept) given the
        prompt's queries q [B, Hq, T, D] and keys k [B, Hkv, T, D]."""
        positions = torch.arange(k.shape[2], device=k.device, dtype=torch.float32)
        return positions.expand(k.shape[0], k.shape[1], -1).clone()

    def on_prefill(self, layer: int, cache: SparseKVCache, prompt_lengths: torch.Tensor) -> None:
        """Called after `prefill_scores`, before layer `layer` keeps its prompt positions: a
        policy that sizes layers from the prompt may `cache.resize` any layer here (CAKE)."""

    def protected(self, pos: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        """bool [B, Hkv, N]: positions `pos` never dropped while `newest` [B] is the latest
        (sinks, an observation or recent window)."""
        return torch.zeros_like(pos, dtype=torch.bool)

    def eviction_scores(self, layer: int, cache: SparseKVCache) -> torch.Tensor:
        """[B, Hkv, C] for a full layer: the lowest unprotected score is overwritten."""
        return cache.pos[layer].float()

    def observe(self, layer: int, cache: SparseKVCache, weights: torch.Tensor) -> None:
        """weights [B, Hkv, C]: attention each slot received this step (needs_attention)."""


class ReadPolicy(KVPolicy):
    """A sparse *retrieval* policy: every position stays stored (a dense-capacity
    SelectiveKVCache), and each single-token decode step of a layer reads only the slots
    `select` names, at most `read_size` per (row, KV head). Prefill and multi-token steps
    read everything. A policy only scores; the cache stores and attends."""

    storage = "select"
    # The fused selective decode step (fastdecode.model.fused_selective: one QKV matmul and
    # one RoPE + store + attention kernel per layer) may serve this policy. Its contract:
    # `on_store` of a decode token runs before that token's k/v reach the cache (the kernel
    # stores them; `on_store` gets them as its argument), and `select` / `on_store` get the
    # new token's q / k only where `decode_reads_qk` says so. False: the per-layer unfused
    # path (`SelectiveKVCache.store_and_attend`) serves every decode step.
    fused_decode = True
    # True: `select` returns the same slots for every sparse layer of a step (they depend on
    # the visible slots only), so the fused step calls it once per step, not once per layer.
    shared_selection = False

    def setup(self, cache: SelectiveKVCache) -> None:
        """Allocate per-cache state (in `cache.state`, so it lives and dies with the cache)."""

    def read_size(self, capacity: int) -> int:
        """K, the slots a sparse layer reads per (row, KV head): fixed per cache, so the
        decode step keeps static shapes (CUDA-graph friendly)."""
        return min(self.budget, capacity)

    def on_store(self, layer: int, cache: SelectiveKVCache, k: torch.Tensor, step) -> None:
        """Called after new keys k [B, Hkv, T, D] are written at `step.slots`."""

    def on_move(self, layer: int, cache: SelectiveKVCache, batch_index, src, dst) -> None:
        """Called after `cache.move` copied slots src -> dst of rows batch_index."""

    def select(
        self, layer: int, cache: SelectiveKVCache, q: torch.Tensor, visible: torch.Tensor
    ) -> torch.Tensor | None:
        """Slots [B, Hkv, K] that layer `layer` reads for the decode queries q [B, Hq, 1, D]
        (-1: padding, not read), given the visible slots [B, S] (bool). None: full attention."""
        return None

    def decode_reads_qk(self, layer: int, cache: SelectiveKVCache) -> bool:
        """Whether `select` or `on_store` of a single-token decode step of `layer` read the
        new token's rotated q or k. False lets the fused step skip rotating them outside its
        attention kernel (they then receive None). True (the default) is always correct."""
        return True

    def wants_scores(self, layer: int, cache: SelectiveKVCache) -> bool:
        """True: this layer attends fully and `observe_weights` receives its attention."""
        return False

    def observe_weights(self, layer, cache, weights: torch.Tensor, visible: torch.Tensor) -> None:
        """weights [B, Hkv, S]: the attention each slot got this step from its KV head's
        query group (softmax weights summed over the group's query heads)."""


def top_slots(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """The k best visible slots [B, Hkv, k] by scores [B, Hkv, S] (higher first); a row with
    fewer than k visible slots gets all of them and -1 for the rest."""
    visible = visible[:, None, :].expand_as(scores)
    scores = scores.float().masked_fill(~visible, float("-inf"))
    idx = scores.topk(k, dim=-1).indices
    return torch.where(visible.gather(-1, idx), idx, -1)
