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
