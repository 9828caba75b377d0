"""Dev profile of the long-context decode step on random weights of the Qwen2.5-0.5B shape
(no checkpoint to move): ms per decode step of full attention and each sparse policy at a
1/16 budget, with the CUDA kernel table of five steps, or TriForce's cycle (draft / verify
split and the CPU + CUDA tables). Speed does not depend on the weights' values; the
committed speed numbers come from benchmarks/longcontext.py on the real model.

    python benchmarks/sparse_profile.py policies 32000 32
    python benchmarks/sparse_profile.py triforce 32000 32
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_profile import random_model  # noqa: E402

from fastdecode.engine.runner import ModelRunner  # noqa: E402
from fastdecode.engine.speculative import SpecTiming, run_speculative  # noqa: E402
from fastdecode.engine.stopping import RequestState  # noqa: E402
from fastdecode.kv.policies import KVPolicyConfig  # noqa: E402
from fastdecode.params import SamplingParams  # noqa: E402
from fastdecode.spec.config import SpeculativeConfig  # noqa: E402

PROFILE = torch.profiler.ProfilerActivity


class _NoText:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def sync() -> None:
    torch.cuda.synchronize()


def policies(runner: ModelRunner, prompts: list[list[int]], context: int) -> None:
    batch = len(prompts)
    for name in (None, "tidal", "streaming_read", "snapkv"):
        if name is None:
            runner.allocate(batch, context + 64)
        else:
            runner.allocate(batch, context + 64, context, kv_policy=KVPolicyConfig(name, 1 / 16))
        runner.prefill(prompts)
        tokens = torch.randint(0, 1000, (batch,), device="cuda")
        positions = torch.full((batch,), context, device="cuda")
        for i in range(4):
            runner.decode(tokens, positions + i)
        sync()
        start = time.perf_counter()
        for i in range(20):
            runner.decode(tokens, positions + 4 + i)
        sync()
        print(f"{name or 'full'}: {(time.perf_counter() - start) / 20 * 1e3:.3f} ms/step")
        with torch.profiler.profile(activities=[PROFILE.CUDA]) as prof:
            for i in range(5):
                runner.model.decode_step(tokens, positions + 24 + i, runner.cache)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)


def _timed(owner, name: str, totals: dict, label: str | None = None, fence: bool = True):
    """Wrap owner.name, adding its wall time to totals[label] (default "Owner.name"); with
    `fence`, device syncs on both sides: per-phase times that include the host's share (a
    sync-free run overlaps them). Returns the original, to restore."""
    inner = getattr(owner, name)
    key = label or f"{getattr(owner, '__name__', owner)}.{name}"

    def wrapper(*args, **kwargs):
        if fence:
            sync()
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            if fence:
                sync()
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    return inner


def _run_triforce(runner, prompts, spec, warm: int = 4, around=None):
    """One TriForce generation; returns (ms per step after `warm` steps, steps, timing).
    around: a context manager entered for the timed steps only (a profiler)."""
    batch = len(prompts)
    params = SamplingParams(max_tokens=48, temperature=0)
    states = [RequestState(params, set(), _NoText()) for _ in range(batch)]
    timing = SpecTiming()
    drafter = spec.batch_drafter(runner, None, batch)
    steps = run_speculative(runner, prompts, states, timing, drafter, 4)
    return (*timed_steps(steps, warm, around), timing)


def timed_steps(steps, warm: int, around=None) -> tuple[float, int]:
    """Run a speculative loop's steps: the prefill and `warm` steps (graph captures) untimed,
    the rest inside `around`; (ms per timed step, timed steps)."""
    for _ in range(1 + warm):
        next(steps)
    sync()
    start, n = time.perf_counter(), 0
    with around or contextlib.nullcontext():
        for _ in steps:
            n += 1
        sync()
    return (time.perf_counter() - start) * 1e3 / max(1, n), n


def triforce(runner: ModelRunner, prompts: list[list[int]]) -> None:
    """Clean steady-state cycle time, then a run with every phase fenced by syncs (where the
    time goes, host included), a cProfile of a clean run (Python under the GPU's waits) and
    the CUDA kernel table."""
    import cProfile
    import pstats

    from fastdecode.engine import graphed, speculative
    from fastdecode.spec.drafters import tree_drafting

    spec = SpeculativeConfig.from_any({
        "method": "triforce", "num_draft_tokens": 4,
        "drafter_kwargs": {"policy": "streaming_read", "budget": 1 / 16},
    })  # fmt: skip
    for rep in range(2):
        ms, n, timing = _run_triforce(runner, prompts, spec)
        tau = statistics.mean(r.tau for r in timing.rows)
        print(f"triforce rep{rep}: {n} steps {ms:.2f} ms/step tau {tau:.2f}", flush=True)
    totals: dict = {}
    originals = [
        (graphed.GraphedDecode, "__call__"), (graphed.GraphedForward, "__call__"),
        (speculative, "verify_batch"), (speculative, "pad_trees"), (speculative, "_compact"),
        (tree_drafting, "_step_inputs"), (tree_drafting, "grow_greedy_chains"),
    ]  # fmt: skip
    saved = [(owner, name, _timed(owner, name, totals)) for owner, name in originals]
    ms, n, timing = _run_triforce(runner, prompts, spec, warm=0)
    for owner, name, inner in saved:
        setattr(owner, name, inner)
    print(f"fenced: {ms:.2f} ms/step over {n + 1} steps")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name}: {seconds * 1e3 / (n + 1):.2f} ms/step")
    profile = cProfile.Profile()
    ms, n, _ = _run_triforce(runner, prompts, spec, around=profile)
    print(f"cProfile run: {ms:.2f} ms/step")
    pstats.Stats(profile).sort_stats("tottime").print_stats(20)
    prof = torch.profiler.profile(activities=[PROFILE.CUDA])
    ms, n, _ = _run_triforce(runner, prompts, spec, around=prof)
    print(f"kernels of {n} steps (CUDA total / steps = GPU time per step):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["policies", "triforce"])
    parser.add_argument("context", type=int, help="prompt tokens (< 32768 - 64)")
    parser.add_argument("batch", type=int)
    args = parser.parse_args()
    runner = ModelRunner(random_model("0.5b"))
    prompts = [[int(x) for x in torch.randint(0, 1000, (args.context,))] for _ in range(args.batch)]
    if args.what == "policies":
        policies(runner, prompts, args.context)
    else:
        triforce(runner, prompts)


if __name__ == "__main__":
    main()
