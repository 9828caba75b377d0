"""CAKE and DuoAttention: exact with a full budget, budgets honored (CAKE's total across
layers, even mid-prefill; Duo's streaming heads at sinks + window), real memory savings,
and DuoAttention's head calibration file (made, loaded, missing, for another model)."""

from pathlib import Path

import pytest
import torch
from conftest import (
    assert_prefill_and_decode_match_dense,
    save_tiny_model,
    tiny_tokenizer,
    with_policy,
)

from fastdecode import LLM, SamplingParams
from fastdecode.kv.duo_calibration import calibrate
from fastdecode.kv.duo_heads import load_calibration
from fastdecode.kv.policies import KVPolicyConfig
from fastdecode.kv.policies.cake import CakePolicy, split_budget

PROMPTS = [list(range(3, 3 + n)) for n in (37, 60, 45)]
LONG = [5, 9, 13, 7, 21, 40, 3, 8, 77, 12, 90, 31] * 8  # 96 tokens


def dense_bytes(llm, capacity: int) -> int:
    return sum(t.numel() * t.element_size() for t in llm.model.new_cache(1, capacity).k) * 2


def encode(text: str) -> list[int]:
    return tiny_tokenizer().encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def duo_file(tiny_llm, tmp_path_factory) -> Path:
    """Heads of the tiny Llama, half of them retrieval (a short calibration run)."""
    calibration = calibrate(
        tiny_llm.model, encode, model_name="tiny", length=96, samples=2, window=8, progress=False
    )
    return calibration.save(tmp_path_factory.mktemp("duo") / "heads.json")


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cake", "duo"])
def test_full_budget_matches_dense(tiny_llm, name):
    assert_prefill_and_decode_match_dense(tiny_llm.model, KVPolicyConfig(name, 1.0), PROMPTS)


def test_duo_all_retrieval_heads_match_dense_at_small_budget(tiny_llm, duo_file, tmp_path):
    """Retrieval heads keep everything: with every head one, a tiny budget is still exact."""
    calibration = load_calibration(duo_file, tiny_llm.model)
    calibration.retrieval = [[True] * len(layer) for layer in calibration.retrieval]
    path = calibration.save(tmp_path / "all.json")
    policy = KVPolicyConfig("duo", 8, {"heads": str(path)})
    assert_prefill_and_decode_match_dense(tiny_llm.model, policy, PROMPTS)


# -- CAKE --------------------------------------------------------------------------------------
def test_split_budget_caps_and_total():
    assert split_budget([1.0, 3.0], 40, 100) == [10, 30]  # proportional to preference
    capped = split_budget([1.0, 30.0, 1.0], 60, 25)  # the capped layer's surplus moves on
    assert capped[1] == 25 and sum(capped) <= 60 and capped[0] >= 15 and capped[2] >= 15
    assert split_budget([1.0, 2.0], 500, 100) == [100, 100]  # budget >= context: everything
    assert all(b >= 1 for b in split_budget([0.1] * 4 + [5.0], 10, 100))


def test_cake_layer_budgets_adapt_and_stay_within_total(tiny_llm, monkeypatch):
    llm = with_policy(tiny_llm, KVPolicyConfig("cake", 16, {"window": 4}))
    num_layers = tiny_llm.model.config.num_layers
    during = []
    original = CakePolicy.on_prefill

    def record(self, layer, cache, prompt_lengths):
        original(self, layer, cache, prompt_lengths)
        during.append(sum(cache.capacities))  # memory held while prefill cascades

    monkeypatch.setattr(CakePolicy, "on_prefill", record)
    llm.generate(LONG, SamplingParams(max_tokens=6, ignore_eos=True))
    cache = llm.runner.cache
    assert len(during) == num_layers and max(during) <= 16 * num_layers
    assert sum(cache.capacities) <= 16 * num_layers
    assert len(set(cache.capacities)) > 1, "budgets should follow each layer's preference"
    for capacity, k, pos in zip(cache.capacities, cache.k, cache.pos, strict=True):
        assert k.shape[2] == capacity == pos.shape[2]  # allocated at the budget, no padding
    assert cache.nbytes() * 5 <= dense_bytes(llm, len(LONG) + 6)


