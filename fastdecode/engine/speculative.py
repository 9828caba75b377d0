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

TriForce's greedy chains skip the host round trips altogether: their drafter hands the loop
a `fused_cycle` (fastdecode.spec.fused_chain), one CUDA graph that drafts, verifies and
accepts, read once per step; while the plan keeps speculating, the next cycle is launched
before this one is read (the graph computes its inputs), so the host's work per step
overlaps the GPU. Rows that finished ride along at slot 0 where the cache allows it
(`ride_lengths`), so they stop reading their whole context.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from fastdecode.engine.generate import _synchronize
from fastdecode.engine.graphed import bucket, captures, trash_slot
from fastdecode.engine.host_copy import to_device
from fastdecode.engine.idle_clock import IdleClock
from fastdecode.engine.plain_burst import plain_burst
from fastdecode.engine.runner import ModelRunner
from fastdecode.engine.sampling import make_generator, select_tokens
from fastdecode.engine.spec_state import Contexts, SpecStats, SpecTiming, ride_lengths
from fastdecode.engine.stopping import RequestState
from fastdecode.spec.drafters.base import Drafter
from fastdecode.spec.drafters.batch import BatchDrafter, PerRowDrafters
from fastdecode.spec.fused_chain import CycleInputs
from fastdecode.spec.tree import DraftTree, verify_step_inputs
from fastdecode.spec.verify import Verdict, verify_batch

RETIME_SHARE = 0.75  # fused cycle + goodput rule: time a plain step again at 3/4 of the rows
PROBE_STEPS = 8  # plain steps the goodput rule's guard runs to measure plain decoding's rate
# (a probe pays one host sync and books its tokens with the GPU idle: short probes
# understate plain decoding's rate, and a low plain rate never vetoes speculation)

