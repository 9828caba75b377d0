"""Sparse retrieval (read) policies: quest and tidal over SelectiveKVCache.

Exact with a budget that covers the context; with a small budget the gathered path reads
exactly K slots per (row, KV head); Quest always reads the current and first pages; TidalDecode's
other layers read what their selection layer picked; the Triton gathered kernel equals the
PyTorch reference. On a CUDA machine the kernel tests run compiled:
`python -m pytest -q tests/test_kv_select.py`; on CPU in Triton's interpreter.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import (  # noqa: E402
    assert_prefill_and_decode_match_dense,
    save_tiny_model,
    with_policy,
)

from fastdecode import LLM, SamplingParams  # noqa: E402
from fastdecode.engine.runner import ModelRunner  # noqa: E402
from fastdecode.kv import gathered  # noqa: E402
from fastdecode.kv.gathered import gathered_attention_reference  # noqa: E402
from fastdecode.kv.policies import POLICIES, KVPolicyConfig  # noqa: E402
from fastdecode.kv.selective import SelectiveKVCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
PROMPTS = [list(range(3, 3 + n)) for n in (37, 60, 45)]  # right-padded to 60 at prefill
# every layer sparse where the policy allows it: quest from layer 0, tidal selects at 1
SPARSE = {
    "quest": {"dense_layers": 0},
    "tidal": {"selection_layers": [1]},
    "streaming_read": {"sinks": 2},
}
SELECT = sorted(n for n, p in POLICIES.items() if p.storage == "select")


@pytest.mark.parametrize("name", SELECT)
def test_full_budget_reproduces_full_attention(llm4, recorded, name):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ref = llm4.generate(PROMPTS, params)
    out = with_policy(llm4, KVPolicyConfig(name, 1.0, SPARSE[name])).generate(PROMPTS, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert recorded, "the gathered path was never taken"


@pytest.mark.parametrize("name", SELECT)
def test_full_budget_logits_match_dense(llm4, recorded, name):
    """Prefill + decode logits through the selective cache equal the dense cache's."""
    policy = KVPolicyConfig(name, 1.0, SPARSE[name])
    select = assert_prefill_and_decode_match_dense(llm4.model, policy, PROMPTS)
    assert isinstance(select.cache, SelectiveKVCache)
    dense_capacity = ModelRunner(llm4.model).allocate(len(PROMPTS), 64, prompt_len=60).capacity
    assert select.cache.capacity == dense_capacity  # keeps everything
    sparse_layers = {"tidal": 2}.get(name, 4)  # tidal: layers 2, 3 (0, 1 select)
    assert len(recorded) == 3 * sparse_layers


def _decode_steps(llm, policy, steps, logits=None):
    """Prefill PROMPTS and run `steps` greedy decode steps; returns the runner and the
    positions written at each step [steps, B] (and appends each step's logits to `logits`)."""
    runner = ModelRunner(llm.model, kv_policy=policy)
    runner.allocate(len(PROMPTS), 60 + steps + 1, prompt_len=60)
    tokens = runner.prefill(PROMPTS).argmax(-1)
    positions = torch.tensor([len(p) for p in PROMPTS])
    written = []
    for _ in range(steps):
        written.append(positions.clone())
        out = runner.decode(tokens, positions)
        if logits is not None:
            logits.append(out)
        tokens, positions = out.argmax(-1), positions + 1
    return runner, written


@pytest.mark.parametrize("name", SELECT)
def test_small_budget_reads_exactly_k_per_kv_head(llm4, recorded, name):
    budget = 32
    runner, written = _decode_steps(llm4, KVPolicyConfig(name, budget, SPARSE[name]), 3)
    per_step = len(recorded) // 3
    assert per_step == {"tidal": 2}.get(name, 4)
    for step, pos in enumerate(written):
        for indices in recorded[step * per_step : (step + 1) * per_step]:
            assert indices.shape == (3, 2, budget)  # [B, Hkv, K]: K fixed per cache
            for b in range(3):
                for h in range(2):
                    read = indices[b, h][indices[b, h] >= 0]
                    assert len(set(read.tolist())) == len(read)  # no slot twice
                    assert (read <= pos[b]).all()  # only visible slots
                    if name in ("tidal", "streaming_read"):
                        assert len(read) == budget
                    else:  # whole pages; only the current page may be part-written
                        unfilled = 15 - int(pos[b]) % 16
                        assert len(read) == budget - unfilled
    # KV heads choose independently (GQA: per KV head, not per query head, not shared)
    assert name != "tidal" or any(
        not torch.equal(i[:, 0].sort(-1)[0], i[:, 1].sort(-1)[0]) for i in recorded
    )


