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
from fastdecode.spec.drafters.prompt_backlog import EAGER_MIN, EAGER_PROMPT, PromptBacklog
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
        self.catch_up_s = 0.0  # of the last propose: the drafters' indexing of new context
        share = max(EAGER_MIN, EAGER_PROMPT // max(1, len(self.drafters)))
        for drafter in self.drafters:  # the batch's first step indexes ~EAGER_PROMPT tokens
            if isinstance(drafter, PromptBacklog):
                drafter.eager_prompt = share

    def begin(self, prompts, params, generators, first, prefill_logits) -> None:
        observing = [b for b in range(len(self.drafters)) if self.want_probs[b]]
        probs = {b: target_probs(prefill_logits[b : b + 1], params[b]) for b in observing}
        tops = self._top_k(list(probs.values()), observing)  # every row's in one pass (STAND)
        for b, (drafter, p) in enumerate(zip(self.drafters, params, strict=True)):
            drafter.reset()
            if hasattr(drafter, "configure"):
                drafter.configure(p)
            if b in tops:
                drafter.observe_top(prompts[b], [first[b]], *tops[b])
            elif self.want_probs[b]:
                drafter.observe(prompts[b], [first[b]], probs[b])
            drafter.update([first[b]])

    def propose(self, contexts, rooms, lengths) -> list[DraftTree]:
        trees, self.catch_up_s = [], 0.0
        for b, (drafter, room) in enumerate(zip(self.drafters, rooms, strict=True)):
            trees.append(drafter.propose(contexts[b], room).truncate(room) if room > 0 else None)
            if room > 0:  # a first proposal indexes the prompt: one-off work, not drafting
                self.catch_up_s += getattr(drafter, "index_s", 0.0)
        return [DraftTree.empty() if t is None else t for t in trees]

    @property
    def idle_work(self) -> bool:
        """Some drafter has deferred work for `idle` (a prompt backlog)."""
        return any(getattr(d, "backlog", 0) for d in self.drafters)

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
        observing = [
            b for b, v in enumerate(verdicts)
            if v is not None and self.want_probs[b] and v.probs is not None  # None: a burst's
        ]  # fmt: skip
        tops = self._top_k([verdicts[b].probs for b in observing], observing)
        watched = set(observing)
        for b, (drafter, verdict) in enumerate(zip(self.drafters, verdicts, strict=True)):
            if verdict is None:
                continue
            if b in tops:
                drafter.observe_top(contexts[b], verdict.tokens, *tops[b])
            elif b in watched:
                drafter.observe(contexts[b], verdict.tokens, verdict.probs)
            drafter.update(verdict.tokens)

    def _top_k(self, probs: list[torch.Tensor], rows: list[int]) -> dict[int, tuple]:
        """row -> (values, indices, vocab) of its distributions' top-k, every row's in one
        top-k and one transfer (one per row cost three host syncs each at batch 32), for
        drafters that take them (`observe_top`, one top_k for all)."""
        ks = {getattr(self.drafters[b], "top_k", None) for b in rows}
        takes = all(getattr(self.drafters[b], "observe_top", None) for b in rows)
        if not rows or not takes or len(ks) != 1 or None in ks:
            return {}
        vocab = probs[0].shape[-1]
        top = torch.topk(torch.cat(probs).float(), min(ks.pop(), vocab), dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
        out, start = {}, 0
        for b, p in zip(rows, probs, strict=True):
            end = start + p.shape[0]
            out[b] = (values[start:end], indices[start:end], vocab)
            start = end
        return out