if TYPE_CHECKING:
    from fastdecode.spec.length import DraftLengthPolicy


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
    # a drafter whose whole greedy cycle runs on the device (TriForce): fixed depth K, so a
    # length policy may only choose between K and 0 (the batch-aware rule can; per-row
    # policies keep the generic path)
    fused = getattr(drafter, "fused_cycle", None)
    batch_rule = length_policy is None or hasattr(length_policy, "choose_k")
    use = fused is not None and batch_rule and num_draft_tokens > 0
    fused = fused(params, num_draft_tokens) if use else None
    if fused is not None:
        fused.drain()  # a cycle a closed run launched ahead
    verify_forward = runner.multi_forward()
    if fused is None:  # the fused cycle captures its own graph
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
    # rows decoding when a plain step was last timed (0: no re-timing). With the fused
    # cycle the rule sees plain steps only through these timings; as rows finish (and ride
    # at slot 0) plain steps get cheaper, and a stale price can keep the cycle running
    # through the slow rows' tail (suspected in TriForce at 32K x 32: 109 steps for 128
    # tokens, 0.95x plain).
    plain_timed = 0
    if fused is not None and length_policy is not None:
        _time_plain_step(runner, cache, first, length_policy)
        plain_timed = batch
    timing.steps = 1
    mark = time.perf_counter()  # before each yield: a step's price includes the consumer's work
    yield

    owed = None  # drafter updates of the last plain burst, handed over when next useful
    riding = functools.partial(ride_lengths, cache, states)
    idle = getattr(drafter, "idle", None)  # deferred drafter work (a long prompt's index)
    idle_clock = IdleClock(device)
    while not all(s.finished for s in states):
        # a step that captures a graph is not timed for the rule
        step_start, captured = mark, captures()
        # -- draft ------------------------------------------------------------------------
        active = [b for b, s in enumerate(states) if not s.finished]
        budget = _plan(length_policy, active, timing.rows, num_draft_tokens, batch, fused)
        retime = plain_timed and len(active) <= RETIME_SHARE * plain_timed
        if retime:  # one real plain step, timed, then the rule plans with its new price
            budget = dict.fromkeys(active, 0)
        # the rule's plan for this step decides whether the cycle after it starts ahead;
        # a cycle already launched ahead is this step, whatever the plan (a step's lag)
        wants_cycle = any(budget.values())
        if fused is not None and fused.ahead:
            budget = dict.fromkeys(active, num_draft_tokens)
        remaining = [s.params.max_tokens - len(s.token_ids) for s in states]
        rooms = [0] * batch
        for b in active:
            rooms[b] = max(0, min(
                budget[b],
                remaining[b] - 1,  # the target adds one
                trash_slot(cache) - lengths[b] - 1,
            ))  # fmt: skip
        if length_policy is not None and not any(budget.values()):
            # The policy turned speculation off: plain steps in a burst, on the device with
            # one host sync (as engine/generate.py does), not one verify round-trip per token.
            # A drafter that learns from the target's distributions (STAND) misses those of
            # the burst's tokens (it still indexes the tokens themselves): fewer statistics,
            # same output.
            room = trash_slot(cache) - max(lengths) - 1
            owed = plain_burst(runner, prompts, states, drafter, timing, lengths, last,
                               generators, length_policy, room=room, owed=owed,
                               max_steps=_plain_steps(length_policy, retime))  # fmt: skip
            plain_timed = len(active) if plain_timed else 0
            timing.decode_s = time.perf_counter() - start - timing.prefill_s
            mark = time.perf_counter()
            yield
            continue
        if owed is not None:
            owed.flush()
            owed = None
        contexts = Contexts(prompts, states)
        drafting_s = 0.0  # priced per level by the rule; the fused cycle's is in its step
        if fused is not None:
            # draft + verify + accept in one device pass (greedy chains), timed as verify;
            # also when no row has room (the last token): its graph is already captured,
            # while a plain step would capture one in the middle of decoding
            t0 = time.perf_counter()
            inputs = CycleInputs(last, riding(lengths), rooms, remaining,
                                 [not s.finished for s in states])  # fmt: skip
            # the next cycle starts before this one is read unless every row ends here
            # an exploring step stands alone: the plan after it decides
            exploring = getattr(length_policy, "exploring", False)
            run_ahead = fused.run_ahead and wants_cycle and not exploring
            run_ahead = run_ahead and any(remaining[b] > 1 + rooms[b] for b in active)
            trees, verdicts = _fused_step(fused, inputs, run_ahead)
            width = num_draft_tokens  # what the cycle costs, whatever the rows' rooms
            timing.fused_steps += 1
        else:
            trees, drafting_s = _draft(
                drafter, contexts, rooms, lengths, timing, length_policy, active
            )
            # -- verify: one target pass over every row's tree ----------------------------
            t0 = time.perf_counter()
            width = max(len(tree) for tree in trees)
            busy = idle is not None and drafter.idle_work  # events only while there is work
            gpu_clock = idle_clock.start() if busy else None
            if width:  # built on the host at the graph's width: loaded in two copies
                columns = bucket(1 + width) if verify_forward.enabled else None
                inputs = verify_step_inputs(trees, last, riding(lengths), columns,
                                            trash_slot(cache))  # fmt: skip
                logits = verify_forward(*inputs)
            else:  # no drafts anywhere: a plain decode step (its fast path / CUDA graph)
                lengths_t = to_device(riding(lengths), device, torch.long)
                logits = runner.decode(to_device(last, device, torch.long), lengths_t)[:, None]
            if busy:  # the GPU verifies: the host's wait, given to the drafters
                idle(idle_clock.budget(gpu_clock))
            verdicts = verify_batch(trees, logits, params, generators, drafter.want_probs)
            _compact(cache, verdicts, lengths, device)
            _synchronize(device)
            if busy:
                idle_clock.stop(gpu_clock)
        elapsed = time.perf_counter() - t0
        timing.verify_s += elapsed

        # -- emit -------------------------------------------------------------------------
        drafter.accept(contexts, [v if b in active else None for b, v in enumerate(verdicts)])
        emitted_now = 0
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
            stats.record(tree, len(verdict.accepted), emitted, asked=rooms[b] > 0)
            if length_policy is not None and hasattr(length_policy, "record_row"):
                length_policy.record_row(b, tree.max_depth, len(verdict.accepted))
            lengths[b] += 1 + len(verdict.accepted)
            last[b] = verdict.tokens[-1]
            emitted_now += emitted
        if length_policy is not None and captures() == captured:
            # What the step cost beyond its drafting: the verify, the drafters' bookkeeping
            # (STAND's pull of the target's distributions, catching up after plain bursts)
            # and the host's loop. Plain bursts are timed whole too, so the rule weighs the
            # real price of a speculative step (with the verify alone timed, it chose
            # draft-model steps at batch 8 that lost 42% to plain decoding; spec_batch_h100).
            whole_s = time.perf_counter() - step_start
            if width:
                length_policy.record_verify(batch, 1 + width, whole_s - drafting_s)
            elif not any(rooms):  # a plain step outside a burst (no row had room to draft)
                length_policy.record_plain(batch, whole_s - drafting_s)
            # a step that asked for drafts and got none is speculation's cost, not plain's
            if hasattr(length_policy, "record_tokens"):
                speculating = bool(width) or any(rooms)
                length_policy.record_tokens(batch, speculating, emitted_now, whole_s)
        timing.steps += 1
        timing.decode_s = time.perf_counter() - start - timing.prefill_s
        mark = time.perf_counter()
        yield

    if owed is not None:  # e.g. the global suffix tree gets every request's whole output
        owed.flush()
    if fused is not None:
        fused.drain()
    for b, state in enumerate(states):
        timing.rows[b].cache_length = lengths[b]
        state.finalize()
    timing.decode_s = time.perf_counter() - start - timing.prefill_s


