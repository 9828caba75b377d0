"""Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference"): the cache is cut into pages of `page_size` slots, and each page keeps the
per-channel minimum and maximum of its keys (updated as tokens are stored). A decode query
q bounds a page's best attention logit by sum_d max(q_d * min_d, q_d * max_d); each step
reads only the pages with the highest bounds, plus always the first page (attention
sinks) and the current page (the newest tokens).

The budget rounds up to whole pages (ceil(budget / page_size) pages, so a budget that
covers the context reads everything). For GQA a page's score is the max of its query
group's bounds, and the pages are chosen per KV head. As in the paper, the first
`dense_layers` layers (2) attend fully: their attention is too spread out to page well.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdecode.kv.policies.base import ReadPolicy


class QuestPolicy(ReadPolicy):
    name = "quest"

    def __init__(self, budget: int, page_size: int = 16, dense_layers: int = 2) -> None:
        super().__init__(budget)
        if page_size < 1:
            raise ValueError(f"quest page_size must be positive, got {page_size}")
        if budget < page_size:
            raise ValueError(
                f"quest reads whole pages of {page_size} slots, but the KV budget is "
                f"{budget} positions: use a budget of at least {page_size} positions or a "
                f"smaller page_size"
            )
        self.page_size = page_size
        self.pages = math.ceil(budget / page_size)
        self.dense_layers = dense_layers

    def read_size(self, capacity: int) -> int:
        return min(self.pages, math.ceil(capacity / self.page_size)) * self.page_size

    def setup(self, cache) -> None:
        batch, num_kv_heads, capacity, head_dim = cache.k[0].shape
        shape = (batch, num_kv_heads, math.ceil(capacity / self.page_size), head_dim)
        kw = dict(dtype=cache.k[0].dtype, device=cache.k[0].device)
        sparse = range(self.dense_layers, cache.num_layers)
        cache.state["key_min"] = [torch.full(shape, float("inf"), **kw) for _ in sparse]
        cache.state["key_max"] = [torch.full(shape, float("-inf"), **kw) for _ in sparse]

    def _bounds(self, layer: int, cache) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer - self.dense_layers
        return cache.state["key_min"][i], cache.state["key_max"][i]

    def decode_reads_qk(self, layer, cache) -> bool:
        return layer >= self.dense_layers  # k for the page bounds, q for their scores

    # -- page bounds, kept current as keys are stored --
    def on_store(self, layer, cache, k, step) -> None:
        if layer < self.dense_layers:
            return
        key_min, key_max = self._bounds(layer, cache)
        if step.prefill:  # the prompt fills slots 0..T-1; padding past a row's prompt is not real
            self._prefill_bounds(k, step.prompt_lengths, key_min, key_max)
            return
        for t in range(k.shape[2]):  # append order: a write at a page's first slot starts it
            self._merge(key_min, key_max, k[:, :, t], step.slots[:, t], fresh=True)

    def _prefill_bounds(self, k, prompt_lengths, key_min, key_max) -> None:
        batch, num_kv_heads, length, head_dim = k.shape
        pages = math.ceil(length / self.page_size)
        pad = pages * self.page_size - length
        real = torch.arange(length + pad, device=k.device)[None, :] < prompt_lengths[:, None]
        keys = F.pad(k, (0, 0, 0, pad))
        hidden = ~real[:, None, :, None]
        shape = (batch, num_kv_heads, pages, self.page_size, head_dim)
        key_min[:, :, :pages] = keys.masked_fill(hidden, float("inf")).view(shape).amin(3)
        key_max[:, :, :pages] = keys.masked_fill(hidden, float("-inf")).view(shape).amax(3)
        key_min[:, :, pages:] = float("inf")
        key_max[:, :, pages:] = float("-inf")

    def _merge(self, key_min, key_max, key, slots, fresh: bool) -> None:
        """Fold key [B, Hkv, D] written at slots [B] into its page's bounds; with `fresh`, a
        write at a page's first slot resets the page (its other slots are not written yet)."""
        page = (slots // self.page_size)[:, None, None, None].expand(
            -1, key.shape[1], 1, key.shape[2]
        )
        start = (slots % self.page_size == 0)[:, None, None] if fresh else None
        for bound, pick in ((key_min, torch.minimum), (key_max, torch.maximum)):
            merged = pick(bound.gather(2, page)[:, :, 0], key)
            if start is not None:
                merged = torch.where(start, key, merged)
            bound.scatter_(2, page, merged[:, :, None])

    def on_move(self, layer, cache, batch_index, src, dst) -> None:
        if layer < self.dense_layers:
            return
        key_min, key_max = self._bounds(layer, cache)
        rows, dst = torch.broadcast_tensors(batch_index, dst)
        rows, dst = rows.reshape(-1), dst.reshape(-1)
        keys = cache.k[layer].permute(0, 2, 1, 3)[rows, dst]  # [N, Hkv, D]
        _, num_kv_heads, num_pages, head_dim = key_min.shape
        # one reduction per bound over [B * Hkv * P, D] rows (pages may repeat among the
        # moved slots): no per-slot indexing, which cost host syncs on the GPU
        heads = torch.arange(num_kv_heads, device=dst.device)
        flat = (rows[:, None] * num_kv_heads + heads) * num_pages + dst[:, None] // self.page_size
        for bound, reduce in ((key_min, "amin"), (key_max, "amax")):
            bound.view(-1, head_dim).index_reduce_(
                0, flat.reshape(-1), keys.reshape(-1, head_dim), reduce, include_self=True
            )

    # -- reading: the pages with the highest upper bounds --
    def select(self, layer, cache, q, visible):
        if layer < self.dense_layers:
            return None
        key_min, key_max = self._bounds(layer, cache)
        batch, num_kv_heads, num_pages, head_dim = key_min.shape
        size = self.page_size
        visible = F.pad(visible, (0, num_pages * size - visible.shape[1]))
        page_visible = visible.view(batch, num_pages, size).any(-1)  # [B, P]
        qg = q.reshape(batch, num_kv_heads, -1, head_dim)  # [B, Hkv, G, D]
        upper = qg.clamp(min=0) @ key_max.transpose(-1, -2)
        upper = upper + qg.clamp(max=0) @ key_min.transpose(-1, -2)  # [B, Hkv, G, P]
        scores = upper.amax(2).float().masked_fill(~page_visible[:, None], float("-inf"))
        slot_ids = torch.arange(visible.shape[1], device=visible.device)
        current = (slot_ids * visible).amax(-1) // size  # the page of the newest visible slot
        forced = torch.zeros_like(page_visible)
        forced[:, 0] = True
        forced.scatter_(1, current[:, None], True)
        scores = scores.masked_fill(forced[:, None] & page_visible[:, None], float("inf"))
        pages = scores.topk(cache.read_size // size, dim=-1).indices  # [B, Hkv, n]
        slots = (pages[..., None] * size + torch.arange(size, device=q.device)).flatten(-2)
        seen = visible[:, None, :].expand(-1, num_kv_heads, -1).gather(-1, slots)
        return torch.where(seen, slots, -1)
