"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks"):
keep the first `sinks` tokens (attention sinks) plus a window of the most recent ones."""

from __future__ import annotations

from fastdecode.kv.policies.base import KVPolicy


class StreamingPolicy(KVPolicy):
    """Recency scores (the base policy's) with the sinks protected."""

    name = "streaming"

    def __init__(self, budget: int, sinks: int = 4) -> None:
        super().__init__(budget)
        self.sinks = min(sinks, budget)

    def protected(self, pos, newest):
        return (pos >= 0) & (pos < self.sinks)
