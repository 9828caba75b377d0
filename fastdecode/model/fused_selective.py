"""The fused single-token decode step for sparse-retrieval caches (`SelectiveKVCache`).

Same shape as `FusedDecodeStep` (one QKV matmul, one attention kernel, one compiled block
for output projection + MLP + the next layer's norm), with the attention kernel chosen per
layer by the cache's `ReadPolicy`:

- a layer the policy reads sparsely (`select` returns slots [B, Hkv, K]): one Triton launch
  that applies RoPE, stores the new k/v and attends over just those slots
  (`fastdecode.kv.triton_gathered.fused_gathered_attention`), plus the merge;
- a layer that attends fully (TidalDecode's first layers and its token-selection layers,
  Quest's dense layers, or every layer while `sparse_reads` is off): the dense fused kernel.
  A selection layer (TidalDecode: Yang et al., 2024) has that kernel also write its logits,
  which one compiled block turns into the group-summed weights `observe_weights` ranks (no
  second pass over the keys);
- RoPE outside the kernel only where the policy reads the new q or k
  (`ReadPolicy.decode_reads_qk`: Quest's page bounds and page scores, Tang et al., 2024).

The unfused path (`Transformer.forward`) pays per layer for the norm, the QKV matmul and
RoPE, two index_put writes, the visible-slot mask, the selection and the gathered kernel;
here the per-step tensors (visible slots, RoPE tables, a selection every layer shares) are
computed once per step. No host syncs and static shapes, so the runner captures the step
as a CUDA graph like the dense one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastdecode.kv import gathered
from fastdecode.kv.gathered import rotate_new_token
from fastdecode.kv.selective import SelectiveKVCache, group_weights, visible_slots
from fastdecode.kv.step import StepContext
from fastdecode.model.fused_decode import FusedDecodeStep, NewToken, compiled


@dataclass
class SelectiveToken(NewToken):
    """`NewToken` plus what a read policy needs, also computed once per step."""

    visible: torch.Tensor  # [B, S]: the slots 0..position
    step: StepContext  # for `on_store` (slots = positions)
    selection: torch.Tensor | None = None  # a `shared_selection` policy's slots this step


class FusedSelectiveStep(FusedDecodeStep):
    def __init__(self, model, compile: bool) -> None:
        super().__init__(model, compile)
        cfg = model.config
        heads = dict(num_heads=cfg.num_heads, head_dim=cfg.head_dim)
        self.rotate = compiled(functools.partial(rotate_new_token, **heads), compile)
        self.group_weights = compiled(
            functools.partial(group_weights, num_kv_heads=cfg.num_kv_heads), compile
        )

    def new_token(self, positions: torch.Tensor, cache: SelectiveKVCache) -> SelectiveToken:
        token = super().new_token(positions, cache)
        batch_index = torch.arange(positions.shape[0], device=positions.device)[:, None]
        slots = positions[:, None]
        step = StepContext(slots, slots, batch_index, mask=None, lengths=token.lengths)
        visible = visible_slots(step, cache.capacity)
        return SelectiveToken(token.positions, token.lengths, token.cos, token.sin, visible, step)

    def attend(self, layer: int, qkv: torch.Tensor, cache: SelectiveKVCache, token):
        """The policy's hooks in the unfused path's order (on_store, select, attention,
        observe_weights), with RoPE, store and attention in one kernel."""
        policy = cache.policy
        q = k = None
        if policy.decode_reads_qk(layer, cache):
            q, k, _ = self.rotate(qkv, token.cos, token.sin)
        policy.on_store(layer, cache, k, token.step)
        indices = self._select(layer, cache, q, token) if cache.sparse_reads else None
        if indices is not None:
            return gathered.fused_gathered_attention(
                qkv, cache.k[layer], cache.v[layer], indices, token.positions,
                token.cos, token.sin, self.model.config.num_heads,
            )  # fmt: skip
        if not (cache.sparse_reads and policy.wants_scores(layer, cache)):
            return super().attend(layer, qkv, cache, token)
        from fastdecode.kv.triton_decode import fused_decode_attention_scored

        attn, logits, slice_lse = fused_decode_attention_scored(
            qkv, cache.k[layer], cache.v[layer], token.lengths, token.cos, token.sin,
            self.model.config.num_heads,
        )  # fmt: skip
        weights = self.group_weights(logits, slice_lse, token.visible)
        policy.observe_weights(layer, cache, weights, token.visible)
        return attn

    def _select(self, layer: int, cache: SelectiveKVCache, q, token: SelectiveToken):
        """`policy.select`, once per step for a policy whose selection every layer shares."""
        policy = cache.policy
        if not policy.shared_selection:
            return policy.select(layer, cache, q, token.visible)
        if token.selection is None:
            token.selection = policy.select(layer, cache, q, token.visible)
        return token.selection
