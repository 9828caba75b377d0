"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation"):
at prefill, score each prompt position by the attention it gets from the last `window`
prompt queries (summed over each KV head's query group, smoothed by pooling), keep the
top ones plus the window itself; generated tokens are all kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.kv.policies.base import KVPolicy


def window_attention(
    q: torch.Tensor, k: torch.Tensor, prompt_lengths: torch.Tensor, window: int
) -> torch.Tensor:
    """Attention weights of each row's last `window` real queries over its prompt keys,
    summed per KV head: [B, Hkv, T]. Padding keys and future keys get none."""
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    ends = prompt_lengths.view(batch, 1)
    query_pos = (ends - window + torch.arange(window, device=q.device)).clamp(min=0)  # [B, W]
    idx = query_pos[:, None, :, None].expand(batch, num_heads, window, head_dim)
    q_win = q.gather(2, idx).view(batch, num_kv_heads, group * window, head_dim)
    logits = q_win.float() @ k.float().transpose(-1, -2) * head_dim**-0.5  # [B, Hkv, G*W, T]
    key_pos = torch.arange(length, device=q.device)
    visible = key_pos[None, None, :] <= query_pos.repeat(1, group)[:, :, None]  # [B, G*W, T]
    logits = logits.masked_fill(~visible[:, None], float("-inf"))
    return logits.softmax(-1).sum(2)


class SnapKVPolicy(KVPolicy):
    name = "snapkv"
    appends_in_decode = True  # the selection is made once, at prefill

    def __init__(self, budget: int, window: int = 32, pool: int = 7) -> None:
        super().__init__(budget)
        self.window = min(window, budget)
        self.pool = pool

    def capacity(self, layer, prompt_len, max_new):
        return min(self.budget, prompt_len) + max_new  # generated tokens are never evicted

    def prompt_keep(self, layer, capacity):
        return self.budget  # the selected prompt positions; the rest is for new tokens

    def eviction_scores(self, layer, cache):
        # Only reached when decoding outruns max_tokens' room (teacher forcing): drop the
        # prompt position with the fewest window votes (generated tokens have none).
        return cache.score[layer]

    def prefill_scores(self, layer, q, k, prompt_lengths):
        votes = window_attention(q, k, prompt_lengths, self.window)
        if self.pool > 1:
            votes = F.max_pool1d(votes, self.pool, stride=1, padding=self.pool // 2)
        return votes

    def protected(self, pos, newest):
        return pos > newest[:, None, None] - self.window  # the observation window itself
