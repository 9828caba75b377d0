"""The speculative decoding loop for a batch of requests (eager; the ModelRunner keeps the
cache and runs the prefill).

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

Optional drafter hooks (fastdecode.spec.drafters.base): `configure(params)` once per request;
and for drafters with `wants_target_probs` (STAND), `observe(context, tokens, probs)` with the
target's distributions at the emitted positions (after the prefill and after every verify
step), computed only for those rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from fastdecode.engine.generate import BatchTiming, _synchronize
from fastdecode.engine.runner import ModelRunner
from fastdecode.engine.sampling import make_generator, select_tokens
from fastdecode.engine.stopping import RequestState
from fastdecode.spec.drafters import Drafter
from fastdecode.spec.tree import DraftTree, pad_trees
from fastdecode.spec.verify import target_probs, verify_batch


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
    drafters: Sequence[Drafter],
    num_draft_tokens: int,
) -> Iterator[None]:
    """Decode `prompts` into `states` speculatively, yielding after every step."""
    if num_draft_tokens < 0:
        raise ValueError(f"num_draft_tokens must be >= 0, got {num_draft_tokens}")
    device = runner.device
    model = runner.model
    params = [s.params for s in states]
    batch = len(prompts)
    max_new = max(p.max_tokens for p in params)
    cache = runner.allocate(batch, max(len(p) for p in prompts) + max_new + num_draft_tokens + 1)
    generators = [make_generator(p, device) for p in params]
    timing.rows = [SpecStats() for _ in prompts]
    for drafter, p in zip(drafters, params, strict=True):
        drafter.reset()
        if hasattr(drafter, "configure"):
            drafter.configure(p)
    # rows whose drafter observes the target's distributions (STAND)
    observing = [getattr(d, "wants_target_probs", False) for d in drafters]

    start = time.perf_counter()
    prefill_logits = runner.prefill(prompts)
    first = select_tokens(prefill_logits, params, generators).tolist()
    timing.prefill_s = time.perf_counter() - start
    lengths = [len(p) for p in prompts]
    last = list(first)
    for b, (state, token, drafter) in enumerate(zip(states, first, drafters, strict=True)):
        if observing[b]:
            drafter.observe(prompts[b], [token], target_probs(prefill_logits[b : b + 1], params[b]))
        state.add(token)
        drafter.update([token])
    timing.steps = 1
    yield

    while not all(s.finished for s in states):
        # -- draft ------------------------------------------------------------------------
        trees = []
        for b, (state, drafter) in enumerate(zip(states, drafters, strict=True)):
            room = min(
                num_draft_tokens,
                state.params.max_tokens - len(state.token_ids) - 1,  # the target adds one
                cache.capacity - lengths[b] - 1,
            )
            if state.finished or room <= 0:
                trees.append(DraftTree.empty())
                continue
            t0 = time.perf_counter()
            tree = drafter.propose(prompts[b] + state.token_ids, room).truncate(room)
            elapsed = time.perf_counter() - t0
            timing.rows[b].draft_s += elapsed
            timing.draft_s += elapsed
            trees.append(tree)

        # -- verify: one target pass over every row's tree --------------------------------
        t0 = time.perf_counter()
        lengths_t = torch.tensor(lengths, device=device)
        if any(len(tree) for tree in trees):
            tokens, positions, slots, mask = pad_trees(trees).verify_inputs(
                torch.tensor(last), lengths_t, cache.capacity
            )
            logits = model.forward(tokens, positions, cache, slots=slots, mask=mask)
        else:  # no drafts anywhere: a plain decode step (its fast path / CUDA graph)
            logits = runner.decode(torch.tensor(last, device=device), lengths_t)[:, None]
        verdicts = verify_batch(trees, logits, params, generators, observing)

        # -- compact: accepted nodes' K/V to consecutive slots after the prefix -----------
        rows, src, dst = [], [], []
        for b, verdict in enumerate(verdicts):
            for j, node in enumerate(verdict.accepted, start=1):
                if node + 1 != j:
                    rows.append(b)
                    src.append(lengths[b] + 1 + node)
                    dst.append(lengths[b] + j)
        if rows:
            cache.move(
                torch.tensor(rows, device=device),
                torch.tensor(src, device=device),
                torch.tensor(dst, device=device),
            )
        _synchronize(device)
        elapsed = time.perf_counter() - t0
        timing.verify_s += elapsed

        # -- emit -------------------------------------------------------------------------
        for b, (state, verdict, tree) in enumerate(zip(states, verdicts, trees, strict=True)):
            if state.finished:
                continue
            if observing[b]:
                drafters[b].observe(prompts[b] + state.token_ids, verdict.tokens, verdict.probs)
            emitted = 0
            for token in verdict.tokens:
                if state.finished:
                    break
                state.add(token)
                emitted += 1
            stats = timing.rows[b]
            stats.verify_s += elapsed
            stats.record(tree, len(verdict.accepted), emitted)
            drafters[b].update(verdict.tokens)
            lengths[b] += 1 + len(verdict.accepted)
            last[b] = verdict.tokens[-1]
        timing.steps += 1
        timing.decode_s = time.perf_counter() - start - timing.prefill_s
        yield

    for b, state in enumerate(states):
        timing.rows[b].cache_length = lengths[b]
        state.finalize()
    timing.decode_s = time.perf_counter() - start - timing.prefill_s
