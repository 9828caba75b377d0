"""Budgeted KV caches: exact with a full budget, real memory savings, per-head selection,
the policies' own rules, and clear errors."""

import pytest
import torch
from conftest import assert_prefill_and_decode_match_dense, with_policy

from fastdecode import SamplingParams
from fastdecode.kv.policies import POLICIES, KVPolicyConfig, budget_tokens

PROMPTS = [list(range(3, 3 + n)) for n in (37, 60, 45)]  # tiny vocab: ids 3..100 are words


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_full_budget_reproduces_full_attention(tiny_llm, name):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = tiny_llm.generate(PROMPTS, params)
    out = with_policy(tiny_llm, KVPolicyConfig(name, 1.0)).generate(PROMPTS, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_full_budget_logits_match_dense(tiny_llm, name):
    """Prefill + decode logits through the budgeted cache equal the dense cache's."""
    assert_prefill_and_decode_match_dense(tiny_llm.model, KVPolicyConfig(name, 1.0), PROMPTS)


@pytest.mark.parametrize("name", sorted(n for n, p in POLICIES.items() if p.storage == "evict"))
def test_small_budget_allocates_less(tiny_llm, name):
    llm = with_policy(tiny_llm, KVPolicyConfig(name, 1 / 8))
    prompt = list(range(3, 100)) * 2  # 194 tokens
    llm.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    dense_bytes = sum(t.numel() * t.element_size() for t in llm.model.new_cache(1, 200).k) * 2
    cache = llm.runner.cache
    assert cache.nbytes() * 6 <= dense_bytes or name == "snapkv"  # snapkv keeps new tokens too
    assert cache.nbytes() * 4 <= dense_bytes


def test_streaming_keeps_sinks_and_recent_window(tiny_llm):
    llm = with_policy(tiny_llm, KVPolicyConfig("streaming", 24, {"sinks": 4}))
    prompt = list(range(3, 63))  # 60 tokens
    llm.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    last = len(prompt) + 10 - 2  # the final token is never fed back
    for pos in llm.runner.cache.pos:
        kept = sorted(pos[0, 0].tolist())
        assert kept == list(range(4)) + list(range(last - 19, last + 1))


def test_snapkv_selects_per_head(tiny_llm):
    """KV heads of a layer may keep different positions (selected per KV head, not shared)."""
    llm = with_policy(tiny_llm, KVPolicyConfig("snapkv", 16, {"window": 4}))
    prompt = [5, 9, 13, 7, 21, 40, 3, 8] * 8
    llm.generate(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    pos = llm.runner.cache.pos
    assert any(not torch.equal(p[0, 0], p[0, 1]) for p in pos)
    for p in pos:  # the observation window is always kept
        for head in p[0]:
            assert set(range(len(prompt) - 4, len(prompt))) <= set(head.tolist())


def test_h2o_accumulates_attention_and_keeps_recent(tiny_llm):
    llm = with_policy(tiny_llm, KVPolicyConfig("h2o", 20, {"recent": 8}))
    llm.generate(list(range(3, 53)), SamplingParams(max_tokens=8, ignore_eos=True))
    cache = llm.runner.cache
    newest = 50 + 8 - 2
    for pos, score in zip(cache.pos, cache.score, strict=True):
        assert set(range(newest - 7, newest + 1)) <= set(pos[0, 0].tolist())
        assert (score >= 0).all() and score.sum() > 0


def test_bad_budgets_and_names():
    with pytest.raises(ValueError, match="unknown KV policy 'nope'.*streaming"):
        KVPolicyConfig("nope", 0.5)
    with pytest.raises(ValueError, match="positive"):
        KVPolicyConfig("snapkv", 0)
    with pytest.raises(ValueError, match="larger than the context"):
        budget_tokens(500, 300)
    assert budget_tokens(1 / 8, 100) == 13


def test_budget_larger_than_request_context_is_a_clear_error(tiny_llm):
    llm = with_policy(tiny_llm, KVPolicyConfig("streaming", 200))
    with pytest.raises(ValueError, match="larger than the context"):
        llm.generate([3, 4, 5], SamplingParams(max_tokens=4))


@pytest.mark.slow
def test_smollm2_full_budget_snapkv_matches_dense(smollm2_llm):
    text = "The history of the printing press begins in the fifteenth century. " * 12
    params = SamplingParams(max_tokens=12)
    ref = smollm2_llm.generate(text, params)[0]
    out = with_policy(smollm2_llm, KVPolicyConfig("snapkv", 1.0)).generate(text, params)[0]
    assert out.token_ids == ref.token_ids


def test_snapkv_prefill_leaves_room_for_generated_tokens(tiny_llm):
    """SnapKV keeps `budget` prompt positions and never evicts the sinks or the selection
    to make room for the tokens it generates."""
    llm = with_policy(tiny_llm, KVPolicyConfig("snapkv", 16, {"window": 4}))
    prompt = [5, 9, 13, 7, 21, 40, 3, 8] * 8
    runner = llm.runner
    runner.allocate(1, len(prompt) + 6, prompt_len=len(prompt))
    runner.prefill([prompt])
    kept_after_prefill = [p[0].clone() for p in runner.cache.pos]
    for p in kept_after_prefill:
        assert ((p >= 0).sum(-1) == 16).all() and ((p < 0).sum(-1) == 6).all()
    tokens, positions = torch.tensor([3]), torch.tensor([len(prompt)])
    for _ in range(6):
        runner.decode(tokens, positions)
        positions += 1
    for before, after in zip(kept_after_prefill, runner.cache.pos, strict=True):
        for b_head, a_head in zip(before, after[0], strict=True):
            assert set(b_head[b_head >= 0].tolist()) <= set(a_head.tolist())


def test_speculation_over_an_evicting_policy_is_a_clear_error(tiny_llm):
    """Verification writes drafts it may reject; an evicting cache cannot take them back,
    so the combination is refused up front (a sparse-retrieval cache stores every position
    and may speculate)."""
    from fastdecode import SpeculativeConfig

    params = SamplingParams(max_tokens=6, temperature=0)
    spec = SpeculativeConfig(method="ngram", num_draft_tokens=3)
    with pytest.raises(ValueError, match="cannot roll back rejected drafts"):
        with_policy(tiny_llm, KVPolicyConfig("snapkv", 8)).generate(
            PROMPTS[0], params, speculative_config=spec
        )
    out = with_policy(tiny_llm, KVPolicyConfig("quest", 1.0)).generate(
        PROMPTS[0], params, speculative_config=spec
    )
    assert len(out[0].token_ids) == 6


def test_quest_page_bounds_follow_moved_slots():
    """Compaction moves accepted tree nodes' keys: their pages' min/max absorb them, in one
    reduction per bound (pages repeat among the moved slots; rows differ)."""
    from types import SimpleNamespace

    from fastdecode.kv.policies.quest import QuestPolicy

    torch.manual_seed(0)
    policy = QuestPolicy(budget=8, page_size=4, dense_layers=0)
    batch, heads, capacity, dim = 3, 2, 16, 5
    cache = SimpleNamespace(k=[torch.randn(batch, heads, capacity, dim)], num_layers=1, state={})
    policy.setup(cache)
    key_min, key_max = cache.state["key_min"][0], cache.state["key_max"][0]
    key_min.copy_(torch.randn_like(key_min))
    key_max.copy_(key_min + torch.rand_like(key_min))
    want_min, want_max = key_min.clone(), key_max.clone()
    rows, dst = torch.tensor([0, 0, 2, 1]), torch.tensor([5, 6, 13, 0])
    for b, slot in zip(rows.tolist(), dst.tolist(), strict=True):
        key = cache.k[0][b, :, slot]
        want_min[b, :, slot // 4] = torch.minimum(want_min[b, :, slot // 4], key)
        want_max[b, :, slot // 4] = torch.maximum(want_max[b, :, slot // 4], key)
    policy.on_move(0, cache, rows, None, dst)
    assert torch.equal(key_min, want_min) and torch.equal(key_max, want_max)
