"""Dev profile of batch-1 speculative steps on random weights of a real model shape (no
checkpoint to move): ms per plain decode step against ms per speculative step that verifies
a K-node draft, the step's phases fenced by device syncs (where the time goes, host
included), a cProfile of a clean run (Python under the GPU's waits) and the CUDA kernel
table. Drafts are random tokens, so they are rejected (tau ~ 1): this measures what one step
costs, not how many tokens it yields. Speed does not depend on the weights' values; the
committed speed numbers come from benchmarks/speculative.py on the real models.

    python benchmarks/spec_profile.py --shape 1.5b --contexts 512 8192 --nodes 4 16
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sparse_profile import _NoText, _timed, sync, timed_steps  # noqa: E402
from step_profile import SHAPES, random_model  # noqa: E402

from fastdecode.engine import graphed, speculative  # noqa: E402
from fastdecode.engine.runner import ModelRunner  # noqa: E402
from fastdecode.engine.sampling import select_tokens  # noqa: E402
from fastdecode.engine.speculative import SpecTiming, run_speculative  # noqa: E402
from fastdecode.engine.stopping import RequestState  # noqa: E402
from fastdecode.params import SamplingParams  # noqa: E402
from fastdecode.spec.drafters import batch as batch_drafters  # noqa: E402
from fastdecode.spec.tree import DraftTree  # noqa: E402

PROFILE = torch.profiler.ProfilerActivity
NEW_TOKENS = 64


class RandomChain:
    """A drafter proposing `nodes` random tokens as a chain: the verify step's full cost
    with (almost) nothing accepted."""

    def __init__(self, nodes: int, vocab: int) -> None:
        self.nodes, self.vocab = nodes, vocab
        self.generator = torch.Generator().manual_seed(0)

    def propose(self, context, max_nodes: int) -> DraftTree:
        count = min(self.nodes, max_nodes)
        tokens = torch.randint(0, self.vocab, (count,), generator=self.generator).tolist()
        return DraftTree.chain(tokens)

    def update(self, accepted: list[int]) -> None:
        pass

    def reset(self) -> None:
        pass


def plain_ms(runner: ModelRunner, prompt: list[int], steps: int = 50) -> tuple[float, float]:
    """(ms per plain step queued back to back, ms per step with a host read of each token)."""
    runner.allocate(1, len(prompt) + 2 * steps + 8)
    params = [SamplingParams(max_tokens=steps, temperature=0)]
    tokens = select_tokens(runner.prefill([prompt]), params, [None])
    position = torch.tensor([len(prompt)], device="cuda")
    results = []
    for read in (False, True):
        for i in range(5):
            runner.decode(tokens, position + i)
        sync()
        start = time.perf_counter()
        for i in range(steps):
            out = select_tokens(runner.decode(tokens, position + i), params, [None])
            if read:
                out.tolist()
        sync()
        results.append((time.perf_counter() - start) * 1e3 / steps)
    return results[0], results[1]


def spec_run(runner, prompt, nodes, vocab, around=None, warm: int = 4):
    """One speculative generation; (ms per step after `warm` steps, steps, timing)."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    states = [RequestState(params, set(), _NoText())]
    timing = SpecTiming()
    steps = run_speculative(runner, [prompt], states, timing, [RandomChain(nodes, vocab)], nodes)
    return (*timed_steps(steps, warm, around), timing)


def fenced(runner, prompt, nodes, vocab) -> None:
    """Per-phase ms per step, every phase between two device syncs."""
    totals: dict = {}
    originals = [
        (graphed.GraphedDecode, "__call__"), (graphed.GraphedForward, "__call__"),
        (speculative, "verify_batch"), (speculative, "verify_step_inputs"),
        (speculative, "_compact"),
        (speculative, "_draft"), (batch_drafters.PerRowDrafters, "accept"),
        (speculative, "to_device"),
    ]  # fmt: skip
    saved = [(owner, name, _timed(owner, name, totals)) for owner, name in originals]
    try:
        ms, n, _ = spec_run(runner, prompt, nodes, vocab, warm=0)
    finally:
        for owner, name, inner in saved:
            setattr(owner, name, inner)
    print(f"  fenced: {ms:.3f} ms/step over {n + 1} steps")
    for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"    {name}: {seconds * 1e3 / (n + 1):.3f} ms/step")