def _plain_steps(policy, retime: bool) -> int | None:
    """How many plain steps the next burst may run: PROBE_STEPS when the rule probes plain
    decoding's realized rate, one to re-time a plain step, else a full burst (None)."""
    if getattr(policy, "probing", False):
        return PROBE_STEPS
    return 1 if retime else None


def _time_plain_step(runner: ModelRunner, cache, tokens: list[int], policy) -> None:
    """Capture the plain decode step now (K = 0 runs it; not mid-decode) and hand the rule
    its time: a fused cycle is recorded as one wide step, and the rule, which never saw a
    plain one, would price it from the verify-cost shape and never try it. The step runs at
    the trash slot (reading past every row): its output is dropped."""
    device = runner.device
    inputs = to_device(tokens, device, torch.long)
    trash = to_device([trash_slot(cache)] * len(tokens), device, torch.long)
    runner.decode(inputs, trash)
    _synchronize(device)
    start = time.perf_counter()
    runner.decode(inputs, trash)
    _synchronize(device)
    policy.record_plain(len(tokens), time.perf_counter() - start)


def _draft(
    drafter: BatchDrafter,
    contexts: Contexts,
    rooms: list[int],
    lengths: list[int],
    timing: SpecTiming,
    length_policy,
    active: list[int],
) -> tuple[list[DraftTree], float]:
    """Every row's draft tree (empty where its room is 0), and the seconds spent drafting
    (a backlog's catch-up left out: the rule prices drafting per level)."""
    t0, captured = time.perf_counter(), captures()
    trees = drafter.propose(contexts, rooms, lengths) if any(rooms) else None
    if trees is None:
        trees = [DraftTree.empty() for _ in rooms]
    elapsed = time.perf_counter() - t0
    timing.draft_s += elapsed
    levels = max(tree.max_depth for tree in trees)
    drafting = max(0.0, elapsed - getattr(drafter, "catch_up_s", 0.0)) if levels else 0.0
    timed = captures() == captured  # a draft model's first pass captures its graph
    if levels and timed and hasattr(length_policy, "record_draft"):
        length_policy.record_draft(len(rooms), levels, drafting)
    rows = [b for b in active if rooms[b] > 0]
    for b in rows:  # rows share the batched drafting time
        timing.rows[b].draft_s += elapsed / len(rows)
    return trees, drafting


def _fused_step(
    fused, inputs: CycleInputs, run_ahead: bool
) -> tuple[list[DraftTree], list[Verdict]]:
    """One device-side greedy cycle (fastdecode.spec.fused_chain) as trees + verdicts."""
    chains, accepted, bonus = fused(inputs, run_ahead=run_ahead)
    trees = [DraftTree.chain(chain) for chain in chains]
    verdicts = [
        Verdict(list(range(n)), chain[:n] + [token])
        for chain, n, token in zip(chains, accepted, bonus, strict=True)
    ]
    return trees, verdicts


def _plan(
    policy, active: list[int], rows: list[SpecStats], max_k: int, batch: int, fused=None
) -> dict[int, int]:
    if policy is None:
        return {b: max_k for b in active}
    stats = [rows[b] for b in active]
    if hasattr(policy, "choose_k"):  # batch-aware: finished rows still ride in the forward
        if fused is None:
            return policy.plan(active, stats, max_k, batch=batch)
        # the fused cycle: K or plain; it drafts at no host cost, so it explores by steps
        return policy.plan(
            active, stats, max_k, batch=batch, candidates=(0, max_k), explore_by_steps=True
        )
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
        as_tensor = functools.partial(to_device, device=device, dtype=torch.long)
        cache.move(as_tensor(rows), as_tensor(src), as_tensor(dst))