def test_quest_reads_current_and_first_pages(llm4, recorded):
    """Budget 48: 3 pages, the first (sinks) and current ones always, one chosen by bound."""
    runner, written = _decode_steps(llm4, KVPolicyConfig("quest", 48, SPARSE["quest"]), 4)
    for step, pos in enumerate(written):
        for indices in recorded[step * 4 : (step + 1) * 4]:
            for b in range(3):
                page_start = int(pos[b]) // 16 * 16
                for h in range(2):
                    read = set(indices[b, h].tolist())
                    assert set(range(page_start, int(pos[b]) + 1)) <= read
                    assert set(range(16)) <= read  # the sink page
                    pages = {s // 16 for s in read if s >= 0}
                    assert len(pages) == 3 and all(
                        set(range(p * 16, min(p * 16 + 16, int(pos[b]) + 1))) <= read for p in pages
                    )


def test_quest_page_bounds_hold_every_key(llm4):
    """Each page's min/max bound every key stored in it (prefill rows of unequal length,
    then decode writes that start new pages)."""
    runner, written = _decode_steps(llm4, KVPolicyConfig("quest", 32, SPARSE["quest"]), 5)
    cache = runner.cache
    last = written[-1]
    for layer in range(4):
        key_min, key_max = cache.state["key_min"][layer], cache.state["key_max"][layer]
        for b in range(3):
            keys = cache.k[layer][b, :, : int(last[b]) + 1]  # [Hkv, n, D]
            for p in range(int(last[b]) // 16 + 1):
                page = keys[:, p * 16 : p * 16 + 16]
                assert torch.equal(key_min[b, :, p], page.amin(1))
                assert torch.equal(key_max[b, :, p], page.amax(1))


def test_tidal_layers_read_their_selection_layers_pick(llm4, recorded, monkeypatch):
    from fastdecode.kv.policies.tidal import TidalPolicy

    observed = {}
    inner = TidalPolicy.observe_weights

    def spy(self, layer, cache, weights, visible):
        observed.setdefault(layer, []).append((weights.clone(), visible.clone()))
        return inner(self, layer, cache, weights, visible)

    monkeypatch.setattr(TidalPolicy, "observe_weights", spy)
    budget = 24
    policy = KVPolicyConfig("tidal", budget, {"selection_layers": [0, 2]})
    _decode_steps(llm4, policy, 3)
    assert sorted(observed) == [0, 2] and len(recorded) == 2 * 3  # layers 1 and 3 read
    for step in range(3):
        for call, selector in enumerate((0, 2)):
            weights, visible = observed[selector][step]
            scores = weights.masked_fill(~visible[:, None], -1.0)  # [B, Hkv, S]
            expect = scores.topk(budget, dim=-1).indices.sort(-1).values
            got = recorded[2 * step + call].sort(-1).values
            assert torch.equal(got, expect)
    assert not torch.equal(recorded[0].sort(-1).values, recorded[1].sort(-1).values)


def test_tidal_default_selection_layers():
    from fastdecode.kv.policies.tidal import default_selection_layers

    assert default_selection_layers(24) == [2, 12]
    assert default_selection_layers(30) == [2, 15]
    assert default_selection_layers(4) == [2]
    assert default_selection_layers(2) == [1]


def test_bad_read_policy_options(tiny_llm):
    with pytest.raises(ValueError, match="at least 16 positions"):
        KVPolicyConfig("quest", 8).build(context=100)
    llm = with_policy(tiny_llm, KVPolicyConfig("quest", 0.05))  # 4 of 70 positions
    with pytest.raises(ValueError, match="quest reads whole pages of 16 slots"):
        llm.generate(list(range(3, 63)), SamplingParams(max_tokens=10))
    llm = with_policy(tiny_llm, KVPolicyConfig("tidal", 0.5, {"selection_layers": [5]}))
    with pytest.raises(ValueError, match="selection_layers"):
        llm.generate(list(range(3, 63)), SamplingParams(max_tokens=10))


# -- the Triton kernel against the PyTorch reference --

KERNEL_SHAPES = [(6, 2, 16), (4, 4, 32)] if DEVICE == "cpu" else [(14, 2, 64), (12, 2, 128)]


def _random_indices(batch, kv_heads, capacity, k, generator):
    idx = torch.stack(
        [
            torch.stack(
                [torch.randperm(capacity, generator=generator)[:k] for _ in range(kv_heads)]
            )
            for _ in range(batch)
        ]
    )
    idx[1, :, k // 3 :] = -1  # a short row: padded
    idx[2, 1, 1:] = -1  # one slot only
    return idx.to(DEVICE)


@pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")
@pytest.mark.parametrize("heads,kv_heads,head_dim", KERNEL_SHAPES)
@pytest.mark.parametrize("k", [16, 100])
def test_gathered_kernel_matches_reference(heads, kv_heads, head_dim, k):
    from fastdecode.kv.triton_gathered import gathered_decode_attention

    generator = torch.Generator().manual_seed(k + heads)
    batch, capacity = 4, 300
    q = torch.randn(batch, heads, 1, head_dim, generator=generator).to(DEVICE)
    kc = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(DEVICE)
    vc = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(DEVICE)
    idx = _random_indices(batch, kv_heads, capacity, k, generator)
    ref = gathered_attention_reference(q.double(), kc.double(), vc.double(), idx)
    out = gathered_decode_attention(q, kc, vc, idx)
    tol = 1e-5 if DEVICE == "cpu" else 1e-3  # tf32 dots on the GPU
    assert (out.double() - ref).norm() / ref.norm() < tol


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernel test runs on the GPU")
def test_gathered_kernel_bf16():
    from fastdecode.kv.triton_gathered import gathered_decode_attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, head_dim, capacity, k = 8, 14, 2, 64, 4096, 512
    q = torch.randn(batch, heads, 1, head_dim, generator=generator).to(DEVICE, torch.bfloat16)
    kc = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator)
    vc = torch.randn_like(kc)
    kc, vc = kc.to(DEVICE, torch.bfloat16), vc.to(DEVICE, torch.bfloat16)
    idx = _random_indices(batch, kv_heads, capacity, k, generator)
    ref = gathered_attention_reference(q.double(), kc.double(), vc.double(), idx)
    out = gathered_decode_attention(q, kc, vc, idx)
    assert (out.double() - ref).norm() / ref.norm() < 2e-2


def test_reference_equals_masked_full_attention():
    """Gathering every visible slot is the dense masked attention (the exactness base)."""
    from fastdecode.kv.attention import cache_attention, fold_mask_for_gqa

    torch.manual_seed(0)
    q, kc = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 40, 16)
    vc = torch.randn_like(kc)
    lengths = torch.tensor([7, 40])
    idx = torch.arange(40).expand(2, 2, 40)
    idx = torch.where(idx < lengths[:, None, None], idx.flip(-1) % lengths[:, None, None], -1)
    mask = torch.arange(40)[None, :] < lengths[:, None]
    ref = cache_attention(q, kc, vc, fold_mask_for_gqa(mask[:, None, None], 2))
    torch.testing.assert_close(gathered_attention_reference(q, kc, vc, idx), ref)


@pytest.mark.skipif(not HAS_TRITON or DEVICE != "cpu", reason="CPU interpreter check")
def test_selective_cache_through_the_kernel(llm4, monkeypatch):
    """The model's decode steps through the Triton kernel give the reference's logits."""
    from fastdecode.kv.triton_gathered import gathered_decode_attention

    policy = KVPolicyConfig("quest", 32, SPARSE["quest"])
    ref, out = [], []
    _decode_steps(llm4, policy, 2, ref)
    monkeypatch.setattr(gathered, "gathered_attention", gathered_decode_attention)
    _decode_steps(llm4, policy, 2, out)
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs + the compiled kernel: GPU only")
def test_cuda_graph_decode_full_budget_matches_dense(tmp_path):
    """On the GPU the decode step (gathered kernel, selection, page bounds) is captured as a
    CUDA graph; with a full budget its greedy tokens equal the dense cache's."""
    directory = tmp_path / "llama4"
    save_tiny_model("llama", directory, seed=3, num_hidden_layers=4)
    llm = LLM(directory, device="cuda", dtype="float32", progress=False)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(PROMPTS, params)]
    for name in SELECT:
        for budget in (1.0, 32):
            clone = with_policy(llm, KVPolicyConfig(name, budget, SPARSE[name]))
            out = [o.token_ids for o in clone.generate(PROMPTS, params)]
            assert clone.runner._decode._graphs, "the decode step was not captured"
            assert budget != 1.0 or out == ref
