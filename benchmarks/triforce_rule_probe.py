"""Dev probe of the goodput rule's model on TriForce drafts (CPU is enough): SmolLM2-135M
drafts with a streaming KV (48 slots) over 700-token essay openings, every step a cycle
(to gather acceptance), while a GoodputLength priced with GPU-like costs -- plain step
5.8 ms, one K = 4 cycle 15 ms, the 0.5B at 32K x 32 (`longcontext_32k_triforce_h100.md`) --
says what it would choose at each plan. Shows how the acceptance estimate (from its 0.6
prior) and E[tokens | K] compare with the rows' real tau.

    python benchmarks/triforce_rule_probe.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastdecode import LLM, SamplingParams  # noqa: E402
from fastdecode.api import SpeculativeConfig  # noqa: E402
from fastdecode.bench.haystack import essays_dir  # noqa: E402
from fastdecode.engine.speculative import SpecTiming, run_speculative  # noqa: E402
from fastdecode.hub import fetch  # noqa: E402
from fastdecode.spec.length import GoodputLength, expected_tokens  # noqa: E402
from fastdecode.spec.step_cost import StepCostModel  # noqa: E402

PLAIN_S, CYCLE_S, BATCH, K = 5.8e-3, 15e-3, 4, 4


class Probe(GoodputLength):
    """The rule's choice at every plan, priced from a fixed table; the loop always cycles."""

    def __init__(self) -> None:
        super().__init__(cost=StepCostModel(table={(BATCH, 1): PLAIN_S, (BATCH, 1 + K): CYCLE_S}))
        self.log: list[tuple[float, float, int]] = []

    def record_verify(self, *args) -> None:  # CPU timings would replace the GPU-like table
        pass

    def record_plain(self, *args) -> None:
        pass

    def record_tokens(self, *args) -> None:
        pass

    def choose_k(self, alphas, max_k, batch, candidates=None) -> int:
        model = super().choose_k(alphas, max_k, batch, candidates)
        mean_e = sum(expected_tokens(a, max_k) for a in alphas) / len(alphas)
        self.log.append((statistics.mean(alphas), mean_e, model))
        return max_k


def main() -> None:
    llm = LLM(fetch("smollm2-135m-instruct"), device="cpu", dtype="float32", progress=False)
    names = ("avg.txt", "addiction.txt", "apple.txt", "avg.txt")
    essays = [llm.encode((essays_dir() / name).read_text()) for name in names]
    prompts = [e[100 * i : 100 * i + 700] for i, e in enumerate(essays)]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    spec = SpeculativeConfig(
        method="triforce", num_draft_tokens=K,
        drafter_kwargs={"policy": "streaming_read", "budget": 48},
    )  # fmt: skip
    states = llm._new_states([params] * BATCH)
    timing = SpecTiming()
    drafter = spec.batch_drafter(llm.runner, llm.tokenizer, BATCH)
    policy = Probe()
    for _ in run_speculative(llm.runner, prompts, states, timing, drafter, K, policy):
        pass
    print("real tau per row:", [round(r.tau, 2) for r in timing.rows])
    print(f"break-even E[tokens | {K}] = {CYCLE_S / PLAIN_S:.2f}")
    for i, (alpha, tokens, model) in enumerate(policy.log):
        print(f"plan {i}: alpha {alpha:.3f}, E[tokens | {K}] {tokens:.2f}, rule picks K={model}")


if __name__ == "__main__":
    main()
