"""The speculative decoding loop for a batch of requests (the ModelRunner keeps the cache,
runs the prefill and, on CUDA, replays the verify step as a CUDA graph per shape).

Each step: every unfinished row's drafter proposes a tree (possibly empty); rows are padded
to one width T = 1 + max nodes, column 0 being the last accepted token (the plain decode
input); one target forward scores every column (tree attention mask: SpecInfer / Medusa);
each row is verified on its own (fastdecode.spec.verify — greedy or lossless speculative
sampling) and accepts a different number of nodes; the accepted nodes' K/V are then moved
to consecutive slots right after the row's previous length, so the visible cache holds
exactly the accepted tokens (nothing stale is ever visible: the mask shows slots < length).
The target's own token (bonus or correction) becomes the next step's column 0.

Stop conditions go through RequestState as in engine/generate.py; a row may finish in the
middle of an accepted run, and the tokens after the stop are dropped. Finished rows ride
along with no drafts and do not advance.

The loop talks to one BatchDrafter per batch (fastdecode.spec.drafters.batch): model drafters
draft every row in shared forward passes; model-free ones run per row behind PerRowDrafters
(which also feeds STAND the target's distributions). A draft-length policy
(fastdecode.spec.length) may pick each row's K every step, down to 0 (a plain decode step)
when the batch is large enough that verification stops being nearly free.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fastdecode.engine.generate import BatchTiming, _synchronize
from fastdecode.engine.graphed import trash_slot
from fastdecode.engine.runner import ModelRunner
from fastdecode.engine.sampling import make_generator, select_tokens
from fastdecode.engine.stopping import RequestState
from fastdecode.spec.drafters.base import Drafter
from fastdecode.spec.drafters.batch import BatchDrafter, PerRowDrafters
from fastdecode.spec.tree import DraftTree, pad_trees
from fastdecode.spec.verify import Verdict, verify_batch

if TYPE_CHECKING:
    from fastdecode.spec.length import DraftLengthPolicy


@dataclass
class SpecStats:
    """One request's speculation record.

    steps: verify steps taken while the request was unfinished; emitted: tokens those steps
    produced (after stop truncation), so tau = emitted / steps (plain decoding: 1.0).
    proposed[k] / accepted[k]: steps with a draft node at depth k + 1 / steps that accepted
    one. draft_s: this request's drafting time; verify_s: wall time of the verify steps it
    took part in (the batch shares them). cache_length: slots of the request in the cache
    that hold accepted tokens (all but the last emitted token).
    """

    steps: int = 0
    emitted: int = 0
    proposed: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    draft_s: float = 0.0
    verify_s: float = 0.0
    cache_length: int = 0

    @property
    def tau(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    @property
    def acceptance(self) -> list[float]:
        """Per draft position: accepted / proposed."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed, strict=True)]

    def record(self, tree: DraftTree, accepted_depth: int, emitted: int) -> None:
        self.steps += 1
        self.emitted += emitted
        grow = tree.max_depth - len(self.proposed)
        if grow > 0:
            self.proposed += [0] * grow
            self.accepted += [0] * grow
        for depth in range(tree.max_depth):
            self.proposed[depth] += 1
        for depth in range(accepted_depth):
            self.accepted[depth] += 1


@dataclass
class SpecTiming(BatchTiming):
    draft_s: float = 0.0
    verify_s: float = 0.0
    rows: list[SpecStats] = field(default_factory=list)


