"""Deferred prompt indexing for model-free drafters whose statistics are built in Python
(SuffixDecoding's trie, STAND's n-gram tables): 10-40 us per token, so a batch of 32 code
prompts held up its first speculative step for ~50 ms (12% of its whole decode, and the
batch-aware rule's exploring steps paid it again). A drafter indexes the last
`eager_prompt` tokens of its prompt before its first proposal and leaves the older part as
a backlog that the speculative loop hands the host's idle time to (`idle`, while the GPU
verifies). Fewer statistics for a while, same output: verification keeps it lossless."""

from __future__ import annotations

import time

EAGER_PROMPT = 512  # prompt tokens (the most recent) a batch indexes before its first proposal
EAGER_MIN = 16  # ... but at least these per request (its most recent context)
IDLE_CHUNK = 64  # backlog tokens indexed between two looks at the clock


class PromptBacklog:
    """Mixin: `_defer(context)` splits off the backlog at a first proposal; subclasses
    implement `_index_backlog(lo, hi)` (index backlog positions lo..hi-1) and call
    `_reset_backlog` from their reset. PerRowDrafters shares EAGER_PROMPT by the batch
    through `eager_prompt`."""

    eager_prompt: int = EAGER_PROMPT

    def _reset_backlog(self) -> None:
        self._backlog: list[int] = []  # a long prompt's older part, indexed in idle time
        self._backlog_done = 0

    def _defer(self, context) -> int:
        """At a first proposal over `context`: keep all but its last `eager_prompt` tokens
        for idle time; returns the position indexing starts from now."""
        start = max(0, len(context) - self.eager_prompt)
        self._backlog = list(context[:start])
        self._backlog_done = 0
        return start

    def _index_backlog(self, lo: int, hi: int) -> None:
        raise NotImplementedError

    @property
    def backlog(self) -> int:
        """Prompt tokens not indexed yet."""
        return len(self._backlog) - self._backlog_done

    def idle(self, seconds: float) -> None:
        """Index the backlog for about `seconds` (the loop calls this while the GPU
        verifies, when the host would only wait for it)."""
        start = time.perf_counter()
        while self._backlog_done < len(self._backlog):
            hi = min(self._backlog_done + IDLE_CHUNK, len(self._backlog))
            self._index_backlog(self._backlog_done, hi)
            self._backlog_done = hi
            if time.perf_counter() - start >= seconds:
                break
