"""Sparse retrieval: keep every KV entry, read only a selected subset per decode step.

`SelectiveKVCache` stores exactly like the dense `KVCache` (same buffers, same slots, so
verification, rollback and `move` work unchanged). On a single-token decode step its
`ReadPolicy` names, per (row, KV head), K slots to read ([B, Hkv, K], K fixed per cache so
the step keeps static shapes for CUDA graphs); a row with fewer visible slots reads all of
them, padded with -1. `gathered_attention` then attends over just those slots (the Triton
kernel on CUDA reads them by index in place). Prefill and multi-token steps attend fully.

GQA: a selection belongs to a KV head and is shared by its query group (policies score a
slot over the group's queries), so K/V are never repeated per query head.

Unlike eviction (`SparseKVCache`) this saves bytes read per step, not memory: a position
skipped now may be read again later, which is what lets a retrieval policy follow the query.
"""

from __future__ import annotations

import torch

from fastdecode.kv import gathered
from fastdecode.kv.attention import cache_attention, prompt_attention
from fastdecode.kv.cache import KVCache, write_kv
from fastdecode.kv.policies.base import ReadPolicy, top_slots  # noqa: F401 (re-export)
from fastdecode.kv.step import StepContext


def visible_slots(step: StepContext, capacity: int) -> torch.Tensor:
    """bool [B, S]: the slots a single-token step's query sees (from its mask or lengths)."""
    if step.mask is not None:
        return step.mask[:, 0, 0, :]
    slots = torch.arange(capacity, device=step.lengths.device)
    return slots[None, :] < step.lengths[:, None]


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [B, Hq, 1, D] -> [B, Hkv, G, D]: each KV head's query group."""
    batch, num_heads, _, head_dim = q.shape
    return q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)


def attention_weights(q: torch.Tensor, k_cache: torch.Tensor, visible: torch.Tensor):
    """The attention [B, Hkv, S] each visible slot ([B, S]) gets from its KV head's query
    group (single-token softmax weights of q [B, Hq, 1, D], summed over the group): what a
    selection layer hands `observe_weights`."""
    head_dim = q.shape[-1]
    logits = group_queries(q.float(), k_cache.shape[1]) @ k_cache.float().transpose(-1, -2)
    logits = logits * head_dim**-0.5
    weights = logits.masked_fill(~visible[:, None, None, :], float("-inf")).softmax(-1)
    return weights.sum(2)


def group_weights(
    logits: torch.Tensor, slice_lse: torch.Tensor, visible: torch.Tensor, num_kv_heads: int
) -> torch.Tensor:
    """`attention_weights` from a decode kernel's own scaled logits [B, Hq, S] and slice
    log-sum-exps [B, Hq, splits] (`triton_decode.fused_decode_attention_scored`)."""
    batch, num_heads, slots = logits.shape
    lse = slice_lse.logsumexp(-1, keepdim=True)
    weights = torch.where(visible[:, None, :], torch.exp(logits - lse), 0.0)
    return weights.view(batch, num_kv_heads, num_heads // num_kv_heads, slots).sum(2)


class SelectiveKVCache(KVCache):
    # Decode steps read a subset: not the fused dense step, but on CUDA the fused selective
    # one (`fastdecode.model.fused_selective`) where the policy allows (`fused_select_ok`).
    dense_reads = False
    # False: every step reads everything (the target of sparse self-speculation, whose
    # draft switches sparse reads on only while it drafts)
    sparse_reads = True

    def __init__(
        self,
        policy: ReadPolicy,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__(num_layers, batch, num_kv_heads, capacity, head_dim, dtype, device)
        self.policy = policy
        self.num_layers = num_layers
        self.read_size = policy.read_size(capacity)  # K slots per (row, KV head)
        self.state: dict[str, object] = {}  # the policy's tensors (page bounds, a selection)
        policy.setup(self)

    @property
    def fused_select_ok(self) -> bool:
        """Whether decode steps may run fused (`fastdecode.model.fused_selective`)."""
        return self.policy.fused_decode

    def nbytes(self) -> int:
        """K/V plus the policy's own tensors (e.g. Quest's page bounds)."""
        extra = []
        for value in self.state.values():
            extra += value if isinstance(value, list) else [value]
        tensors = [t for t in extra if isinstance(t, torch.Tensor)]
        return super().nbytes() + sum(t.numel() * t.element_size() for t in tensors)

    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        k_cache, v_cache = self.k[layer], self.v[layer]
        write_kv(k_cache, v_cache, k, v, step.batch_index, step.slots)
        self.policy.on_store(layer, self, k, step)
        if step.prefill:
            return prompt_attention(q, k, v)
        if q.shape[2] != 1 or not self.sparse_reads:
            return cache_attention(q, k_cache, v_cache, step.mask, step.lengths, step.tree)
        visible = visible_slots(step, self.capacity)
        indices = self.policy.select(layer, self, q, visible)
        if indices is not None:
            return gathered.gathered_attention(q, k_cache, v_cache, indices)
        if self.policy.wants_scores(layer, self):
            self._observe(layer, q, visible)
        return cache_attention(q, k_cache, v_cache, step.mask, step.lengths)

    def _observe(self, layer: int, q: torch.Tensor, visible: torch.Tensor) -> None:
        """Hand this layer's attention weights [B, Hkv, G, S] to the policy (the output
        itself comes from the dense path)."""
        weights = attention_weights(q, self.k[layer], visible)
        self.policy.observe_weights(layer, self, weights, visible)

    def move(self, batch_index: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        super().move(batch_index, src, dst)
        for layer in range(self.num_layers):
            self.policy.on_move(layer, self, batch_index, src, dst)