@torch.inference_mode()
def run_speculative(
    runner: ModelRunner,
    prompts: list[list[int]],
    states: list[RequestState],
    timing: SpecTiming,
    drafter: BatchDrafter | Sequence[Drafter],
    num_draft_tokens: int,
    length_policy: DraftLengthPolicy | None = None,
) -> Iterator[None]:
    """Decode `prompts` into `states` speculatively, yielding after every step.

    drafter: a BatchDrafter, or one model-free Drafter per row. length_policy (default:
    always `num_draft_tokens`) picks each row's draft budget K every step."""
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    if not isinstance(drafter, BatchDrafter):
        drafter = PerRowDrafters(drafter)
    device = runner.device
    params = [s.params for s in states]
    batch = len(prompts)
    max_new = max(p.max_tokens for p in params)
    longest = max(len(p) for p in prompts)
    # + the draft columns of the last step, + one trash slot for padded verify columns
    needed = longest + max_new + num_draft_tokens + 2
    allocate = getattr(drafter, "allocate", None)
    cache = allocate(runner, batch, needed, longest) if allocate else runner.allocate(batch, needed)
    verify_forward = runner.multi_forward()
    verify_forward.prepare(batch, 1 + num_draft_tokens)
    generators = [make_generator(p, device) for p in params]
    timing.rows = [SpecStats() for _ in prompts]

    start = time.perf_counter()
    prefill_logits = runner.prefill(prompts)
    first = select_tokens(prefill_logits, params, generators).tolist()
    timing.prefill_s = time.perf_counter() - start
    lengths = [len(p) for p in prompts]
    last = list(first)
    for state, token in zip(states, first, strict=True):
        state.add(token)
    drafter.begin(prompts, params, generators, first, prefill_logits)
    timing.steps = 1
    yield

    while not all(s.finished for s in states):
        # -- draft ------------------------------------------------------------------------
        active = [b for b, s in enumerate(states) if not s.finished]
        budget = _plan(length_policy, active, timing.rows, num_draft_tokens, batch)
        rooms = [0] * batch
        for b in active:
            rooms[b] = max(0, min(
                budget[b],
                states[b].params.max_tokens - len(states[b].token_ids) - 1,  # target adds one
                trash_slot(cache) - lengths[b] - 1,
            ))  # fmt: skip
        if length_policy is not None and not any(budget.values()) and not any(drafter.want_probs):
            # The policy turned speculation off: plain steps in a burst, on the device with
            # one host sync (as engine/generate.py does), not one verify round-trip per token.
            _plain_burst(runner, prompts, states, drafter, timing, lengths, last, generators,
                         length_policy, room=trash_slot(cache) - max(lengths) - 1)  # fmt: skip
            timing.decode_s = time.perf_counter() - start - timing.prefill_s
            yield
            continue
        contexts = Contexts(prompts, states)
        t0 = time.perf_counter()
        trees = drafter.propose(contexts, rooms, lengths) if any(rooms) else None
        if trees is None:
            trees = [DraftTree.empty() for _ in range(batch)]
        elapsed = time.perf_counter() - t0
        timing.draft_s += elapsed
        levels = max(tree.max_depth for tree in trees)
        if levels and hasattr(length_policy, "record_draft"):
            length_policy.record_draft(batch, levels, elapsed)
        drafting = [b for b in active if rooms[b] > 0]
        for b in drafting:  # rows share the batched drafting time
            timing.rows[b].draft_s += elapsed / len(drafting)

        # -- verify: one target pass over every row's tree --------------------------------
        t0 = time.perf_counter()
        lengths_t = torch.tensor(lengths, device=device)
        width = max(len(tree) for tree in trees)
        if width:
            tokens, positions, slots, mask = pad_trees(trees).verify_inputs(
                torch.tensor(last), lengths_t
            )
            logits = verify_forward(tokens, positions, slots, mask)
        else:  # no drafts anywhere: a plain decode step (its fast path / CUDA graph)
            logits = runner.decode(torch.tensor(last, device=device), lengths_t)[:, None]
        verdicts = verify_batch(trees, logits, params, generators, drafter.want_probs)
        _compact(cache, verdicts, lengths, device)
        _synchronize(device)
        elapsed = time.perf_counter() - t0
        timing.verify_s += elapsed
        if length_policy is not None:
            if width:
                length_policy.record_verify(batch, 1 + width, elapsed)
            else:
                length_policy.record_plain(batch, elapsed)

        # -- emit -------------------------------------------------------------------------
        drafter.accept(contexts, [v if b in active else None for b, v in enumerate(verdicts)])
        for b in active:
            state, verdict, tree = states[b], verdicts[b], trees[b]
            emitted = 0
            for token in verdict.tokens:
                if state.finished:
                    break
                state.add(token)
                emitted += 1
            stats = timing.rows[b]
            stats.verify_s += elapsed
            stats.record(tree, len(verdict.accepted), emitted)
            if length_policy is not None and hasattr(length_policy, "record_row"):
                length_policy.record_row(b, tree.max_depth, len(verdict.accepted))
            lengths[b] += 1 + len(verdict.accepted)
            last[b] = verdict.tokens[-1]
        timing.steps += 1
        timing.decode_s = time.perf_counter() - start - timing.prefill_s
        yield

    for b, state in enumerate(states):
        timing.rows[b].cache_length = lengths[b]
        state.finalize()
    timing.decode_s = time.perf_counter() - start - timing.prefill_s


class Contexts(Sequence[list[int]]):
    """Each row's prompt + output *as the states are now*, built only for the rows a drafter
    reads: copying every row's long context on every step costs as much as a GPU step at
    batch 32 with 8K-token prompts. Read it before the step's tokens are added."""

    def __init__(self, prompts: list[list[int]], states: list[RequestState]) -> None:
        self.prompts = prompts
        self.states = states

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, row: int) -> list[int]:  # type: ignore[override]
        return self.prompts[row] + self.states[row].token_ids


def _plan(
    policy, active: list[int], rows: list[SpecStats], max_k: int, batch: int
) -> dict[int, int]:
    if policy is None:
        return {b: max_k for b in active}
    stats = [rows[b] for b in active]
    if hasattr(policy, "choose_k"):  # batch-aware: finished rows still ride in the forward
        return policy.plan(active, stats, max_k, batch=batch)
    return policy.plan(active, stats, max_k)


def _compact(cache, verdicts, lengths: list[int], device: torch.device) -> None:
    """Move each row's accepted nodes' K/V to consecutive slots right after its prefix."""
    rows, src, dst = [], [], []
    for b, verdict in enumerate(verdicts):
        for j, node in enumerate(verdict.accepted, start=1):
            if node + 1 != j:
                rows.append(b)
                src.append(lengths[b] + 1 + node)
                dst.append(lengths[b] + j)
    if rows:
        as_tensor = functools.partial(torch.tensor, device=device)
        cache.move(as_tensor(rows), as_tensor(src), as_tensor(dst))


PLAIN_BURST = 8  # plain steps between two looks at the host when speculation is off
PIPELINED_BURSTS = 4  # bursts in flight back to back: the host books one while the next runs


def _plain_burst(
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
