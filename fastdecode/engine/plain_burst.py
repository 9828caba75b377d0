"""Plain decoding inside the speculative loop, for when the draft-length policy turns
speculation off for the whole batch (SmartSpec's goodput rule at large batch): steps run on
the device in bursts, not one verify round-trip per token."""

from __future__ import annotations

import time

import torch

from fastdecode.engine.graphed import captures
from fastdecode.engine.host_copy import to_device
from fastdecode.engine.sampling import select_tokens
from fastdecode.engine.spec_state import Contexts, ride_lengths
from fastdecode.spec.verify import Verdict

PLAIN_BURST = 8  # plain steps between two looks at the host when speculation is off
PIPELINED_BURSTS = 4  # bursts in flight back to back: the host books one while the next runs


def plain_burst(
    runner, prompts, states, drafter, timing, lengths, last, generators, length_policy, room,
    owed: PlainBooker | None = None, max_steps: int | None = None,
) -> PlainBooker:  # fmt: skip
    """Up to PIPELINED_BURSTS x PLAIN_BURST plain decode steps for every row; finished rows
    stay in place. Pipelined on CUDA: while the GPU runs burst i, the host books burst
    i - 1's tokens (stop checks, drafter updates), which it received through an asynchronous
    copy, so the drafters' bookkeeping costs no GPU time (the batch-aware rule's promise: no
    slower than plain decoding). A row that stops in burst i - 1 rides along in burst i; its
    extra tokens are dropped.

    The last burst is booked with the GPU idle, so its drafter updates are left owed: the
    returned PlainBooker hands them over when flushed -- by the next call while its first
    burst runs (`owed`), or by the loop before the drafter is next needed. max_steps: fewer
    steps (one, to time a plain step for the rule)."""
    device = runner.device
    params = [s.params for s in states]
    active = [b for b, s in enumerate(states) if not s.finished]
    left = min(states[b].params.max_tokens - len(states[b].token_ids) for b in active)
    total = min(PLAIN_BURST * PIPELINED_BURSTS, room, left, max_steps or room)
    booker = PlainBooker(prompts, states, drafter, timing, lengths, last, active)
    t0, captured = time.perf_counter(), captures()
    tokens = to_device(last, device, torch.long)
    positions = to_device(ride_lengths(runner.cache, states, lengths), device, torch.long)
    moving = to_device([not s.finished for s in states], device, torch.long)
    launched, in_flight = 0, []
    while launched < total or in_flight:
        if launched < total and not all(s.finished for s in states):
            steps = min(PLAIN_BURST, total - launched)
            out = torch.empty(len(states), steps, dtype=torch.long, device=device)
            for j in range(steps):
                tokens = select_tokens(runner.decode(tokens, positions), params, generators)
                out[:, j] = tokens
                positions = positions + moving
            in_flight.append(_copy_to_host(out))
            launched += steps
            if owed is not None:  # the last call's updates, while this burst runs
                owed.flush()
                owed = None
            if len(in_flight) < 2 and launched < total:
                continue  # keep one burst queued behind the one being booked
        if not in_flight:
            break
        booker.book(_host_values(*in_flight.pop(0)))
        if in_flight:  # the GPU is busy with the next burst: hand the drafters theirs now
            booker.flush()
    if owed is not None:
        owed.flush()
    elapsed = time.perf_counter() - t0
    timing.verify_s += elapsed
    if captures() == captured:  # the first burst may capture the plain step's graph
        length_policy.record_plain(len(states), elapsed / max(1, launched))
        if hasattr(length_policy, "record_tokens"):
            length_policy.record_tokens(len(states), False, booker.tokens, elapsed, launched)
    for b in active:
        timing.rows[b].verify_s += elapsed
    return booker


def _copy_to_host(out: torch.Tensor):
    """Start copying `out` to the host behind the work queued so far; (buffer, event)."""
    if out.device.type != "cuda":
        return out, None
    host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
    host.copy_(out, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _host_values(host: torch.Tensor, event) -> list[list[int]]:
    """The copied tokens, waiting only for their own copy (not for later queued work)."""
    if event is not None:
        event.synchronize()
    return host.tolist()


class PlainBooker:
    """Books one plain_burst call's tokens: for the requests at once, token by token (stop
    checks, stats, cache lengths); for the drafter in bulk and later, one Verdict per row
    (no accepted drafts, every token since the last flush), so a drafter updates once per
    row per burst -- one suffix-tree `extend` of 8 tokens, not 8 calls and 8 batch-wide
    `accept`s. The contexts handed over end before the owed tokens, as a verify step's."""

    def __init__(self, prompts, states, drafter, timing, lengths, last, active) -> None:
        self.prompts, self.states, self.drafter, self.timing = prompts, states, drafter, timing
        self.lengths, self.last, self.active = lengths, last, active
        self.owed: dict[int, list[int]] = {}  # row -> tokens the drafter has not seen
        self.ends = [len(s.token_ids) for s in states]  # output before the owed tokens
        self.tokens = 0  # booked, over all rows

    def book(self, emitted: list[list[int]]) -> None:
        """Hand each row's plain-step tokens emitted[b] (one burst) to its request."""
        for b in self.active:
            state = self.states[b]
            if state.finished:
                continue
            owed = self.owed.setdefault(b, [])
            count = 0
            for token in emitted[b]:
                if state.finished:
                    break  # dropped: past the stop (the row rode along)
                state.add(token)
                owed.append(token)
                count += 1
            self.tokens += count
            if count:
                self.timing.rows[b].record_plain(count)
                self.lengths[b] += count
                self.last[b] = owed[-1]
        self.timing.steps += len(emitted[0]) if emitted else 0

    def flush(self) -> None:
        """Hand the drafter every owed token (one accept for the whole batch)."""
        verdicts = [None] * len(self.states)
        for b, tokens in self.owed.items():
            if tokens:
                verdicts[b] = Verdict([], tokens)
        if any(v is not None for v in verdicts):
            self.drafter.accept(Contexts(self.prompts, self.states, self.ends), verdicts)
        self.owed = {}
        self.ends = [len(s.token_ids) for s in self.states]
