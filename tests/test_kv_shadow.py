"""ShadowKV (low-rank pre-RoPE keys, CPU values, chunk landmarks): exact at full rank and a
budget that covers the prompt, bounded error at low rank, fewer device bytes than the dense
cache, values on the CPU, generated tokens kept and seen, speculative verify and `move`,
and clear errors. On a CUDA machine the last test checks pinned values and real memory:
`python -m pytest -q -x tests/test_kv_shadow.py`.
"""

import pytest
import torch
from conftest import assert_prefill_and_decode_match_dense, save_tiny_model, with_policy

from fastdecode import LLM, SamplingParams
from fastdecode.engine.runner import ModelRunner
from fastdecode.kv.policies import KVPolicyConfig
from fastdecode.kv.policies.shadowkv import ShadowKVPolicy
from fastdecode.kv.shadow import ShadowKVCache, key_basis, unrotate
from fastdecode.model.rope import apply_rope

PROMPTS = [list(range(3, 3 + n)) for n in (37, 60, 45)]  # right-padded to 60 at prefill
LONG = [[3 + (i * 7 + j) % 120 for i in range(240)] for j in range(2)]  # 30 chunks each
# few resident chunks, so most of the prompt goes through selection + reconstruction
SPARSE = {"outlier_chunks": 1, "sink_chunks": 1, "local_chunks": 1}
EXACT = dict(SPARSE, rank=16)  # the tiny models' head_dim


def _run(model, options, prompts, budget=1.0, steps=4):
    """Prefill + greedy decode through dense and shadowkv runners; returns the shadow
    runner, the dense runner and the largest relative logit error over the decode steps."""
    dense = ModelRunner(model)
    shadow = ModelRunner(model, kv_policy=KVPolicyConfig("shadowkv", budget, options))
    longest = max(len(p) for p in prompts)
    for runner in (dense, shadow):
        runner.allocate(len(prompts), longest + steps + 1, prompt_len=longest)
    ref = dense.prefill(prompts)
    shadow.prefill(prompts)
    tokens, positions = ref.argmax(-1), torch.tensor([len(p) for p in prompts])
    worst = 0.0
    for _ in range(steps):
        ref, out = dense.decode(tokens, positions), shadow.decode(tokens, positions)
        worst = max(worst, float((out - ref).norm() / ref.norm()))
        tokens, positions = ref.argmax(-1), positions + 1
    return shadow, dense, worst


def test_full_rank_full_budget_matches_dense_logits(llm4, recorded):
    runner = assert_prefill_and_decode_match_dense(
        llm4.model, KVPolicyConfig("shadowkv", 1.0, EXACT), PROMPTS
    )
    cache = runner.cache
    assert isinstance(cache, ShadowKVCache) and cache.rank == 16
    assert len(recorded) == 3 * 4  # every layer of every decode step took the sparse path
    layer = cache.layers[0]
    assert layer.candidate.any(), "no chunk went through selection + reconstruction"
    # the selected chunks (budget covers them all) are reconstructed, not resident
    assert layer.res_k.shape[2] < 60


def test_full_rank_full_budget_generates_dense_tokens(llm4, recorded):
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ref = llm4.generate(PROMPTS, params)
    out = with_policy(llm4, KVPolicyConfig("shadowkv", 1.0, EXACT)).generate(PROMPTS, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    assert recorded


def test_default_rank_is_exact_when_the_budget_covers_the_prompt(llm4):
    """rank=None compresses keys only when reads are sparse (budget < prompt)."""
    assert_prefill_and_decode_match_dense(llm4.model, KVPolicyConfig("shadowkv", 1.0), PROMPTS)
    shadow, _, _ = _run(llm4.model, SPARSE, LONG, budget=32, steps=1)
    assert shadow.cache.rank == 4  # head_dim // 4


def test_unrotate_inverts_rope_even_with_a_scaled_table():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 5, 16)
    angles = torch.rand(2, 1, 5, 8) * 6
    angles = torch.cat((angles, angles), dim=-1)
    for scale in (1.0, 1.3):  # yarn-style attention scaling multiplies cos and sin
        cos, sin = angles.cos() * scale, angles.sin() * scale
        torch.testing.assert_close(unrotate(apply_rope(k, cos, sin), cos, sin), k)


