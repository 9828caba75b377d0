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
        # append mode: one [L, B, Hkv, C] tensor (per-layer views) so a fused decode step
        # books its slot in every layer with one write
        shape = (len(capacities), batch, num_kv_heads, self.capacity)
        self.pos_stack = torch.full(shape, -1, device=device) if self.dense_reads else None
        if self.pos_stack is not None:
            self.pos = list(self.pos_stack.unbind(0))
        else:
            self.pos = [torch.full((batch, num_kv_heads, c), -1, device=device) for c in capacities]
        self.score = [torch.zeros(batch, num_kv_heads, c, device=device) for c in capacities]
        # Append mode (policy.appends_in_decode): row b's live slots are 0..filled[b]-1 in
        # every layer and KV head (prefill keeps each row's real positions first, in position
        # order; new tokens take the first free slot), so decode is dense attention.
        self.filled = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def dense_reads(self) -> bool:
        """The fused dense decode kernel serves decode steps (append mode only)."""
        return self.policy.appends_in_decode and len(set(self.capacities)) == 1

    def decode_lengths(self, positions: torch.Tensor) -> torch.Tensor:
        """Append mode: the new token goes to slot filled (the last slot once full, which
        happens only past the room the runner allocates for max_tokens)."""
        return (self.filled + 1).clamp(max=self.capacity)

    def after_decode(self, positions: torch.Tensor, lengths: torch.Tensor) -> None:
        rows = torch.arange(positions.shape[0], device=positions.device)
        self.pos_stack[:, rows, :, lengths - 1] = positions[:, None, None]
        self.filled.copy_(lengths)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        if step.prefill:
            return self._prefill(layer, q, k, v, step.prompt_lengths)
        for t in range(k.shape[2]):
            self._insert(layer, k[:, :, t], v[:, :, t], step.positions[:, t])
        if layer == 0 and self.pos_stack is not None:  # append mode
            self.filled.add_(k.shape[2]).clamp_(max=self.capacity)
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
        if layer == 0 and self.pos_stack is not None:  # append mode: real positions sort
            self.filled.copy_(picked[:, 0].sum(-1))  # first (padding positions are largest)
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
