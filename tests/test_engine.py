"""The engine end to end: greedy parity with transformers' generate, batching invariance,
seeded sampling, the sampling distribution itself, stop conditions, streaming, and
SamplingParams validation.

The real SmolLM2-135M (marked slow; still run by default) is used where model behaviour
matters; a tiny random Llama (vocabulary "w3".."w127", eos "<eos>") everywhere else.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from statistics import NormalDist

import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB

from fastdecode import LLM, SamplingParams
from fastdecode.engine.sampling import filtered_probs, make_generator, sample_row, select_tokens

GREEDY_TOKENS = 20
GREEDY = SamplingParams(max_tokens=GREEDY_TOKENS, ignore_eos=True)
# Six prompts of different lengths (1 to 13 tokens).
GREEDY_PROMPTS = [
    "Hi",
    "The capital of France is",
    "def f(x):",
    "List three colors: red,",
    "Once upon a time, in a land far, far away, there lived",
    "1, 2, 3, 4,",
]
TINY_PROMPTS = [[5, 9, 33], [40], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [100, 3]]


def drain(stream: Iterator[str]) -> tuple[list[str], object]:
    """All pieces of an LLM.stream, and its return value (the GenerationResult)."""
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as stop:
            return pieces, stop.value


@pytest.fixture(scope="module")
def greedy_alone(smollm2_llm) -> dict:
    """Each GREEDY_PROMPTS prompt generated on its own (shared by several tests)."""
    return {p: smollm2_llm.generate(p, GREEDY)[0] for p in GREEDY_PROMPTS}


def hf_greedy(hf_model, ids: list[int], max_new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = hf_model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
    return out[0, len(ids) :].tolist()


def assert_matches_hf_up_to_eos(ours: list[int], hf: list[int], eos_ids, n: int) -> None:
    """HF stops at its EOS; ours ran with ignore_eos: equal up to there."""
    assert len(ours) == n
    assert 0 < len(hf) <= n
    assert ours[: len(hf)] == hf
    if len(hf) < n:
        assert hf[-1] in eos_ids


# -- greedy == transformers' generate --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prompt", GREEDY_PROMPTS[1:4])
def test_smollm2_greedy_matches_hf_generate(smollm2_llm, smollm2_hf, greedy_alone, prompt):
    ours = greedy_alone[prompt]
    hf = hf_greedy(smollm2_hf, ours.prompt_token_ids, GREEDY_TOKENS)
    assert_matches_hf_up_to_eos(ours.token_ids, hf, smollm2_llm.eos_ids, GREEDY_TOKENS)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_greedy_matches_hf_generate(tiny_model, arch):
    directory, hf_model = tiny_model(arch)
    llm = LLM(directory, device="cpu", dtype="float32", progress=False)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    results = llm.generate(TINY_PROMPTS, params)  # batched, unequal lengths
    for prompt, result in zip(TINY_PROMPTS, results, strict=True):
        hf = hf_greedy(hf_model, prompt, 16)
        assert_matches_hf_up_to_eos(result.token_ids, hf, llm.eos_ids, 16)


# -- batching --------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_batched_equals_single(smollm2_llm, greedy_alone):
    batched = smollm2_llm.generate(GREEDY_PROMPTS, GREEDY)
    assert len(batched) == len(GREEDY_PROMPTS)
    for prompt, result in zip(GREEDY_PROMPTS, batched, strict=True):
        alone = greedy_alone[prompt]
        assert result.prompt == prompt
        assert result.prompt_token_ids == alone.prompt_token_ids
        assert result.token_ids == alone.token_ids, prompt
        assert result.text == alone.text
        assert result.finish_reason == "length"
        assert len(result.token_ids) == GREEDY_TOKENS


def test_tiny_batched_equals_single_with_mixed_params(tiny_llm):
    """Different max_tokens per request, and a batch limit that splits the prompts."""
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 17, 9, 12)]
    alone = [tiny_llm.generate(p, sp)[0] for p, sp in zip(TINY_PROMPTS, params, strict=True)]
    batched = tiny_llm.generate(TINY_PROMPTS, params)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in batched] == [5, 17, 9, 12]
    old = tiny_llm.max_batch_size
    tiny_llm.max_batch_size = 3
    try:
        split = tiny_llm.generate(TINY_PROMPTS, params)
    finally:
        tiny_llm.max_batch_size = old
    assert [r.token_ids for r in split] == [r.token_ids for r in alone]


def test_finished_rows_ride_at_slot_zero(tiny_llm, monkeypatch):
    """A row that finished decodes at slot 0 from the next check on (its attention reads one
    slot, not its context), and the rows still decoding are unaffected."""
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 15)]
    prompts = TINY_PROMPTS[:2]
    alone = [tiny_llm.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    seen = []
    decode = type(tiny_llm.runner).decode

    def spy(runner, tokens, positions):
        seen.append(positions.tolist())
        return decode(runner, tokens, positions)

    monkeypatch.setattr(type(tiny_llm.runner), "decode", spy)
    batched = tiny_llm.generate(prompts, params)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    short = len(tiny_llm.encode(TINY_PROMPTS[0]))
    assert [row[0] for row in seen[:2]] == [short, short + 1]  # decoding
    assert all(row[0] == 0 for row in seen[2:])  # finished: at slot 0 from then on
    assert len(seen) == 14


# -- seeded sampling -------------------------------------------------------------------------


def sampled(seed: int | None, max_tokens: int = 32, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, **kw)


def test_same_seed_same_tokens(tiny_llm):
    a = tiny_llm.generate(TINY_PROMPTS[0], sampled(1234))[0]
    b = tiny_llm.generate(TINY_PROMPTS[0], sampled(1234))[0]
    assert a.token_ids == b.token_ids
    assert len(a.token_ids) == 32


def test_different_seed_different_tokens(tiny_llm):
    # this random model's most likely next token has p ~ 0.05, so two seeds agreeing on
    # all 32 tokens is astronomically unlikely
    runs = [tiny_llm.generate(TINY_PROMPTS[0], sampled(s))[0].token_ids for s in (1, 2, 3)]
    assert runs[0] != runs[1] and runs[1] != runs[2] and runs[0] != runs[2]
    greedy = tiny_llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=32, ignore_eos=True))
    assert runs[0] != greedy[0].token_ids


def test_unseeded_sampling_varies(tiny_llm):
    a = tiny_llm.generate(TINY_PROMPTS[0], sampled(None))[0]
    b = tiny_llm.generate(TINY_PROMPTS[0], sampled(None))[0]
    assert a.token_ids != b.token_ids


def test_seeded_alone_equals_inside_batch(tiny_llm):
    target = sampled(77, max_tokens=24, top_k=40, top_p=0.9)
    alone = tiny_llm.generate(TINY_PROMPTS[2], target)[0]
    others = [
        SamplingParams(max_tokens=30, ignore_eos=True),  # greedy
        sampled(5, max_tokens=10),
        sampled(None, max_tokens=28),
    ]
    for position in (0, 2):  # the seeded row at the front and in the middle
        params = list(others)
        params.insert(position, target)
        prompts = [TINY_PROMPTS[0], TINY_PROMPTS[1], TINY_PROMPTS[3]]
        prompts.insert(position, TINY_PROMPTS[2])
        batched = tiny_llm.generate(prompts, params)
        assert batched[position].token_ids == alone.token_ids


@pytest.mark.slow
def test_smollm2_seeded_alone_equals_inside_batch(smollm2_llm):
    target = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.95, top_k=50, seed=1234)
    prompt = "Write a short poem about the sea."
    alone = smollm2_llm.generate(prompt, target)[0]
    prompts = ["Hello", prompt, "The three primary colors are", "Tell me a joke."]
    params = [
        SamplingParams(max_tokens=8),
        target,
        SamplingParams(max_tokens=20, temperature=1.0, seed=99),
        SamplingParams(max_tokens=12, temperature=0.7),
    ]
    batched = smollm2_llm.generate(prompts, params)
    assert batched[1].token_ids == alone.token_ids
    assert batched[1].text == alone.text
    assert batched[1].finish_reason == alone.finish_reason


# -- the sampling distribution ---------------------------------------------------------------

SAMPLES = 20_000
# Each chi-square test below is run at ALPHA; there are 3 of them, so the chance that a
# correct sampler fails any of them is <= 3 * ALPHA = 3e-4 (seeds are fixed, so a given
# run is deterministic: this is the false-failure probability over seeds).
ALPHA = 1e-4


def chi_square_critical(df: int, alpha: float) -> float:
    """Upper alpha-quantile of chi-square(df), without scipy: bisection on the exact tail
    P(X > x) = Q(df/2, x/2) (torch's regularized upper incomplete gamma), in float64."""
    half_df = torch.tensor(df / 2, dtype=torch.float64)

    def tail(x: float) -> float:
        return torch.special.gammaincc(half_df, torch.tensor(x / 2, dtype=torch.float64)).item()

    low, high = 0.0, float(df)
    while tail(high) > alpha:
        high *= 2
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if tail(mid) > alpha else (low, mid)
    return (low + high) / 2


def test_chi_square_critical_values():
    # textbook table values (scipy.stats.chi2.isf(alpha, df))
    assert chi_square_critical(1, 0.05) == pytest.approx(3.8415, abs=1e-3)
    assert chi_square_critical(10, 1e-3) == pytest.approx(29.588, abs=1e-3)
    assert chi_square_critical(100, 0.05) == pytest.approx(124.342, abs=1e-3)
    assert chi_square_critical(100, 1e-3) == pytest.approx(149.449, abs=1e-3)
    # and the Wilson-Hilferty approximation agrees to 0.1% at df=100, alpha=1e-4
    z = NormalDist().inv_cdf(1 - 1e-4)
    wilson_hilferty = 100 * (1 - 2 / 900 + z * math.sqrt(2 / 900)) ** 3
    assert chi_square_critical(100, 1e-4) == pytest.approx(wilson_hilferty, rel=1e-3)


def chi_square_statistic(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over tokens with p > 0; bins expecting < 5 draws are pooled."""
    n = counts.sum().item()
    expected = probs.double() * n
    support = probs > 0
    big = support & (expected >= 5)
    obs = [counts[big].double()]
    exp = [expected[big]]
    small = support & ~big
    if small.any():
        obs.append(counts[small].double().sum()[None])
        exp.append(expected[small].sum()[None])
    obs, exp = torch.cat(obs), torch.cat(exp)
    stat = ((obs - exp) ** 2 / exp).sum().item()
    return stat, len(obs) - 1


@pytest.fixture(scope="module")
def tiny_logits(tiny_llm) -> torch.Tensor:
    """Next-token logits [V] of the tiny random Llama after a short prompt."""
    model = tiny_llm.model
    tokens = torch.tensor([[5, 9, 33, 70, 4]])
    with torch.inference_mode():
        logits = model.forward(tokens, torch.arange(5)[None], model.new_cache(1, 8))
    return logits[0, -1].clone()


def reference_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0) -> torch.Tensor:
    """vLLM semantics, computed independently in float64: temperature, then keep the top_k
    largest, then the smallest most-likely prefix whose (renormalized) mass reaches top_p."""
    p = torch.softmax(logits.double() / temperature, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep = torch.zeros_like(keep)
        keep[torch.topk(p, min(top_k, p.numel())).indices] = True
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    if top_p < 1.0:
        values, order = torch.sort(p, descending=True)
        before = values.cumsum(0) - values  # mass strictly before each token
        keep_sorted = before < top_p
        keep = torch.zeros_like(keep)
        keep[order[keep_sorted]] = True
        p = torch.where(keep, p, 0.0)
        p = p / p.sum()
    return p


def draw(probs: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(probs.numel(), dtype=torch.long)
    for _ in range(n):
        counts[sample_row(probs, generator)] += 1
    return counts


@pytest.mark.parametrize(
    ("params", "seed"),
    [
        (SamplingParams(temperature=1.0), 11),
        (SamplingParams(temperature=0.6), 12),
        (SamplingParams(temperature=1.3, top_k=30, top_p=0.8), 13),
    ],
    ids=["t1", "t0.6", "t1.3-k30-p0.8"],
)
def test_sampling_reproduces_distribution(tiny_logits, params, seed):
    """filtered_probs + sample_row draw from the target distribution (chi-square at ALPHA)."""
    target = reference_probs(tiny_logits, params.temperature, params.top_k, params.top_p)
    probs = filtered_probs(tiny_logits, params)
    assert probs.shape == (TINY_VOCAB,)
    torch.testing.assert_close(probs.double(), target, atol=1e-6, rtol=1e-5)
    counts = draw(probs, SAMPLES, seed)
    assert counts[target == 0].sum() == 0, "sampled a token outside the top-k/top-p support"
    stat, df = chi_square_statistic(counts, target)
    critical = chi_square_critical(df, ALPHA)
    assert stat <= critical, f"chi-square {stat:.1f} > {critical:.1f} (df={df})"


def support(probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(probs > 0).flatten().tolist())


@pytest.mark.parametrize("k", [1, 2, 5, 50, TINY_VOCAB - 1, TINY_VOCAB, 1000])
def test_top_k_keeps_exactly_k_most_likely(tiny_logits, k):
    probs = filtered_probs(tiny_logits, SamplingParams(temperature=0.9, top_k=k))
    expected = set(torch.topk(tiny_logits, min(k, TINY_VOCAB)).indices.tolist())
    assert support(probs) == expected
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    target = reference_probs(tiny_logits, 0.9, top_k=k)
    torch.testing.assert_close(probs.double(), target, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("size", "top_k"),
    [(s, 0) for s in (1, 2, 3, 10, 64, TINY_VOCAB)] + [(s, 80) for s in (1, 2, 10, 64, 80)],
)
def test_top_p_keeps_smallest_prefix_reaching_p(tiny_logits, size, top_k):
    """top_p halfway between two cumulative masses keeps exactly `size` tokens."""
    base = reference_probs(tiny_logits, 1.0, top_k=top_k)  # top-p sees the top-k mass
    values, order = torch.sort(base, descending=True)
    cumulative = values.cumsum(0)
    if size == (top_k or TINY_VOCAB):
        top_p = 1.0
    else:
        low = cumulative[size - 2].item() if size >= 2 else 0.0
        top_p = (low + cumulative[size - 1].item()) / 2
    probs = filtered_probs(tiny_logits, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))
    expected = set(order[:size].tolist())
    assert support(probs) == expected
    torch.testing.assert_close(
        probs.double(), reference_probs(tiny_logits, 1.0, top_k, top_p), atol=1e-6, rtol=1e-5
    )


def test_tiny_top_p_keeps_only_the_argmax(tiny_logits):
    probs = filtered_probs(tiny_logits, SamplingParams(temperature=1.0, top_p=1e-6))
    assert support(probs) == {int(tiny_logits.argmax())}
    assert probs.max().item() == pytest.approx(1.0)


def test_select_tokens_greedy_rows_take_argmax_and_seeded_rows_repeat(tiny_logits):
    logits = torch.stack([tiny_logits, -tiny_logits, tiny_logits])
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=3)]
    device = torch.device("cpu")
    first = select_tokens(logits, params, [make_generator(p, device) for p in params])
    again = select_tokens(logits, params, [make_generator(p, device) for p in params])
    assert first[0] == tiny_logits.argmax() and first[1] == tiny_logits.argmin()
    assert first[2] == again[2]
    torch.manual_seed(0)  # the global RNG plays no part
    third = select_tokens(logits, params, [make_generator(p, device) for p in params])
    assert third[2] == first[2]


# -- stop conditions -------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 30])
def test_max_tokens_finishes_with_length(tiny_llm, n):
    result = tiny_llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=n, ignore_eos=True))[0]
    assert result.finish_reason == "length"
    assert len(result.token_ids) == n
    assert result.metrics["completion_tokens"] == n


@pytest.fixture(scope="module")
def tiny_long(tiny_llm):
    """A 40-token greedy continuation of the tiny model, the baseline for stop tests."""
    return tiny_llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))[0]


@pytest.mark.parametrize("at", [0, 6, 25])
def test_stop_string_cuts_text_before_it(tiny_llm, tiny_long, at):
    words = tiny_long.text.split(" ")
    assert len(words) == 40
    stop = " ".join(words[at : at + 2])  # two words: may straddle tokens
    cut = tiny_long.text.find(stop)
    result = tiny_llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=40, stop=stop))[0]
    assert result.finish_reason == "stop"
    assert result.text == tiny_long.text[:cut]
    assert stop not in result.text
    # generation ended on the token that completed the stop string
    ids = result.token_ids
    assert ids == tiny_long.token_ids[: len(ids)]
    assert stop in tiny_llm.tokenizer.decode(ids)
    assert stop not in tiny_llm.tokenizer.decode(ids[:-1])


def test_first_of_several_stop_strings_wins(tiny_llm, tiny_long):
    words = tiny_long.text.split(" ")
    early, late = words[10], " ".join(words[20:22])
    result = tiny_llm.generate(
        TINY_PROMPTS[0], SamplingParams(max_tokens=40, stop=[late, early], ignore_eos=True)
    )[0]
    assert result.finish_reason == "stop"
    assert result.text == tiny_long.text[: tiny_long.text.find(early)]


@pytest.mark.parametrize("at", [0, 9, 33])
def test_stop_token_ids(tiny_llm, tiny_long, at):
    token = tiny_long.token_ids[at]
    first = tiny_long.token_ids.index(token)
    params = SamplingParams(max_tokens=40, stop_token_ids=[token], ignore_eos=True)
    result = tiny_llm.generate(TINY_PROMPTS[0], params)[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == tiny_long.token_ids[:first]  # the stop token is not output
    assert result.text == tiny_llm.tokenizer.decode(tiny_long.token_ids[:first])


def test_eos_ends_generation_unless_ignored(tiny_llm, tiny_long, monkeypatch):
    token = tiny_long.token_ids[12]
    first = tiny_long.token_ids.index(token)
    monkeypatch.setattr(tiny_llm, "eos_ids", frozenset({token}))
    stopped = tiny_llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=40))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == tiny_long.token_ids[:first]
    ignored = tiny_llm.generate(TINY_PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))
    assert ignored[0].token_ids == tiny_long.token_ids
    assert ignored[0].finish_reason == "length"


@pytest.mark.slow
def test_smollm2_chat_stops_at_eos_and_answers_paris(smollm2_llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = smollm2_llm.chat(messages, SamplingParams(max_tokens=64))[0]
    assert result.finish_reason == "stop"
    assert len(result.token_ids) < 64
    assert "Paris" in result.text
    assert not set(result.token_ids) & smollm2_llm.eos_ids  # EOS itself is not output
    assert "<|im_end|>" not in result.text


@pytest.mark.slow
def test_smollm2_stop_string_and_stream(smollm2_llm):
    """A stop string spanning tokens, through generate and through stream (which must hold
    back ', ' while it could still be the start of ', 7')."""
    params = SamplingParams(max_tokens=24, stop=", 7")
    result = smollm2_llm.generate("1, 2, 3, 4,", params)[0]
    assert result.finish_reason == "stop"
    assert result.text == " 5, 6"
    pieces, streamed = drain(smollm2_llm.stream("1, 2, 3, 4,", params))
    assert "".join(pieces) == result.text
    assert streamed.token_ids == result.token_ids
    assert streamed.finish_reason == "stop"


# -- streaming -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prompt", GREEDY_PROMPTS[2:4])
def test_smollm2_stream_equals_generate(smollm2_llm, greedy_alone, prompt):
    pieces, result = drain(smollm2_llm.stream(prompt, GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces) == greedy_alone[prompt].text
    assert result.token_ids == greedy_alone[prompt].token_ids
    assert result.finish_reason == "length"


@pytest.mark.slow
def test_smollm2_stream_multibyte_characters(smollm2_llm):
    """Japanese characters span several byte-level tokens: no piece may hold half of one."""
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompt = "日本の首都は"
    result = smollm2_llm.generate(prompt, params)[0]
    pieces, streamed = drain(smollm2_llm.stream(prompt, params))
    assert "".join(pieces) == result.text
    assert streamed.token_ids == result.token_ids
    assert any(ord(c) > 0x3000 for c in result.text)
    # only the very end (cut by max_tokens mid-character) may show a replacement character
    assert all("\ufffd" not in piece for piece in pieces[:-1])


def test_tiny_stream_equals_generate(tiny_llm, tiny_long):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    pieces, result = drain(tiny_llm.stream(TINY_PROMPTS[0], params))
    assert len(pieces) >= 20
    assert "".join(pieces) == tiny_long.text
    assert result.token_ids == tiny_long.token_ids


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, r"temperature must be >= 0, got -0.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"max_tokens": 0}, r"max_tokens must be a positive integer, got 0"),
        ({"max_tokens": -3}, r"max_tokens must be a positive integer, got -3"),
        ({"max_tokens": 2.5}, r"max_tokens must be a positive integer, got 2.5"),
        ({"top_k": -1}, r"top_k must be >= 0"),
        ({"stop": ["ok", ""]}, r"stop strings must be non-empty"),
    ],
)
def test_sampling_params_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_normalization():
    params = SamplingParams(stop="END")
    assert params.stop == ["END"]
    assert params.greedy
    assert not SamplingParams(temperature=0.1).greedy
    assert SamplingParams(stop=None).stop == []


def test_llm_request_errors(tiny_llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        tiny_llm.generate(["w3", "w4", "w5"], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="empty prompt"):
        tiny_llm.generate("")
    with pytest.raises(ValueError, match="no prompts"):
        tiny_llm.generate([])
    with pytest.raises(ValueError, match="context"):
        tiny_llm.generate("w3", SamplingParams(max_tokens=10_000))


def test_request_filling_the_whole_context_is_accepted(tiny_llm, monkeypatch):
    """The cache capacity is rounded up for reuse, but never past the model's context
    (here 200, not a multiple of the rounding)."""
    import dataclasses

    context = 200
    config = dataclasses.replace(tiny_llm.model.config, max_position=context)
    monkeypatch.setattr(tiny_llm.model, "config", config)
    prompt = [3, 4, 5, 6, 7]
    params = SamplingParams(max_tokens=context - len(prompt) - 3, ignore_eos=True)
    out = tiny_llm.generate(prompt, params)[0]
    assert len(out.token_ids) == params.max_tokens
    assert tiny_llm.runner.cache.capacity <= context
