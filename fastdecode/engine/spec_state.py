"""What the speculative loop records per request and batch, and how drafters read contexts."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from fastdecode.engine.generate import BatchTiming
from fastdecode.engine.stopping import RequestState
from fastdecode.spec.tree import DraftTree


@dataclass
class SpecStats:
    """One request's speculation record.

    steps: verify steps taken while the request was unfinished; emitted: tokens those steps
    produced (after stop truncation), so tau = emitted / steps (plain decoding: 1.0).
    proposed[k] / accepted[k]: steps with a draft node at depth k + 1 / steps that accepted
    one. draft_s: this request's drafting time; verify_s: wall time of the verify steps it
    took part in (the batch shares them). cache_length: slots of the request in the cache
    that hold accepted tokens (all but the last emitted token). unproposed: verify steps
    where the row had room to draft but its drafter proposed nothing (SuffixDecoding with
    no match): the goodput rule counts them as rejected drafts. plain_steps: the steps
    (among `steps`) that were plain decoding in a K = 0 burst.
    """

    steps: int = 0
    emitted: int = 0
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    cache_length: int = 0
    unproposed: int = 0
    plain_steps: int = 0

    @property
    def tau(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> list[float]:
        """Per draft position: accepted / proposed."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    def record(
        self, tree: DraftTree, accepted_depth: int, emitted: int, asked: bool = False
    ) -> None:
        """One verify step; `asked`: the row had room to draft this step."""
        self.steps += 1
        self.emitted += emitted
        if asked and not tree.max_depth:
            self.unproposed += 1
        grow = tree.max_depth - len(self.proposed)
        if grow > 0:
            self.proposed += [0] * grow
            self.accepted += [0] * grow
        for depth in range(tree.max_depth):
            self.proposed[depth] += 1
        for depth in range(accepted_depth):
            self.accepted[depth] += 1

    def record_plain(self, steps: int) -> None:
        """`steps` plain decode steps of one token each (a K = 0 burst), in one call."""
        self.steps += steps
        self.emitted += steps
        self.plain_steps += steps


@dataclass
class SpecTiming(BatchTiming):
    """fused_steps: steps whose draft ran inside the verify pass (one device-side greedy
    cycle, `fastdecode.spec.fused_chain`): their whole time is in verify_s."""

    draft_s: float = 0.0
    verify_s: float = 0.0
    fused_steps: int = 0
    rows: list[SpecStats] = field(default_factory=list)


class Contexts(Sequence[list[int]]):
    """Each row's prompt + output *as the states are now*, built only for the rows a drafter
    reads: copying every row's long context on every step costs as much as a GPU step at
    batch 32 with 8K-token prompts. Read it before the step's tokens are added, or give
    `ends` (each row's output tokens to show) when handing over tokens added earlier."""

    def __init__(
        self,
        prompts: list[list[int]],
        states: list[RequestState],
        ends: Sequence[int] | None = None,
    ) -> None:
        self.prompts = prompts
        self.states = states
        self.ends = ends

    def __len__(self) -> int:
        return len(self.prompts)

    def last(self, row: int) -> int:
        """The row's last token (the next tree's root), without copying its context."""
        output = self.states[row].token_ids
        end = len(output) if self.ends is None else self.ends[row]
        return output[end - 1] if end > 0 else self.prompts[row][-1]

    def __getitem__(self, row: int) -> ContextView:  # type: ignore[override]
        output = self.states[row].token_ids
        end = len(output) if self.ends is None else self.ends[row]
        return ContextView(self.prompts[row], output, end)


class ContextView(Sequence[int]):
    """prompt + output[:end] without copying either: a drafter reads a few tokens of it per
    step (its tail, the tokens added since its last look), and a 32K-token prompt copied for
    every row on every step cost milliseconds. Slices return lists."""

    __slots__ = ("prompt", "output", "end")

    def __init__(self, prompt: list[int], output: list[int], end: int) -> None:
        self.prompt = prompt
        self.output = output
        self.end = end

    def __len__(self) -> int:
        return len(self.prompt) + self.end

    def __iter__(self):
        return itertools.chain(self.prompt, itertools.islice(self.output, self.end))

    def __getitem__(self, index):  # type: ignore[override]
        split = len(self.prompt)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return list(self)[index]
            if stop <= start:
                return []
            if start >= split:
                return self.output[start - split : stop - split]
            if stop <= split:
                return self.prompt[start:stop]
            return self.prompt[start:] + self.output[: stop - split]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"context index {index} out of range ({len(self)} tokens)")
        return self.prompt[index] if index < split else self.output[index - split]


def ride_lengths(cache, states: Sequence[RequestState], lengths: list[int]) -> list[int]:
    """The lengths a batched step runs the rows at: a finished row rides at slot 0 where the
    cache allows it (`finished_rows_scratch`), so its attention reads one slot, not its whole
    context -- at long context the rows still decoding then pay for themselves only."""
    if not getattr(cache, "finished_rows_scratch", False):
        return lengths
    return [0 if state.finished else n for state, n in zip(states, lengths, strict=True)]
