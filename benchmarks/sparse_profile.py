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


def triforce(runner: ModelRunner, prompts: list[list[int]]) -> None:
    batch = len(prompts)
    spec = SpeculativeConfig.from_any({
        "method": "triforce", "num_draft_tokens": 4,
        "drafter_kwargs": {"policy": "streaming_read", "budget": 1 / 16},
    })  # fmt: skip
    for rep in range(2):  # the first pays compiles and graph captures
        params = SamplingParams(max_tokens=32, temperature=0)
        states = [RequestState(params, set(), _NoText()) for _ in range(batch)]
        timing = SpecTiming()
        steps = run_speculative(
            runner, prompts, states, timing, spec.batch_drafter(runner, None, batch), 4
        )
        next(steps)
        sync()
        prof = torch.profiler.profile(activities=[PROFILE.CPU, PROFILE.CUDA]) if rep else None
        if prof:
            prof.__enter__()
        start, n = time.perf_counter(), 0
        for _ in steps:
            n += 1
        sync()
        if prof:
            prof.__exit__(None, None, None)
        elapsed = time.perf_counter() - start
        tau = statistics.mean(r.tau for r in timing.rows)
        per_step = {"draft": timing.draft_s, "verify": timing.verify_s}
        split = " ".join(f"{k} {v * 1e3 / n:.2f}" for k, v in per_step.items())
        print(f"triforce rep{rep}: {n} steps {elapsed * 1e3 / n:.2f} ms/step tau {tau:.2f} {split}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


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