def test_key_basis_is_the_best_rank_r_projection():
    """Eckart-Young: projecting on the top-r basis leaves exactly the discarded singular
    values' energy; a rank-r matrix is kept exactly."""
    torch.manual_seed(0)
    keys = torch.randn(2, 2, 100, 4) @ torch.randn(2, 2, 4, 16)  # rank 4
    keys = keys + 0.01 * torch.randn_like(keys)
    singular = torch.linalg.svdvals(keys)
    for rank in (2, 4, 16):
        basis = key_basis(keys, rank)
        residual = keys - keys @ basis @ basis.mT
        expect = singular[..., rank:].pow(2).sum(-1).sqrt()
        torch.testing.assert_close(residual.norm(dim=(-2, -1)), expect, atol=1e-3, rtol=1e-3)


def test_low_rank_error_is_bounded_and_shrinks_with_rank(llm4):
    """Lossy: rank < head_dim changes the logits, less as the rank grows; the rebuilt keys'
    error is the pre-RoPE keys' discarded energy (RoPE is a rotation), at most (D-r)/D."""
    errors = {rank: _run(llm4.model, dict(SPARSE, rank=rank), PROMPTS)[2] for rank in (4, 12)}
    assert 0.01 < errors[12] < errors[4] < 1.0
    shadow, dense, _ = _run(llm4.model, dict(SPARSE, rank=4), PROMPTS, steps=1)
    cache, true_k = shadow.cache, dense.cache.k[1]
    layer = cache.layers[1]
    n = layer.landmarks.shape[2]
    chunks = torch.arange(n).expand(3, 2, n)
    rebuilt = cache._rebuild_keys(layer, chunks)  # [B, Hkv, n * 8, D]
    for b, length in enumerate(len(p) for p in PROMPTS):
        whole = length // 8 * 8
        err = (rebuilt[b, :, :whole] - true_k[b, :, :whole]).norm(dim=(-2, -1))
        bound = true_k[b, :, :length].norm(dim=(-2, -1)) * (12 / 16) ** 0.5
        assert (err > 0).all() and (err <= bound).all()


def test_small_budget_reads_resident_selected_and_generated(llm4, recorded):
    budget = 16  # two chunks of 8 per (row, KV head)
    shadow, _, error = _run(llm4.model, EXACT, PROMPTS, budget=budget, steps=3)
    assert error > 0  # lossy: chunks were left out
    cache = shadow.cache
    for step in range(3):
        for layer in range(4):
            indices = recorded[step * 4 + layer]
            state = cache.layers[layer]
            resident = (state.res_pos >= 0).sum(-1)  # [B, Hkv]
            candidates = state.candidate.sum(-1)
            read = (indices >= 0).sum(-1)
            expect = resident + 8 * candidates.clamp(max=2) + (step + 1)  # + generated so far
            assert torch.equal(read, expect)


def test_device_holds_fewer_bytes_and_values_live_on_the_cpu(llm4):
    options = dict(SPARSE, rank=4)
    shadow, dense, _ = _run(llm4.model, options, LONG, budget=32, steps=2)
    cache = shadow.cache
    assert cache.nbytes() == cache.nbytes_gpu()
    assert cache.nbytes_gpu() * 2 < dense.cache.nbytes()
    assert cache.nbytes_cpu() > 0
    for state in cache.layers:
        assert state.v_cpu.device.type == "cpu"
        assert state.v_cpu.numel() == 2 * 2 * 240 * 16  # every prompt value, offloaded
        assert state.res_v.shape[2] < 240 // 4  # the device keeps a few chunks' values only
        assert state.coeff.shape[-1] == 8 * 4  # rank-4 coordinates, not 16-dim keys


def test_generated_tokens_are_kept_in_full(llm4):
    """Layer 0 sees the same tokens in both runs, so its generated K/V must be the dense
    cache's exactly, even at low rank and a small budget."""
    steps = 5
    shadow, dense, _ = _run(llm4.model, dict(SPARSE, rank=4), PROMPTS, budget=16, steps=steps)
    state = shadow.cache.layers[0]
    for b, length in enumerate(len(p) for p in PROMPTS):
        new = slice(length, length + steps)
        torch.testing.assert_close(state.tail_k[b, :, :steps], dense.cache.k[0][b, :, new])
        torch.testing.assert_close(state.tail_v[b, :, :steps], dense.cache.v[0][b, :, new])