def test_cake_keeps_window_and_selects_per_head(tiny_llm):
    llm = with_policy(tiny_llm, KVPolicyConfig("cake", 24, {"window": 4}))
    llm.generate(LONG, SamplingParams(max_tokens=1, ignore_eos=True))
    cache = llm.runner.cache
    window = set(range(len(LONG) - 4, len(LONG)))
    for capacity, pos in zip(cache.capacities, cache.pos, strict=True):
        for head in pos[0]:
            assert window <= set(head.tolist()) or capacity < 4
    assert any(not torch.equal(p[0, 0], p[0, 1]) for p in cache.pos)


# -- DuoAttention ------------------------------------------------------------------------------
def test_duo_streaming_heads_hold_sinks_and_window(tiny_llm, duo_file):
    budget, sinks = 16, 4
    calibration = load_calibration(duo_file, tiny_llm.model)
    assert 0 < calibration.retrieval_fraction < 1
    llm = with_policy(tiny_llm, KVPolicyConfig("duo", budget, {"heads": str(duo_file)}))
    llm.generate(LONG, SamplingParams(max_tokens=6, ignore_eos=True))
    cache = llm.runner.cache
    context = len(LONG) + 6
    last = len(LONG) + 6 - 2  # the final token is never fed back
    for layer, flags in enumerate(calibration.retrieval):
        caps = cache.head_capacities(layer)
        assert caps == [context if r else budget for r in flags]
        for index, store in cache.groups[layer]:
            heads = index.tolist() if index is not None else list(range(len(flags)))
            if flags[heads[0]]:
                continue
            for head in store.pos[0][0]:  # a streaming head: sinks + the recent window
                expected = list(range(sinks)) + list(range(last - budget + sinks + 1, last + 1))
                assert sorted(head.tolist()) == expected
    full = dense_bytes(llm, context)
    share = calibration.retrieval_fraction
    assert cache.nbytes() <= full * (share + (1 - share) * budget / context) + 1
    assert cache.nbytes() < full


def test_duo_missing_file_names_path_and_command(tiny_llm, tmp_path):
    missing = tmp_path / "nope.json"
    llm = with_policy(tiny_llm, KVPolicyConfig("duo", 8, {"heads": str(missing)}))
    with pytest.raises(ValueError) as info:
        llm.generate(LONG, SamplingParams(max_tokens=2))
    message = str(info.value)
    assert str(missing) in message
    assert f"fastdecode calibrate-duo --model {tiny_llm.model.config.hf_config._name_or_path}" in (
        message
    )
    assert f"--out {missing}" in message


def test_duo_rejects_a_file_for_another_model(tiny_llm, duo_file, tiny_model, tmp_path):
    other_dir, _ = tiny_model("qwen3")  # another architecture
    same_shape = tmp_path / "llama-seed1"
    save_tiny_model("llama", same_shape, seed=1)  # same shape, other weights
    for directory in (other_dir, same_shape):
        other = LLM(directory, device="cpu", dtype="float32", progress=False)
        llm = with_policy(other, KVPolicyConfig("duo", 8, {"heads": str(duo_file)}))
        with pytest.raises(ValueError, match="(?s)calibrated for another model.*calibrate-duo"):
            llm.generate(LONG, SamplingParams(max_tokens=2))


def test_calibrate_duo_command_writes_a_file_duo_loads(tiny_llm, tiny_model, tmp_path, capsys):
    from fastdecode.cli import main

    directory, _ = tiny_model("llama")
    out = tmp_path / "cli.json"
    argv = ["calibrate-duo", "--model", str(directory), "--out", str(out), "--length", "64"]
    argv += ["--samples", "1", "--window", "8", "--retrieval-fraction", "0.25", "-q"]
    assert main([*argv, "--device", "cpu", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    calibration = load_calibration(out, tiny_llm.model)
    assert calibration.retrieval_fraction == 0.25
    llm = with_policy(tiny_llm, KVPolicyConfig("duo", 16, {"heads": str(out)}))
    assert len(llm.generate(LONG, SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids)


@pytest.mark.slow
def test_smollm2_cake_and_duo_full_budget_match_dense(smollm2_llm):
    text = "The history of the printing press begins in the fifteenth century. " * 8
    params = SamplingParams(max_tokens=8)
    ref = smollm2_llm.generate(text, params)[0].token_ids
    for name in ("cake", "duo"):
        out = with_policy(smollm2_llm, KVPolicyConfig(name, 1.0)).generate(text, params)[0]
        assert out.token_ids == ref, name
