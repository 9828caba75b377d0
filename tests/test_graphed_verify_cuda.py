"""The CUDA-graph verify path on the GPU (skipped without CUDA; run on the GPU machine with
`python -m pytest tests/test_graphed_verify_cuda.py`, also from benchmarks/gpu_checks.sh):
inputs built on the host and loaded into the graph's packed buffers give the eager
forward's logits, and speculative greedy decoding stays token-identical to plain."""

from __future__ import annotations

import pytest
import torch

from fastdecode.params import SamplingParams
from fastdecode.spec.config import SpeculativeConfig
from fastdecode.spec.tree import DraftTree, pad_trees

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cuda_llm(tiny_model):
    import fastdecode

    directory, _ = tiny_model("qwen2")
    return fastdecode.LLM(directory, device="cuda", dtype="float32", progress=False)


def test_host_built_verify_inputs_give_the_eager_logits(cuda_llm):
    runner = cuda_llm.runner
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    runner.allocate(2, 64)
    runner.prefill(prompts)
    trees = [DraftTree([3, 4, 5], [-1, 0, 0]), DraftTree.chain([7, 8])]
    host = pad_trees(trees).verify_inputs(torch.tensor([1, 2]), torch.tensor([6, 3]))
    forward = runner.multi_forward()
    graphed = [forward(*host) for _ in range(2)]  # the first call captures, the second replays
    on_device = forward._on_device(*host)
    assert all(t.device.type == "cuda" for t in on_device[:3])
    eager = forward._forward(*on_device)
    for logits in graphed:
        torch.testing.assert_close(logits, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_speculative_greedy_on_cuda_equals_plain(cuda_llm, method):
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 9, 10]]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = [r.token_ids for r in cuda_llm.generate(prompts, params)]
    spec = SpeculativeConfig(method=method, num_draft_tokens=4)
    ours = [r.token_ids for r in cuda_llm.generate(prompts, params, speculative_config=spec)]
    assert ours == plain


@pytest.mark.parametrize("run_ahead", [True, False])
def test_triforce_device_cycle_on_cuda_equals_plain(cuda_llm, run_ahead):
    """TriForce's one-graph cycle, launched one cycle ahead of the host's read or not, on
    a ragged batch (one row stopping on a token the device cannot see): plain's tokens."""
    from fastdecode.engine.spec_state import SpecTiming
    from fastdecode.engine.speculative import run_speculative

    prompts = [[5 + i % 40 for i in range(60)], [9 + i % 23 for i in range(37)], [3, 4, 5] * 9]
    free = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (30, 21, 26)]
    stop = cuda_llm.generate(prompts[2], free[2])[0].token_ids[9]
    params = [*free[:2], SamplingParams(max_tokens=26, stop_token_ids=[stop])]
    plain = [r.token_ids for r in cuda_llm.generate(prompts, params)]
    spec = SpeculativeConfig(
        method="triforce", num_draft_tokens=3,
        drafter_kwargs={"policy": "streaming_read", "budget": 16},
    )  # fmt: skip
    drafter = spec.batch_drafter(cuda_llm.runner, cuda_llm.tokenizer, len(prompts))
    drafter.run_ahead = run_ahead
    states = cuda_llm._new_states(params)
    timing = SpecTiming()
    for _ in run_speculative(cuda_llm.runner, prompts, states, timing, drafter, 3):
        pass
    assert [s.token_ids for s in states] == plain
    cycle = drafter.device_cycle
    assert timing.fused_steps > 0 and cycle.enabled  # replayed as a CUDA graph
    assert (cycle.ahead_taken > 0) == run_ahead and cycle.ahead_dropped == 0