def timeline(runner, prompt, nodes, vocab) -> None:
    """Where a step's wall time goes without syncs added: host time per phase (entry to
    exit, nested phases indented) and the verify graph's GPU time (CUDA events around its
    replay). The GPU idles for roughly wall - graph time."""
    totals: dict = {}
    events: list = []

    def wrap(owner, name, label):
        return owner, name, _timed(owner, name, totals, label, fence=False)

    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(graph):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        replay(graph)
        end.record()
        events.append((begin, end))

    saved = [
        wrap(speculative, "_draft", "draft"),
        wrap(speculative, "to_device", "to_device (loop)"),
        wrap(speculative, "verify_step_inputs", "verify_step_inputs"),
        wrap(graphed.GraphedForward, "__call__", "verify forward (host)"),
        wrap(graphed.GraphedForward, "_pad", "  _pad"),
        wrap(speculative, "verify_batch", "verify_batch (waits for the GPU)"),
        wrap(speculative, "_compact", "_compact"),
        wrap(speculative, "_synchronize", "_synchronize"),
        wrap(batch_drafters.PerRowDrafters, "accept", "drafters.accept"),
    ]
    torch.cuda.CUDAGraph.replay = timed_replay
    try:
        ms, n, _ = spec_run(runner, prompt, nodes, vocab, warm=0)
    finally:
        torch.cuda.CUDAGraph.replay = replay
        for owner, name, inner in saved:
            setattr(owner, name, inner)
    sync()
    gpu = [b.elapsed_time(e) for b, e in events[1:]]
    steps = n + 1
    top = sum(v for k, v in totals.items() if not k.startswith(" "))
    print(f"  timeline: {ms:.3f} ms/step wall, graph GPU {sum(gpu) / max(1, len(gpu)):.3f} "
          f"ms/replay ({len(events)} replays)")  # fmt: skip
    for name, seconds in totals.items():
        print(f"    {name}: {seconds * 1e3 / steps:.3f} ms/step")
    print(f"    loop's own Python: {ms - top * 1e3 / steps:.3f} ms/step (approx.)")


def draft_batch(target: ModelRunner, batch: int, context: int, tree: str | None) -> None:
    """A random 0.5B-shape draft model drafting for the target at `batch` rows: ms per step
    and where it goes (a check that the batched draft-model path runs at speed)."""
    from fastdecode.spec.drafters.draft_model import DraftModelDrafter
    from fastdecode.spec.drafters.tree_drafting import TreeShape

    draft = ModelRunner(random_model("0.5b"))
    vocab = target.model.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 1000, (context,), generator=gen).tolist() for _ in range(batch)]
    for rep in range(3):
        drafter = DraftModelDrafter(draft, TreeShape.parse(tree), 4, vocab)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        states = [RequestState(params, set(), _NoText()) for _ in prompts]
        timing = SpecTiming()
        start = time.perf_counter()
        for _ in run_speculative(target, prompts, states, timing, drafter, 4):
            pass
        sync()
        wall = time.perf_counter() - start
        print(f"draft model b{batch} ({tree or 'chain'}) run {rep}: {wall:.2f} s, "
              f"{timing.steps} steps, {wall / timing.steps * 1e3:.2f} ms/step, draft "
              f"{timing.draft_s / timing.steps * 1e3:.2f} ms/step", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1.5b", choices=sorted(SHAPES))
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 8192])
    parser.add_argument("--nodes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--kernels", action="store_true", help="print the CUDA kernel tables")
    parser.add_argument(
        "--draft-batch", type=int, help="instead: a random 0.5B draft model at this batch"
    )  # fmt: skip
    args = parser.parse_args()
    model = random_model(args.shape)
    vocab = SHAPES[args.shape][6]
    runner = ModelRunner(model)
    if args.draft_batch:
        for tree in (None, "dynamic:5:4"):
            draft_batch(runner, args.draft_batch, args.contexts[0], tree)
        return
    gen = torch.Generator().manual_seed(1)
    for context in args.contexts:
        prompt = torch.randint(0, 1000, (context,), generator=gen).tolist()
        queued, read = plain_ms(runner, prompt)
        print(f"context {context}: plain {queued:.3f} ms/step queued, {read:.3f} with a read")
        for nodes in args.nodes:
            spec_run(runner, prompt, nodes, vocab)  # warm-up: captures, compiles
            ms, n, timing = spec_run(runner, prompt, nodes, vocab)
            print(f" K={nodes}: {ms:.3f} ms/step ({ms / read:.2f}x plain), {n} steps; "
                  f"draft {timing.draft_s * 1e3 / timing.steps:.3f} ms/step, verify "
                  f"{timing.verify_s * 1e3 / timing.steps:.3f} ms/step")  # fmt: skip
            timeline(runner, prompt, nodes, vocab)
            fenced(runner, prompt, nodes, vocab)
            profile = cProfile.Profile()
            ms, n, _ = spec_run(runner, prompt, nodes, vocab, around=profile)
            print(f"  cProfile run: {ms:.3f} ms/step")
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)
            if args.kernels:
                prof = torch.profiler.profile(activities=[PROFILE.CUDA])
                ms, n, _ = spec_run(runner, prompt, nodes, vocab, around=prof)
                print(f"  kernels of {n} steps:")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