def test_move_compacts_generated_slots(llm4):
    shadow, _, _ = _run(llm4.model, EXACT, PROMPTS, steps=4)
    cache = shadow.cache
    before = [state.tail_k.clone() for state in cache.layers]
    base = cache.base
    rows = torch.tensor([0, 2])
    src, dst = base[rows] + 3, base[rows] + 1
    with torch.inference_mode():  # as the speculative loop calls it (cache tensors are)
        cache.move(rows, src, dst)
    for state, old in zip(cache.layers, before, strict=True):
        torch.testing.assert_close(state.tail_k[rows, :, 1], old[rows, :, 3])
        torch.testing.assert_close(state.tail_k[1], old[1])  # other rows untouched


def test_speculative_verify_matches_plain_greedy(llm4, monkeypatch):
    """Verify steps (several tokens, a mask) attend over the full reconstruction."""
    verified = []
    inner = ShadowKVCache._dense_attend

    def spy(self, state, q, step):
        verified.append(q.shape[2])
        return inner(self, state, q, step)

    monkeypatch.setattr(ShadowKVCache, "_dense_attend", spy)
    prompts = [[5, 6, 7, 8] * 10, [9, 10, 11] * 12]  # repetitive: prompt lookup drafts
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [o.token_ids for o in llm4.generate(prompts, params)]
    llm = with_policy(llm4, KVPolicyConfig("shadowkv", 1.0, EXACT))
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    out = llm.generate(prompts, params, speculative_config=spec)
    assert [o.token_ids for o in out] == ref
    assert verified and max(verified) > 1  # multi-token verify steps ran


def test_bad_options_raise_clear_errors(llm4):
    for options, match in (
        ({"rank": 0}, "rank must be >= 1"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"outlier_chunks": -1}, "outlier_chunks must be >= 0"),
        ({"local_chunks": -2}, "local_chunks must be >= 0"),
    ):
        with pytest.raises(ValueError, match=match):
            KVPolicyConfig("shadowkv", 0.5, options).build(context=100)
    with pytest.raises(ValueError, match="larger than the context"):
        KVPolicyConfig("shadowkv", 500).build(context=100)
    llm = with_policy(llm4, KVPolicyConfig("shadowkv", 0.5, {"rank": 32}))
    with pytest.raises(ValueError, match="rank 32 exceeds the model's head_dim 16"):
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=4))
    assert ShadowKVPolicy(20, chunk_size=8).select_chunks == 3


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory, CUDA: GPU only")


def _cuda_llm(tmp_path, dtype):
    directory = tmp_path / "llama4"
    save_tiny_model("llama", directory, seed=3, num_hidden_layers=4, max_position_embeddings=4096)
    return LLM(directory, device="cuda", dtype=dtype, progress=False, compile=False)


def _cuda_clone(llm, policy):
    """with_policy, minus torch.compile and CUDA graphs (slow to build, beside the point)."""
    clone = with_policy(llm, None)
    clone.runner = ModelRunner(llm.model, kv_policy=policy, cuda_graphs=False, compile=False)
    return clone


@CUDA
def test_cuda_values_pinned_and_device_memory_drops(tmp_path):
    """Allocated CUDA memory held by the cache after a batch: dense vs shadowkv."""
    import gc

    llm = _cuda_llm(tmp_path, "bfloat16")
    prompts = [[3 + (i * 7 + j) % 120 for i in range(3000)] for j in range(4)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    held = {}
    for name, policy in (
        ("dense", None),
        ("shadow", KVPolicyConfig("shadowkv", 256, {"rank": 4, "outlier_chunks": 8})),
    ):
        gc.collect()
        before = torch.cuda.memory_allocated()
        clone = _cuda_clone(llm, policy)
        clone.generate(prompts, params)
        torch.cuda.synchronize()
        held[name] = torch.cuda.memory_allocated() - before  # the runner keeps its cache
        cache = clone.runner.cache
        if name == "shadow":
            assert cache.nbytes_cpu() > cache.nbytes_gpu()
            for state in cache.layers:
                assert state.v_cpu.is_pinned() and state.res_k.is_cuda
        del clone, cache
    assert held["shadow"] * 3 < held["dense"], held


@CUDA
def test_cuda_full_rank_full_budget_generates_dense_tokens(tmp_path):
    """The CUDA path (pinned staging, non_blocking copies, Triton gathered kernel)."""
    llm = _cuda_llm(tmp_path, "float32")
    prompts = [[3 + (i * 5 + j) % 120 for i in range(n)] for j, n in enumerate((300, 257))]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(prompts, params)]
    clone = _cuda_clone(llm, KVPolicyConfig("shadowkv", 1.0, EXACT))
    assert [o.token_ids for o in clone.generate(prompts, params)] == ref
    assert clone.runner.cache._staging is not None  # values came through the staging buffer
