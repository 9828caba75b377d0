"""The decoding loop for a batch of requests: prefill, then one token per row per step.

Tokens stay on the device between steps; the host looks at them only every `check_every`
steps (stop conditions, streaming), so the GPU is never idle waiting for Python.
Rows that finished keep riding along until the batch ends (static batching; the serving
scheduler replaces this with continuous batching) -- at slot 0 where the cache allows it, so
that their attention stops reading their whole context.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastdecode.engine.host_copy import to_device
from fastdecode.engine.runner import ModelRunner
from fastdecode.engine.sampling import make_generator, select_tokens
from fastdecode.engine.stopping import RequestState


@dataclass
class BatchTiming:
    prefill_s: float = 0.0  # until the first token of every row is on the host (TTFT)
    decode_s: float = 0.0
    steps: int = 0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_batch(
    runner: ModelRunner,
    prompts: list[list[int]],
    states: list[RequestState],
    timing: BatchTiming,
    check_every: int = 1,
) -> Iterator[None]:
    """Decode `prompts` into `states`, yielding each time new tokens reached the states."""
    device = runner.device
    params = [s.params for s in states]
    max_new = max(p.max_tokens for p in params)
    longest = max(len(p) for p in prompts)
    runner.allocate(len(prompts), longest + max_new, prompt_len=longest)
    generators = [make_generator(p, device) for p in params]

    start = time.perf_counter()
    tokens = select_tokens(runner.prefill(prompts), params, generators)
    positions = torch.tensor([len(p) for p in prompts], device=device)
    history = torch.empty(len(prompts), max_new, dtype=torch.long, device=device)
    history[:, 0] = tokens
    step, checked = 1, 0
    scratch = getattr(runner.cache, "finished_rows_scratch", False)
    advance: torch.Tensor | int = 1  # per row once some finished: 0 for those (at slot 0)
    parked = 0  # finished rows already moved to slot 0
    while True:
        if checked == 0 or step - checked >= check_every or step == max_new:
            new_tokens = history[:, checked:step].tolist()  # the only host sync
            now = time.perf_counter()
            if checked == 0:
                timing.prefill_s = now - start
            timing.decode_s = now - start - timing.prefill_s
            for state, row in zip(states, new_tokens, strict=True):
                for token in row:
                    if state.finished:
                        break
                    state.add(token)
            checked = step
            timing.steps = step
            yield
            if step == max_new or all(s.finished for s in states):
                break
            finished = sum(s.finished for s in states)
            if scratch and finished > parked:  # newly finished rows: park them at slot 0
                alive = to_device([not s.finished for s in states], device, torch.long)
                positions = positions * alive
                advance, parked = alive, finished
        logits = runner.decode(tokens, positions)
        tokens = select_tokens(logits, params, generators)
        positions += advance
        history[:, step] = tokens
        step += 1
    for state in states:
        state.finalize()
    _synchronize(device)
