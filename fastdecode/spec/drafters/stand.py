"""STAND-style stochastic n-gram drafting (Song et al. 2025, "STAND: Accelerating
Reasoning with STochastic Adaptive N-gram Drafting"): a model-free drafter that remembers,
per n-gram context of this request, the *target's* next-token distributions (their top-k
probabilities, averaged over the positions that followed the context), and drafts by
sampling from them. Because the drafts come with the distribution q they were drawn from,
lossless speculative sampling accepts them with probability min(1, p / q): when the stored
q is close to the target's p, sampled drafts are accepted under temperature sampling too,
not only under greedy (where a deterministic n-gram's guess is accepted only with
probability p(guess)).

Statistics (per request):
- target table: context key (the last n tokens, min_ngram <= n <= max_ngram) -> the sum
  of the top-`top_k` probabilities the target gave the next token at the positions that
  followed that key, and the number of such positions. Filled through the engine's
  `observe` hook (the drafter sets `wants_target_probs`), with the filtered distributions
  the verifier samples from (temperature / top-k / top-p), or plain softmax under greedy;
- count table: the same keys -> counts of the token that actually followed (prompt and
  output), a fallback for contexts the target has not been observed after (the prompt).
The draft distribution after a context is the entry of its longest key (target table first
at equal length), normalized: sums / their total (top-k mass renormalized).

Drafting (`max_nodes` nodes):
- sampling: the root gets up to `width` siblings drawn without replacement from q (the
  second carries q without the first, renormalized: Sequoia's rule that verify.py expects),
  then a chain continues below the first sibling, each node drawn from its own context's q;
  drafting stops where no statistics exist;
- greedy (the request's SamplingParams, from `configure`): deterministic best-first tree by
  path probability under the stored distributions (the argmax first; the `width` best
  tokens per node are candidates), q = None, so the output is exactly plain greedy.

Draft randomness comes from the drafter's own generator, seeded from the request's seed (a
different stream from the verifier's), so seeded requests are reproducible.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence

import torch

from fastdecode.params import SamplingParams
from fastdecode.spec.drafters.prompt_backlog import PromptBacklog
from fastdecode.spec.tree import DraftTree

_SEED_SALT = 0x5DEECE66D  # draft stream != the verifier's stream of the same seed


class StandDrafter(PromptBacklog):
    """max_ngram / min_ngram: context lengths of the tables; top_k: probabilities kept per
    observed target distribution; width: siblings at the root (sampling) or candidates per
    node (greedy tree); min_prob: smallest path probability of a greedy tree node;
    use_prompt: fill the count table from the prompt and output tokens."""

    wants_target_probs = True

    def __init__(
        self,
        max_ngram: int = 3,
        min_ngram: int = 1,
        top_k: int = 8,
        width: int = 2,
        min_prob: float = 0.05,
        use_prompt: bool = True,
    ) -> None:
        if not isinstance(min_ngram, int) or not isinstance(max_ngram, int):
            raise ValueError(f"n-gram lengths must be integers, got {min_ngram!r}, {max_ngram!r}")
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                f"max_ngram={max_ngram}"
            )
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.top_k = top_k
        self.width = width
        self.min_prob = float(min_prob)
        self.use_prompt = bool(use_prompt)
        self.greedy = False
        self.generator = torch.Generator()
        self.generator.seed()
        self.vocab_size: int | None = None
        self.reset()

    # -- engine hooks ---------------------------------------------------------------------
    def reset(self) -> None:
        self.target: dict[tuple[int, ...], tuple[dict[int, float], int]] = {}
        self.counts: dict[tuple[int, ...], dict[int, int]] = {}
        self._indexed = 0  # context tokens counted in order (0: before the first proposal)
        self._tail: list[int] = []  # their last max_ngram tokens
        self._reset_backlog()
        self.index_s = 0.0  # of the last propose: indexing new context, not drafting

    def configure(self, params: SamplingParams) -> None:
        """The request's sampling parameters: greedy drafts deterministically; sampling
        draws from a generator seeded from the request's seed."""
        self.greedy = params.greedy
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed((params.seed ^ _SEED_SALT) & 0xFFFF_FFFF_FFFF)

    def observe(self, context: list[int], tokens: list[int], probs: torch.Tensor) -> None:
        """probs [len(tokens), V]: probs[j] is the target's next-token distribution after
        context + tokens[:j] (tokens[j] was emitted from it)."""
        if not len(tokens):
            return
        top = torch.topk(probs.float(), min(self.top_k, probs.shape[-1]), dim=-1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        # the class's own (a subclass may turn the batch path off by unsetting observe_top)
        StandDrafter.observe_top(self, context, tokens, values, indices, probs.shape[-1])

    def observe_top(
        self,
        context: Sequence[int],
        tokens: list[int],
        values: list[list[float]],
        indices: list[list[int]],
        vocab_size: int,
    ) -> None:
        """`observe` with each distribution's top-`top_k` already on the host (the batch
        adapter takes the top-k of every row's distributions in one pass and one transfer)."""
        if not len(tokens):
            return
        self.vocab_size = vocab_size
        tail = list(context[-self.max_ngram :])
        for j in range(len(tokens)):
            for n in range(self.min_ngram, min(self.max_ngram, len(tail)) + 1):
                key = tuple(tail[-n:])
                sums, seen = self.target.get(key, ({}, 0))
                for token, value in zip(indices[j], values[j], strict=True):
                    if value > 0:
                        sums[token] = sums.get(token, 0.0) + value
                self.target[key] = (sums, seen + 1)
            tail = (tail + [int(tokens[j])])[-self.max_ngram :]

    def update(self, accepted: list[int]) -> None:
        """Count the emitted tokens now: after plain bursts this runs while the GPU decodes
        the next burst (plain_burst's pipelining), not in front of the next proposal."""
        if self._indexed and accepted:
            self._count_tokens(accepted)

    # -- statistics -----------------------------------------------------------------------
    def _count_tokens(self, tokens: Sequence[int]) -> None:
        """Add `tokens`, which continue the counted context, to the count table."""
        if self.use_prompt:
            tail, counts = self._tail, self.counts
            for nxt in tokens:
                for n in range(self.min_ngram, min(self.max_ngram, len(tail)) + 1):
                    row = counts.setdefault(tuple(tail[-n:]), {})
                    row[nxt] = row.get(nxt, 0) + 1
                tail.append(nxt)
                if len(tail) > self.max_ngram:
                    del tail[0]
        self._indexed += len(tokens)

    def _index_backlog(self, lo: int, hi: int) -> None:
        """Count positions lo..hi-1 of the deferred prompt head (keys read from it)."""
        if not self.use_prompt:
            return
        seq = self._backlog
        for i in range(max(lo, 1), hi):
            nxt = seq[i]
            for n in range(self.min_ngram, min(self.max_ngram, i) + 1):
                row = self.counts.setdefault(tuple(seq[i - n : i]), {})
                row[nxt] = row.get(nxt, 0) + 1

    def _index(self, context: Sequence[int]) -> None:
        """Catch the count table up with `context`: at a first proposal its last
        `eager_prompt` tokens (the older part is a backlog for idle time); later whatever
        `update` did not hand over (normally nothing)."""
        if self._indexed == 0:  # the older part: counted from the backlog in idle time
            self._indexed = self._defer(context)
        if len(context) > self._indexed:
            self._tail = list(context[max(0, self._indexed - self.max_ngram) : self._indexed])
            self._count_tokens(context[self._indexed :])
        elif len(context) < self._indexed:  # a shorter context (no reset): keep the tables
            self._indexed = len(context)
            self._tail = list(context[-self.max_ngram :])

    def distribution(self, tail: list[int]) -> dict[int, float] | None:
        """The stored next-token distribution after a context ending in `tail` (token ->
        probability, summing to 1), or None without statistics."""
        for n in range(min(self.max_ngram, len(tail)), self.min_ngram - 1, -1):
            key = tuple(tail[-n:])
            entry = self.target.get(key)
            row = entry[0] if entry is not None else self.counts.get(key)
            if row:
                total = float(sum(row.values()))
                return {t: v / total for t, v in row.items()}
        return None

    # -- drafting -------------------------------------------------------------------------
    def propose(self, context: list[int], max_nodes: int) -> DraftTree:
        start = time.perf_counter()
        self._index(context)
        self.index_s = time.perf_counter() - start  # not drafting: the goodput rule skips it
        if max_nodes <= 0:
            return DraftTree.empty()
        tail = list(context[-self.max_ngram :])
        if self.greedy:
            return self._greedy_tree(tail, max_nodes)
        return self._sampled_tree(tail, max_nodes)

    def _greedy_tree(self, tail: list[int], max_nodes: int) -> DraftTree:
        tokens: list[int] = []
        parents: list[int] = []
        tie = itertools.count()
        heap: list[tuple[float, int, int, int, list[int]]] = []

        def push(path_tail: list[int], parent: int, prob: float) -> None:
            dist = self.distribution(path_tail)
            if not dist:
                return
            best = sorted(dist.items(), key=lambda kv: (-kv[1], kv[0]))[: self.width]
            for token, p in best:
                if prob * p >= self.min_prob:
                    heapq.heappush(heap, (-prob * p, next(tie), token, parent, path_tail))

        push(tail, -1, 1.0)
        while heap and len(tokens) < max_nodes:
            neg, _, token, parent, path_tail = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            push((path_tail + [token])[-self.max_ngram :], len(tokens) - 1, -neg)
        return DraftTree(tokens, parents)

    def _draw(self, dist: dict[int, float]) -> int:
        """One token from a sparse distribution (inverse CDF, the drafter's generator)."""
        u = torch.rand(1, generator=self.generator).item()
        acc = 0.0
        for token, p in dist.items():
            acc += p
            if u < acc:
                return token
        return token  # rounding: u >= the float sum of p

    def _sampled_tree(self, tail: list[int], max_nodes: int) -> DraftTree:
        dist = self.distribution(tail)
        if not dist or self.vocab_size is None:
            return DraftTree.empty()
        tokens: list[int] = []
        parents: list[int] = []
        dists: list[dict[int, float]] = []  # the (sparse) q each node was drawn from
        for _ in range(min(self.width, max_nodes)):  # root siblings, without replacement
            token = self._draw(dist)
            tokens.append(token)
            parents.append(-1)
            dists.append(dist)
            rest = {t: p for t, p in dist.items() if t != token}
            total = sum(rest.values())
            if total <= 0:
                break
            dist = {t: p / total for t, p in rest.items()}
        node, path = 0, (tail + [tokens[0]])[-self.max_ngram :]
        while len(tokens) < max_nodes:  # a chain below the first sibling
            dist = self.distribution(path)
            if not dist:
                break
            token = self._draw(dist)
            tokens.append(token)
            parents.append(node)
            dists.append(dist)
            node = len(tokens) - 1
            path = (path + [token])[-self.max_ngram :]
        q = torch.zeros(len(tokens), self.vocab_size, dtype=torch.float64)
        for row, d in zip(q, dists, strict=True):
            row[list(d)] = torch.tensor(list(d.values()), dtype=torch.float64)
        return DraftTree(tokens, parents, q)
