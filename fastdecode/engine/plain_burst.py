"""Plain decoding inside the speculative loop, for when the draft-length policy turns
speculation off for the whole batch (SmartSpec's goodput rule at large batch): steps run on
the device in bursts, not one verify round-trip per token."""

from __future__ import annotations

import time

import torch

from fastdecode.engine.sampling import select_tokens
from fastdecode.engine.spec_state import Contexts
from fastdecode.spec.tree import DraftTree
from fastdecode.spec.verify import Verdict

PLAIN_BURST = 8  # plain steps between two looks at the host when speculation is off
PIPELINED_BURSTS = 4  # bursts in flight back to back: the host books one while the next runs


def plain_burst(
    runner, prompts, states, drafter, timing, lengths, last, generators, length_policy, room
) -> None:
    """Up to PIPELINED_BURSTS x PLAIN_BURST plain decode steps for every row; finished rows
    stay in place. The drafters still see every emitted token (one Verdict with no drafts
    per step). Pipelined on CUDA: while the GPU runs burst i, the host books burst i - 1's
    tokens (drafter updates, stop checks), which it received through an asynchronous copy,
    so the drafters' per-token bookkeeping costs no GPU time (the batch-aware rule's
    promise: no slower than plain decoding). A row that stops in burst i - 1 rides along in
    burst i; its extra tokens are dropped."""
    device = runner.device
    params = [s.params for s in states]
    active = [b for b, s in enumerate(states) if not s.finished]
    left = min(states[b].params.max_tokens - len(states[b].token_ids) for b in active)
    total = min(PLAIN_BURST * PIPELINED_BURSTS, room, left)
    t0 = time.perf_counter()
    tokens = torch.tensor(last, device=device)
    positions = torch.tensor(lengths, device=device)
    moving = torch.tensor([not s.finished for s in states], device=device).long()
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
            if len(in_flight) < 2 and launched < total:
                continue  # keep one burst queued behind the one being booked
        if not in_flight:
            break
        emitted = _host_values(*in_flight.pop(0))
        _book_plain_steps(prompts, states, drafter, timing, lengths, last, active, emitted)
    elapsed = time.perf_counter() - t0
    timing.verify_s += elapsed
    length_policy.record_plain(len(states), elapsed / max(1, launched))
    for b in active:
        timing.rows[b].verify_s += elapsed


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


def _book_plain_steps(prompts, states, drafter, timing, lengths, last, active, emitted) -> None:
    """Hand each plain step's tokens [B][steps] to the drafters and the requests."""
    empty = DraftTree.empty()
    for j in range(len(emitted[0]) if emitted else 0):
        contexts = Contexts(prompts, states)
        verdicts = [None] * len(states)
        for b in active:
            if not states[b].finished:
                verdicts[b] = Verdict([], [emitted[b][j]])
        drafter.accept(contexts, verdicts)
        for b in active:
            if verdicts[b] is None:
                continue
            states[b].add(emitted[b][j])
            timing.rows[b].record(empty, 0, 1)
            lengths[b] += 1
            last[b] = emitted[b][j]
        timing.steps += 1
