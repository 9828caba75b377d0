"""Budgeted KV storage: each layer keeps at most `capacity[l]` entries per (row, KV head).

Memory is really saved: a layer is allocated [B, Hkv, capacity, D], not [B, Hkv, context,
D]. Each slot remembers the position it holds (`pos`, -1 when empty), so a KV head may
keep different positions than its neighbour, and GQA query groups read their KV head's
selection (never a repeated copy). At prefill the prompt's full K/V exist for one layer
at a time only, and the policy picks what that layer keeps. During decoding a new token
takes a free slot, else the slot the policy scores lowest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.kv.attention import prompt_attention
from fastdecode.kv.policies.base import KVPolicy
from fastdecode.kv.step import StepContext


class SparseKVCache:
    graph_safe = True  # eviction picks slots on the device (argmin + scatter): no host sync

    def __init__(
        self,
        policy: KVPolicy,
        capacities: list[int],
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.policy = policy
        self.batch = batch
        self.capacities = list(capacities)  # a policy may resize a layer at its prefill
        self.capacity = max(capacities)
        self.k = [
            torch.zeros(batch, num_kv_heads, c, head_dim, dtype=dtype, device=device)
            for c in capacities
        ]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.pos = [torch.full((batch, num_kv_heads, c), -1, device=device) for c in capacities]
        self.score = [torch.zeros(batch, num_kv_heads, c, device=device) for c in capacities]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        if step.prefill:
            return self._prefill(layer, q, k, v, step.prompt_lengths)
        for t in range(k.shape[2]):
            self._insert(layer, k[:, :, t], v[:, :, t], step.positions[:, t])
        return self._attend(layer, q, step.positions)

    # -- prefill: full causal attention among the prompt, then keep what the policy picks --
    def _prefill(self, layer, q, k, v, prompt_lengths) -> torch.Tensor:
        out = prompt_attention(q, k, v)
        raw = self.policy.prefill_scores(layer, q, k, prompt_lengths).float()
        self.policy.on_prefill(layer, self, prompt_lengths)  # may resize layers (CAKE)
        length = k.shape[2]
        key_pos = torch.arange(length, device=k.device).expand_as(raw)
        real = key_pos < prompt_lengths[:, None, None]
        keep_always = self.policy.protected(key_pos, prompt_lengths - 1) & real
        scores = raw.masked_fill(keep_always, float("inf")).masked_fill(~real, float("-inf"))
        keep = min(self.policy.prompt_keep(layer, self.capacities[layer]), length)
        chosen = scores.topk(keep, dim=-1).indices.sort(dim=-1).values  # position order
        picked = real.gather(-1, chosen)
        gather = chosen[..., None].expand(-1, -1, -1, k.shape[-1])
        self.k[layer][:, :, :keep] = k.gather(2, gather)
        self.v[layer][:, :, :keep] = v.gather(2, gather)
        self.pos[layer][:, :, :keep] = torch.where(picked, chosen, -1)
        self.pos[layer][:, :, keep:] = -1
        self.score[layer].zero_()
        self.score[layer][:, :, :keep] = raw.gather(-1, chosen) * picked
        return out

    def resize(self, layer: int, capacity: int, newest: torch.Tensor) -> None:
        """Reallocate `layer` at `capacity` slots, keeping its best entries (protected first,
        then the policy's eviction scores): shrinking really frees memory. `newest` [B] is
        each row's latest position (for `protected`)."""
        pos = self.pos[layer]
        keep = min(capacity, pos.shape[-1])
        scores = self.policy.eviction_scores(layer, self).float()
        scores = scores.masked_fill(self.policy.protected(pos, newest), float("inf"))
        idx = scores.masked_fill(pos < 0, float("-inf")).topk(keep, dim=-1).indices
        idx = idx.sort(dim=-1).values

        def take(t: torch.Tensor, fill: float) -> torch.Tensor:
            new = t.new_full((*t.shape[:2], capacity, *t.shape[3:]), fill)
            at = idx if t.dim() == 3 else idx[..., None].expand(-1, -1, -1, t.shape[-1])
            new[:, :, :keep] = t.gather(2, at)
            return new

        self.k[layer], self.v[layer] = take(self.k[layer], 0), take(self.v[layer], 0)
        self.pos[layer], self.score[layer] = take(pos, -1), take(self.score[layer], 0)
        self.capacities[layer] = capacity
        self.capacity = max(self.capacities)

    # -- decode / verify: put each new token in a free or evicted slot, attend over slots --
    def _insert(self, layer, k_new, v_new, positions) -> None:
        pos = self.pos[layer]
        free = pos < 0
        scores = self.policy.eviction_scores(layer, self).float()
        scores = scores.masked_fill(self.policy.protected(pos, positions), float("inf"))
        scores = scores.masked_fill(free, float("-inf"))
        slot = scores.argmin(dim=-1, keepdim=True)  # [B, Hkv, 1]: first free, else lowest
        gather = slot[..., None].expand(-1, -1, 1, k_new.shape[-1])
        self.k[layer].scatter_(2, gather, k_new[:, :, None])
        self.v[layer].scatter_(2, gather, v_new[:, :, None])
        pos.scatter_(2, slot, positions[:, None, None].expand_as(slot))
        self.score[layer].scatter_(2, slot, torch.zeros_like(slot, dtype=torch.float32))

    def _attend(self, layer, q, positions) -> torch.Tensor:
        pos = self.pos[layer]
        batch, num_heads, length, head_dim = q.shape
        num_kv_heads = pos.shape[1]
        group = num_heads // num_kv_heads
        visible = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= positions[:, None, :, None])
        mask = visible[:, :, None].expand(-1, -1, group, -1, -1).flatten(2, 3)  # [B,Hkv,G*T,C]
        q = q.reshape(batch, num_kv_heads, group * length, head_dim)
        k_cache, v_cache = self.k[layer], self.v[layer]
        if not self.policy.needs_attention:
            out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        else:
            logits = q.float() @ k_cache.float().transpose(-1, -2) * head_dim**-0.5
            weights = logits.masked_fill(~mask, float("-inf")).softmax(-1)
            self.policy.observe(layer, self, weights.sum(2))
            out = (weights @ v_cache.float()).to(q.dtype)
        return out.reshape(batch, num_heads, length, head_dim)
