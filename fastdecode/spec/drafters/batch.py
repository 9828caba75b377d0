"""The batch-level drafter interface the speculative loop talks to.

Model-based drafters (a draft model, the target with skipped layers or a sparse KV cache)
must draft every row of the batch in the same forward passes, so the loop drives one
BatchDrafter per batch. Model-free drafters (n-gram, suffix, STAND) are per request; the
`PerRowDrafters` adapter runs one per row behind the same interface.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from fastdecode.params import SamplingParams
from fastdecode.spec.drafters.base import Drafter
from fastdecode.spec.tree import DraftTree
from fastdecode.spec.verify import Verdict, target_probs


@runtime_checkable
class BatchDrafter(Protocol):
    """One instance per batch.

    `want_probs[b]`: row b's verdicts must carry the target's distributions (STAND).
    `begin` runs once after the target's prefill (`lengths`: each row's cached tokens);
    `propose` drafts a tree of at most `rooms[b]` nodes for each row (0: none) continuing
    `contexts[b]` (prompt + output; the last token is the root, not yet in the target's
    cache, which holds `lengths[b]` tokens); `accept` hands over what the verify step
    emitted (None for rows that took no part). `contexts` is a view built row by row on
    access (fastdecode.engine.speculative.Contexts): read only the rows you need. After
    plain (K = 0) steps one verdict may carry several steps' tokens and no accepted drafts.
    Optional `catch_up_s`: seconds of the last `propose` spent writing a backlog of such
    tokens rather than drafting (the goodput rule's per-level draft cost leaves it out)."""

    want_probs: list[bool]

    def begin(
        self,
        prompts: list[list[int]],
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        first: list[int],
        prefill_logits: torch.Tensor,
    ) -> None: ...

    def propose(
        self, contexts: Sequence[list[int]], rooms: list[int], lengths: list[int]
    ) -> list[DraftTree]: ...

    def accept(self, contexts: Sequence[list[int]], verdicts: Sequence[Verdict | None]) -> None: ...


class PerRowDrafters:
    """Model-free drafters, one per request, as a BatchDrafter."""

    def __init__(self, drafters: Sequence[Drafter]) -> None:
        self.drafters = list(drafters)
        self.want_probs = [getattr(d, "wants_target_probs", False) for d in self.drafters]

    def begin(self, prompts, params, generators, first, prefill_logits) -> None:
        for b, (drafter, p) in enumerate(zip(self.drafters, params, strict=True)):
            drafter.reset()
            if hasattr(drafter, "configure"):
                drafter.configure(p)
            if self.want_probs[b]:
                probs = target_probs(prefill_logits[b : b + 1], p)
                drafter.observe(prompts[b], [first[b]], probs)
            drafter.update([first[b]])

    def propose(self, contexts, rooms, lengths) -> list[DraftTree]:
        trees = []
        for b, (drafter, room) in enumerate(zip(self.drafters, rooms, strict=True)):
            trees.append(drafter.propose(contexts[b], room).truncate(room) if room > 0 else None)
        return [DraftTree.empty() if t is None else t for t in trees]

    def idle(self, seconds: float) -> None:
        """Hand drafters with deferred work (SuffixDecoding's prompt backlog) `seconds` of
        host time the loop would spend waiting for the GPU."""
        deadline = time.perf_counter() + seconds
        for drafter in self.drafters:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            if getattr(drafter, "backlog", 0):
                drafter.idle(left)

    def accept(self, contexts, verdicts) -> None:
        for b, (drafter, verdict) in enumerate(zip(self.drafters, verdicts, strict=True)):
            if verdict is None:
                continue
            if self.want_probs[b] and verdict.probs is not None:  # None: a plain burst's
                drafter.observe(contexts[b], verdict.tokens, verdict.probs)
            drafter.update(verdict.tokens)
