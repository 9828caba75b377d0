"""CAKE (Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer
Preferences", ICLR 2025): KV eviction as cake slicing. The total budget (budget x layers)
is shared among layers by each layer's preference, measured on the observation window's
attention: spatial dispersion (entropy) times temporal shift (variance over the window).
Within a layer, a position's eviction indicator is mean + gamma * variance of the attention
the window gives it (a token whose importance shifts over time is kept).

Cascading (the paper's memory bound, done for real): layers are sized as they are
prefilled, not up front. `capacity` allocates nothing; at layer l's prefill the budgets of
layers 0..l are recomputed from their preferences and the earlier layers shrink to theirs
(`SparseKVCache.resize` frees the memory), so at every moment of prefill the cache holds at
most the total. Budgets are capped at the context (prompt + max_tokens), so with a budget
>= context every layer keeps everything and the output equals full attention.

Decoding: the window is protected, generated tokens are evicted after prompt positions
(oldest first), prompt positions in indicator order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.kv.policies.base import KVPolicy

GENERATED = 1e6  # eviction-score offset of generated tokens: above any indicator


def window_weights(
    q: torch.Tensor, k: torch.Tensor, prompt_lengths: torch.Tensor, window: int
) -> torch.Tensor:
    """Attention of each row's last `window` real queries over its prompt keys, per query
    head: [B, Hkv, G, W, T] (padding and future keys get none)."""
    batch, num_heads, length, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    query_pos = prompt_lengths.view(batch, 1) - window + torch.arange(window, device=q.device)
    query_pos = query_pos.clamp(min=0)  # a prompt shorter than the window repeats query 0
    idx = query_pos[:, None, :, None].expand(batch, num_heads, window, head_dim)
    q_win = q.gather(2, idx).view(batch, num_kv_heads, group * window, head_dim)
    logits = q_win.float() @ k.float().transpose(-1, -2) * head_dim**-0.5
    visible = torch.arange(length, device=q.device)[None, None, :] <= query_pos[:, :, None]
    logits = logits.view(batch, num_kv_heads, group, window, length)
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))
    return logits.softmax(-1)


def layer_preference(weights: torch.Tensor, tau1: float, tau2: float) -> float:
    """CAKE's P = H^(1/tau1) * V^(1/tau2) from window weights [B, Hkv, G, W, T]: H the
    entropy of the window-mean attention, V the summed variance over the window."""
    mean = weights.mean(3)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1).mean()
    shift = weights.var(3, unbiased=False).sum(-1).mean()
    return float(entropy.clamp_min(1e-6) ** (1 / tau1) * shift.clamp_min(1e-9) ** (1 / tau2))


def split_budget(prefs: list[float], total: int, cap: int) -> list[int]:
    """Integer budgets proportional to `prefs`, each in [1, cap], summing to at most
    `total` (water-filling: layers that hit the cap give their share to the others)."""
    n = len(prefs)
    if total >= n * cap:
        return [cap] * n
    floor = 1 if total >= n else 0
    budgets = [floor] * n
    left, open_ = total - floor * n, set(range(n))
    while left > 0 and open_:
        mass = sum(prefs[i] for i in open_) or float(len(open_))
        share = {i: left * (prefs[i] / mass if mass else 1 / len(open_)) for i in open_}
        grant = {i: min(int(share[i]), cap - budgets[i]) for i in open_}
        if not any(grant.values()):  # shares below one slot: hand out the rest by preference
            for i in sorted(open_, key=lambda i: -prefs[i])[:left]:
                budgets[i] += 1
            break
        for i, g in grant.items():
            budgets[i] += g
            left -= g
        open_ = {i for i in open_ if budgets[i] < cap}
    return budgets


class CakePolicy(KVPolicy):
    name = "cake"

    def __init__(
        self,
        budget: int,
        window: int = 32,
        gamma: float = 200.0,
        tau1: float = 1.0,
        tau2: float = 1.0,
        pool: int = 7,
    ) -> None:
        super().__init__(budget)
        self.window = min(window, budget)
        self.gamma, self.tau1, self.tau2, self.pool = gamma, tau1, tau2, pool
        self.prefs: list[float] = []  # preference of each layer prefilled so far
        self.limit = budget  # a layer never needs more than the context
        self.prompt_lengths: torch.Tensor | None = None

    def capacity(self, layer, prompt_len, max_new):
        self.limit = prompt_len + max_new
        self.prefs = []
        return 0  # allocated at this layer's prefill (cascading), see on_prefill

    def prefill_scores(self, layer, q, k, prompt_lengths):
        weights = window_weights(q, k, prompt_lengths, self.window)
        del self.prefs[layer:]
        self.prefs.append(layer_preference(weights, self.tau1, self.tau2))
        self.prompt_lengths = prompt_lengths
        indicator = weights.mean(3) + self.gamma * weights.var(3, unbiased=False)
        indicator = indicator.sum(2)  # a KV head serves its whole query group
        if self.pool > 1:
            indicator = F.max_pool1d(indicator, self.pool, stride=1, padding=self.pool // 2)
        return indicator

    def on_prefill(self, layer, cache, prompt_lengths):
        total = self.budget * len(cache.k)
        budgets = split_budget(self.prefs, total, self.limit)
        newest = prompt_lengths - 1
        for i in sorted(range(layer + 1), key=lambda i: budgets[i] - cache.capacities[i]):
            if budgets[i] != cache.capacities[i]:  # shrink first: the total is never exceeded
                cache.resize(i, budgets[i], newest)

    def eviction_scores(self, layer, cache):
        pos = cache.pos[layer]
        generated = pos >= self.prompt_lengths[:, None, None]
        return torch.where(generated, GENERATED + pos.float(), cache.score[layer])

    def protected(self, pos, newest):
        return pos > newest[:, None, None] - self.window  # the observation window
