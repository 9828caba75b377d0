"""The model-free drafters `suffix` (SuffixDecoding) and `stand` (STAND): their statistics
and proposals, greedy parity with plain decoding on SmolLM2 (batched and batch 1), the
global suffix tree across requests, the engine's observe hook, the sampling distribution
with STAND's q (chi-square on the tiny random model), bad arguments and the CLI.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB
from test_speculative import (
    GREEDY,
    MAX_TOKENS,
    SPEC_PROMPTS,
    TRIALS,
    chi_square_critical,
    chi_square_statistic,
    plain_greedy,  # noqa: F401 (fixture)
    random_q,
    simulate,
    speculate,
    two_step_target,  # noqa: F401 (fixture)
)

from fastdecode import SamplingParams
from fastdecode.api import SpeculativeConfig
from fastdecode.spec import DRAFTERS, make_drafter
from fastdecode.spec.drafters import StandDrafter, SuffixDrafter, SuffixTree

# -- the suffix tree --------------------------------------------------------------------------


def test_suffix_tree_counts_and_frequencies():
    tree = SuffixTree(max_depth=4)
    tree.add([1, 2, 3, 1, 2, 4, 1, 2, 3])
    node = tree.find([1, 2])
    assert tree.counts[node] == 3  # "1 2" ends at three positions
    assert tree.frequencies(node) == {3: pytest.approx(2 / 3), 4: pytest.approx(1 / 3)}
    assert tree.counts[tree.find([1, 2, 3])] == 2 and tree.find([3, 3]) is None
    assert tree.find([1, 2, 3, 1, 2]) is None  # deeper than max_depth
    # incremental indexing equals indexing at once; sequences add up
    again = SuffixTree(max_depth=4)
    seq = again.new_sequence()
    for chunk in ([1, 2], [3, 1, 2, 4], [1], [2, 3]):
        again.extend(seq, chunk)
    assert again.children == tree.children and again.counts == tree.counts
    again.add([1, 2, 4])
    assert again.frequencies(again.find([1, 2])) == {3: 0.5, 4: 0.5}
    with pytest.raises(ValueError, match="max_depth"):
        SuffixTree(max_depth=1)


def test_suffix_tree_match_is_the_longest_continued_suffix():
    tree = SuffixTree(max_depth=8)
    tree.add([5, 1, 2, 3, 9, 1, 2, 3])  # "1 2 3" occurs twice, once followed by 9
    node, length = tree.match([7, 5, 1, 2, 3], max_match=6)
    assert length == 4 and node == tree.find([5, 1, 2, 3])  # "5 1 2 3" -> 9
    node, length = tree.match([4, 4, 2, 3], max_match=6)
    assert length == 2 and tree.frequencies(node) == {9: 1.0}  # "2 3" -> only 9 continues
    assert tree.match([8, 8], max_match=6) == (0, 0)
    assert tree.match([7, 5, 1, 2, 3], max_match=2)[1] == 2  # capped


def test_suffix_tree_speculates_a_best_first_tree_by_path_probability():
    tree = SuffixTree(max_depth=8)
    for seq in ([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 4, 5], [0, 6, 7, 8]):
        tree.add(seq)
    node = tree.find([0])
    tokens, parents, probs = tree.speculate(node, budget=10, min_prob=0.0)
    # 0 -> 1 (3/4) -> {2 (1/2), 4 (1/4)} ...; 0 -> 6 (1/4) -> 7 -> 8
    assert tokens[:3] == [1, 2, 3] and parents[:3] == [-1, 0, 1]
    assert probs[:3] == pytest.approx([0.75, 0.5, 0.5])
    assert sorted(tokens) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(p < i for i, p in enumerate(parents))  # topological
    assert probs == sorted(probs, reverse=True)  # best first
    assert tree.speculate(node, budget=2, min_prob=0.0)[0] == [1, 2]
    assert tree.speculate(node, budget=10, min_prob=0.3)[0] == [1, 2, 3]


def test_suffix_drafter_proposes_trees_with_adaptive_length():
    drafter = SuffixDrafter(max_depth=16, spec_factor=1.0, spec_offset=0.0, use_global=False)
    context = [1, 2, 3, 4, 1, 2, 3, 5, 7, 1, 2, 3]
    tree = drafter.propose(context, max_nodes=8)
    # match "1 2 3" (3 tokens): budget 3; continuations 4 and 5 (1/2 each) -> a tree
    assert drafter.budget(3, 8) == 3 and len(tree) == 3 and tree.q is None
    assert tree.children(-1) == [0, 1] and {tree.tokens[0], tree.tokens[1]} == {4, 5}
    assert drafter.propose(context, max_nodes=1).tokens in ([4], [5])
    assert len(drafter.propose(context + [8], max_nodes=8)) == 0  # 8 never seen
    # longer matches speculate deeper
    long = [10, 11, 12, 13, 14, 15, 16, 17, 10, 11, 12, 13]
    drafter.reset()
    assert drafter.propose(long, max_nodes=16).tokens == [14, 15, 16, 17]
    drafter.reset()
    six = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6]  # a 6-token match: 6 nodes
    assert drafter.propose(six, max_nodes=16).tokens == [7, 8, 9, 1, 2, 3]
    drafter.reset()
    assert len(drafter.propose([10, 11, 12, 13, 99, 12, 13], max_nodes=16)) == 2  # p = 2


def test_global_tree_is_shared_by_the_drafters_of_one_config():
    config = SpeculativeConfig(method="suffix", num_draft_tokens=6)
    first, second = config.new_drafter(), config.new_drafter()
    assert first.global_tree is second.global_tree
    other = SpeculativeConfig(method="suffix").new_drafter()
    assert other.global_tree is not first.global_tree
    # request 1 generates an output; request 2 (a new drafter, same prompt) drafts it
    prompt, output = [3, 4, 5], [20, 21, 22, 23, 24, 25, 26, 27]
    first.reset()
    first.propose(prompt, 6)
    first.update(output)
    second.reset()
    assert second.propose(prompt + output[:3], 6).tokens == output[3:9]
    assert len(other.propose(prompt + output[:3], 6)) == 0
    private = SpeculativeConfig(method="suffix", drafter_kwargs={"use_global": False}).new_drafter()
    private.update(output)
    assert len(private.propose(prompt + output[:3], 6)) == 0


# -- STAND statistics ------------------------------------------------------------------------


def dist(vocab: int, **probs: float) -> torch.Tensor:
    row = torch.zeros(vocab)
    for token, p in probs.items():
        row[int(token[1:])] = p
    return row


def test_stand_averages_the_targets_top_k_distributions():
    drafter = StandDrafter(max_ngram=2, min_ngram=1, top_k=2)
    drafter.observe([7, 8], [5], dist(10, t5=0.6, t6=0.3, t1=0.1)[None])
    drafter.observe([9, 8], [6], dist(10, t5=0.2, t6=0.8)[None])
    assert drafter.vocab_size == 10
    sums, seen = drafter.target[(8,)]
    assert seen == 2 and sums == {5: pytest.approx(0.8), 6: pytest.approx(1.1)}  # top-2 only
    assert drafter.distribution([8]) == {5: pytest.approx(0.8 / 1.9), 6: pytest.approx(1.1 / 1.9)}
    # the longest key wins: (7, 8) saw only the first observation
    assert drafter.distribution([7, 8]) == {5: pytest.approx(2 / 3), 6: pytest.approx(1 / 3)}
    # several positions in one call: row j follows context + tokens[:j]
    drafter.observe([1], [2, 3], torch.stack([dist(10, t2=1.0), dist(10, t3=1.0)]))
    assert drafter.distribution([1]) == {2: 1.0} and drafter.distribution([1, 2]) == {3: 1.0}
    assert drafter.distribution([4]) is None


def test_stand_counts_the_prompt_and_prefers_target_statistics():
    drafter = StandDrafter(max_ngram=2)
    drafter.configure(SamplingParams())  # greedy
    context = [1, 2, 3, 1, 2, 4, 1, 2]
    tree = drafter.propose(context, 4)  # counts only: "1 2" -> 3 or 4 (1/2 each)
    assert tree.q is None and tree.children(-1) == [0, 1]
    assert sorted(tree.tokens[:2]) == [3, 4]
    drafter.observe(context, [4], dist(10, t4=0.9, t3=0.1)[None])
    tree = drafter.propose(context, 1)  # the target's statistics now decide: argmax 4
    assert tree.tokens == [4]
    assert len(StandDrafter(use_prompt=False).propose(context, 4)) == 0


def test_stand_sampled_drafts_carry_their_q():
    drafter = StandDrafter(max_ngram=1, width=2)
    drafter.configure(SamplingParams(temperature=1.0, seed=3))
    q_root = dist(6, t1=0.5, t2=0.3, t3=0.2)
    drafter.observe([0], [1], q_root[None])
    drafter.observe([1], [5], dist(6, t5=1.0)[None])
    drafter.observe([2], [4], dist(6, t4=1.0)[None])
    drafter.observe([3], [4], dist(6, t4=1.0)[None])
    seen = set()
    for _ in range(30):
        tree = drafter.propose([0], 4)
        a, b = tree.tokens[:2]
        assert tree.parents[:2] == [-1, -1] and a != b
        torch.testing.assert_close(tree.q[0], q_root.double())
        rest = q_root.double().clone()
        rest[a] = 0
        torch.testing.assert_close(tree.q[1], rest / rest.sum())  # without replacement
        assert tree.parents[2] == 0 and tree.tokens[2] == {1: 5, 2: 4, 3: 4}[a]
        seen.add(a)
    assert seen == {1, 2, 3}
    # seeded: the same drafts again
    runs = []
    for _ in range(2):
        drafter.configure(SamplingParams(temperature=1.0, seed=11))
        runs.append([drafter.propose([0], 3).tokens for _ in range(5)])
    assert runs[0] == runs[1]


def test_bad_drafter_kwargs_raise_value_error():
    assert {"ngram", "suffix", "stand"} <= set(DRAFTERS)
    cases = [
        ("suffix", {"max_depth": 1}, "max_depth"),
        ("suffix", {"max_match": 40}, "max_match"),
        ("suffix", {"spec_factor": -1}, "spec_factor"),
        ("suffix", {"min_token_prob": 2.0}, "min_token_prob"),
        ("suffix", {"bogus": 1}, "bad arguments for drafter 'suffix'.*bogus.*max_depth"),
        ("stand", {"max_ngram": 0}, "min_ngram <= max_ngram"),
        ("stand", {"top_k": 0}, "top_k"),
        ("stand", {"width": 0}, "width"),
        ("stand", {"topk": 3}, "bad arguments for drafter 'stand'.*topk"),
    ]
    for method, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig(method=method, drafter_kwargs=kwargs)
        with pytest.raises(ValueError, match=message):
            make_drafter(method, **kwargs)
    assert SpeculativeConfig(method="stand", drafter_kwargs={"top_k": 4}).new_drafter().top_k == 4
    with pytest.raises(ValueError, match="bad arguments for drafter 'ngram'"):
        SpeculativeConfig(drafter_kwargs={"n": 3})


# -- the CLI ---------------------------------------------------------------------------------


def test_cli_spec_accepts_the_new_drafters(monkeypatch, capsys):
    from test_cli import FakeLLM

    import fastdecode.api
    from fastdecode.cli import main

    class SpecFakeLLM(FakeLLM):
        def __init__(self, model, *, speculative_config=None, **kwargs):
            super().__init__(model, **kwargs)
            self.spec = speculative_config

    monkeypatch.setattr(fastdecode.api, "LLM", SpecFakeLLM)
    for method in ("suffix", "stand"):
        assert main(["generate", "-q", "--spec", method, "--num-draft-tokens", "6", "hi"]) == 0
        spec = SpecFakeLLM.last.spec
        assert (spec.method, spec.num_draft_tokens) == (method, 6)
    capsys.readouterr()
    assert main(["generate", "--spec", "nope", "hi"]) == 2
    assert "known drafters: ngram, stand, suffix" in capsys.readouterr().err


# -- SmolLM2: greedy parity, tau, the global tree -----------------------------------------------

METHODS = ["suffix", "stand"]
BATCH_ONE = [0, 2, 4, 14]  # code, counting, "The cat sat ...", "Hello world! ..."


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_plain_batched(smollm2_llm, plain_greedy, method):  # noqa: F811
    assert len(SPEC_PROMPTS) >= 20
    config = SpeculativeConfig(method=method, num_draft_tokens=4)
    results = smollm2_llm.generate(SPEC_PROMPTS, GREEDY, speculative_config=config)
    for prompt, spec, plain in zip(SPEC_PROMPTS, results, plain_greedy, strict=True):
        assert spec.token_ids == plain.token_ids, prompt
    taus = [r.metrics["tau"] for r in results]
    assert max(taus) > 2 and sum(taus) / len(taus) > 1.2, taus
    assert all(r.metrics["accepted_tokens"] <= r.metrics["draft_tokens"] for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_greedy_equals_plain_batch_one(smollm2_llm, plain_greedy, method):  # noqa: F811
    config = SpeculativeConfig(method=method, num_draft_tokens=4)
    for i in BATCH_ONE:
        spec = smollm2_llm.generate(SPEC_PROMPTS[i], GREEDY, speculative_config=config)[0]
        assert spec.token_ids == plain_greedy[i].token_ids, SPEC_PROMPTS[i]
        if i == 4:  # "The cat sat on the mat. The cat sat on the mat. The cat"
            assert spec.metrics["tau"] > 1.5, spec.metrics
            assert spec.metrics["spec_steps"] < MAX_TOKENS


@pytest.mark.slow
def test_global_tree_raises_acceptance_on_a_repeated_request(smollm2_llm):
    prompt = "Write one sentence about the history of the bicycle."
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    shared = SpeculativeConfig(method="suffix", num_draft_tokens=6)
    first = smollm2_llm.generate(prompt, params, speculative_config=shared)[0]
    again = smollm2_llm.generate(prompt, params, speculative_config=shared)[0]
    alone = SpeculativeConfig(method="suffix", num_draft_tokens=6)
    fresh = smollm2_llm.generate(prompt, params, speculative_config=alone)[0]
    assert first.token_ids == again.token_ids == fresh.token_ids
    # the repeat drafts the first request's output from the global tree
    assert again.metrics["tau"] > max(2.0, fresh.metrics["tau"] + 0.5), (
        again.metrics["tau"],
        fresh.metrics["tau"],
    )


@pytest.mark.slow
def test_stand_sampling_gets_drafts_accepted(smollm2_llm):
    prompt = SPEC_PROMPTS[2]  # counting
    params = SamplingParams(max_tokens=24, temperature=0.7, seed=5, ignore_eos=True)
    config = SpeculativeConfig(method="stand", num_draft_tokens=4)
    result = smollm2_llm.generate(prompt, params, speculative_config=config)[0]
    again = smollm2_llm.generate(prompt, params, speculative_config=config)[0]
    assert result.token_ids == again.token_ids  # seeded drafts and verification
    assert result.metrics["tau"] > 1.3, result.metrics


# -- the engine's observe hook (tiny model) -----------------------------------------------------


class SpyStand(StandDrafter):
    observe_top = None  # the whole distributions, not the batch adapter's top-k

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[list[int], list[int], torch.Tensor]] = []
        self.configured = None

    def configure(self, params: SamplingParams) -> None:
        super().configure(params)
        self.configured = params

    def observe(self, context, tokens, probs) -> None:
        super().observe(context, tokens, probs)
        self.calls.append((list(context), list(tokens), probs.clone()))


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_engine_hands_the_target_distributions_to_observers(tiny_llm, temperature):
    from fastdecode.engine.sampling import filtered_probs

    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    params = SamplingParams(max_tokens=12, temperature=temperature, top_k=20, seed=2)
    drafter = SpyStand(max_ngram=2)
    ids, state, stats = speculate(tiny_llm, " ".join(f"w{t}" for t in prompt), params, drafter, 3)
    assert drafter.configured is params and ids == prompt
    # the calls cover the output in order, each with one distribution per token
    out: list[int] = []
    for context, tokens, probs in drafter.calls:
        assert context == prompt + out and probs.shape == (len(tokens), TINY_VOCAB)
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(tokens)))
        out += tokens
    assert out[: len(state.token_ids)] == state.token_ids
    # and they are the target's: rescore the output with a plain forward pass
    model = tiny_llm.model
    full = torch.tensor([prompt + out])
    with torch.inference_mode():
        logits = model.forward(full, torch.arange(full.shape[1])[None], model.new_cache(1, 64))
    rows = logits[0, len(prompt) - 1 : len(prompt) - 1 + len(out)]
    expected = rows.softmax(-1) if params.greedy else filtered_probs(rows, params)
    got = torch.cat([probs for _, _, probs in drafter.calls])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)
    assert drafter.target  # statistics were kept


# -- the sampling distribution with STAND's q (tiny random model) ------------------------------

# 2 chi-square tests (first token, first two tokens) at 5e-4 each: a correct sampler fails
# this test with probability <= 1e-3.
STAND_ALPHA = 5e-4
PROMPT = [5, 9, 33, 70, 4]  # two_step_target's prompt


def test_stand_speculative_sampling_reproduces_target_distribution(two_step_target):  # noqa: F811
    p0, p1, l0, l1 = two_step_target
    g = torch.Generator().manual_seed(77)
    drafter = StandDrafter(max_ngram=2, top_k=8, width=2, use_prompt=False)
    drafter.configure(SamplingParams(temperature=1.0, seed=9))
    # statistics near the target but not equal to it (noisy, truncated to the top 8)
    drafter.observe(PROMPT, [0], random_q(l0, g)[None])
    q1 = random_q(l1, g)
    for x in range(TINY_VOCAB):
        drafter.observe(PROMPT + [x], [0], q1[x][None])

    def make_tree(x, _gen):
        return drafter.propose(PROMPT if x is None else PROMPT + [x], 4)

    tree = make_tree(None, None)
    assert tree.q is not None and tree.children(-1) == [0, 1] and len(tree) == 4
    counts = simulate(two_step_target, make_tree, TRIALS, seed=4242)
    joint = p0[:, None] * p1
    for name, observed, expected in (
        ("first token", counts.sum(1), p0),
        ("two tokens", counts.flatten(), joint.flatten()),
    ):
        stat, df = chi_square_statistic(observed, expected)
        critical = chi_square_critical(df, STAND_ALPHA)
        assert stat <= critical, f"stand, {name}: chi-square {stat:.1f} > {critical:.1f}"
    assert counts.flatten()[joint.flatten() == 0].sum() == 0


def test_context_view_reads_like_the_concatenated_list():
    """Drafters read each row's context through a view (no copy of a long prompt per step):
    indexing, slicing and iteration agree with prompt + output[:end]."""
    import random

    from fastdecode.engine.spec_state import ContextView

    rng = random.Random(0)
    prompt, output = [rng.randrange(50) for _ in range(37)], [rng.randrange(50) for _ in range(9)]
    for end in (0, 1, 9):
        view, full = ContextView(prompt, output, end), prompt + output[:end]
        assert len(view) == len(full) and list(view) == full
        for i in range(-len(full), len(full)):
            assert view[i] == full[i]
        for _ in range(300):
            a, b = rng.randrange(-60, 60), rng.randrange(-60, 60)
            assert view[a:b] == full[a:b] and view[a:] == full[a:] and view[:b] == full[:b]
        assert view[::3] == full[::3]
        with pytest.raises(IndexError):
            view[len(full)]


def test_ngram_incremental_array_proposes_what_a_fresh_drafter_does():
    """Over the engine's context views the n-gram drafter converts only the tokens added
    since its last call; another request's lists (or a plain list) start over."""
    import random

    from fastdecode.engine.spec_state import ContextView
    from fastdecode.spec.drafters.ngram import NgramDrafter

    rng = random.Random(1)
    prompt, output = [rng.randrange(6) for _ in range(40)], []
    kept = NgramDrafter()
    for step in range(60):
        view = ContextView(prompt, output, len(output))
        for max_nodes in (1, 5):
            fresh = NgramDrafter().propose(list(view), max_nodes)
            assert kept.propose(view, max_nodes).tokens == fresh.tokens, step
        output.extend(rng.randrange(6) for _ in range(rng.randrange(0, 4)))
        if step == 30:  # another request: new lists, a longer context, no reset
            prompt, output = [rng.randrange(6) for _ in range(len(prompt) + 50)], []
        if step == 45:
            assert kept.propose(list(view), 5).tokens == NgramDrafter().propose(view, 5).tokens


def test_suffix_defers_a_long_prompts_older_part_to_idle_time():
    """A prompt past EAGER_PROMPT tokens: its recent part is indexed before the first
    proposal, the rest when the loop hands over idle time; a continuation that only the
    older part holds is proposed once that part is indexed."""
    import random

    from fastdecode.spec.drafters.prompt_backlog import EAGER_PROMPT

    rng = random.Random(3)
    motif = [9001, 9002, 9003, 9004, 9005, 9006]
    prompt = motif + [rng.randrange(5000) for _ in range(EAGER_PROMPT + 500)] + motif[:3]
    drafter = SuffixDrafter(use_global=False)
    first = drafter.propose(prompt, 8)
    assert drafter.backlog == len(prompt) - EAGER_PROMPT
    assert 9004 not in first.tokens  # the motif's continuation lives in the backlog
    while drafter.backlog:
        drafter.idle(0.001)
    assert drafter.propose(prompt, 8).tokens[:3] == [9004, 9005, 9006]
    short = SuffixDrafter(use_global=False)
    short.propose(prompt[-EAGER_PROMPT:], 8)
    assert short.backlog == 0


@pytest.mark.parametrize("make", [lambda: SuffixDrafter(use_global=False), StandDrafter])
def test_a_batch_shares_the_eager_prompt_window_and_reports_indexing_as_catch_up(make):
    """A batch indexes about EAGER_PROMPT prompt tokens before its first proposals (each row
    its share, at least EAGER_MIN), and the time spent indexing is reported as catch-up: the
    goodput rule, which prices K from the per-level draft cost, must not learn a one-off
    prompt index as drafting (it turned speculation off for good at batch 32)."""
    from fastdecode.spec.drafters.batch import PerRowDrafters
    from fastdecode.spec.drafters.prompt_backlog import EAGER_MIN, EAGER_PROMPT

    prompt = list(range(1000, 1600)) * 2
    for batch in (1, 8, 64):
        drafters = PerRowDrafters([make() for _ in range(batch)])
        share = max(EAGER_MIN, EAGER_PROMPT // batch)
        drafters.propose([prompt] * batch, [4] * batch, [len(prompt)] * batch)
        assert all(d.backlog == max(0, len(prompt) - share) for d in drafters.drafters)
        indexed = sum(d.index_s for d in drafters.drafters)
        assert drafters.catch_up_s == pytest.approx(indexed) and indexed > 0
        drafters.propose([prompt] * batch, [0] * batch, [len(prompt)] * batch)
        assert drafters.catch_up_s == 0.0  # rows without room index nothing


@pytest.mark.slow
def test_suffix_over_a_long_prompt_indexes_its_backlog_while_decoding(smollm2_llm):
    """A 2,600-token prompt (an essay's opening, repeated): greedy output = plain, the
    repeat is drafted from, and the older part (the backlog) is indexed by the end."""
    from fastdecode.bench.haystack import essays_dir
    from fastdecode.engine.spec_state import SpecTiming
    from fastdecode.engine.speculative import run_speculative

    essay = smollm2_llm.encode((essays_dir() / "avg.txt").read_text())
    prompt = (essay[:1400] * 2)[:2600]
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    plain = smollm2_llm.generate(prompt, params)[0]
    config = SpeculativeConfig(method="suffix", num_draft_tokens=6)
    drafter = config.batch_drafter(smollm2_llm.runner, smollm2_llm.tokenizer, 1)
    states = smollm2_llm._new_states([params])
    timing = SpecTiming()
    for _ in run_speculative(smollm2_llm.runner, [prompt], states, timing, drafter, 6):
        pass
    assert states[0].token_ids == plain.token_ids
    assert drafter.drafters[0].backlog == 0
    assert timing.rows[0].tau > 2


def test_stand_batch_observation_equals_per_row_observation():
    """The batch adapter takes every row's top-k in one pass: STAND's tables come out as
    if each row had observed its own distributions."""
    from fastdecode.spec.drafters.batch import PerRowDrafters
    from fastdecode.spec.verify import Verdict

    gen = torch.Generator().manual_seed(0)
    contexts = [[1, 2, 3, 4], [5, 6, 7], [1, 2, 9, 9, 4]]
    emitted = [[7, 8], [3], [4, 2, 6]]
    probs = [torch.rand(len(t), 40, generator=gen).softmax(-1) for t in emitted]
    batched = PerRowDrafters([StandDrafter(top_k=5) for _ in contexts])
    batched.want_probs = [True, True, True]
    verdicts = [Verdict([], t, p) for t, p in zip(emitted, probs, strict=True)]
    batched.accept(contexts, verdicts)
    for drafter, context, tokens, p in zip(batched.drafters, contexts, emitted, probs, strict=True):
        alone = StandDrafter(top_k=5)
        alone.observe(context, tokens, p)
        assert_same_tables(drafter, alone)
    # the prefill's distributions, at `begin`: one pass too
    logits = torch.randn(3, 40, generator=gen)
    params = [SamplingParams(temperature=0)] * 3
    batched.begin(contexts, params, [None] * 3, [3, 1, 2], logits)
    for b, drafter in enumerate(batched.drafters):
        alone = StandDrafter(top_k=5)
        alone.configure(params[b])
        alone.observe(contexts[b], [[3, 1, 2][b]], logits[b : b + 1].softmax(-1))
        assert_same_tables(drafter, alone)


def assert_same_tables(drafter: StandDrafter, alone: StandDrafter) -> None:
    assert drafter.target.keys() == alone.target.keys()
    for key, (sums, seen) in alone.target.items():
        other, other_seen = drafter.target[key]
        assert other_seen == seen and other.keys() == sums.keys()
        assert all(abs(other[t] - v) < 1e-6 for t, v in sums.items())


def reference_counts(context: list[int], start: int = 1, max_ngram: int = 3) -> dict:
    """STAND's count table of the tokens `context[start:]`, built the obvious way."""
    counts: dict = {}
    for i in range(max(start, 1), len(context)):
        for n in range(1, min(max_ngram, i) + 1):
            row = counts.setdefault(tuple(context[i - n : i]), {})
            row[context[i]] = row.get(context[i], 0) + 1
    return counts


def test_stand_counts_emitted_tokens_at_update_and_defers_a_long_prompts_head():
    """STAND counts tokens when they are handed over (`update`: during a plain burst the GPU
    is busy with the next one) and, like SuffixDecoding, indexes only the last
    `eager_prompt` prompt tokens before its first proposal, the head in idle time; the
    tables end up those of the whole context, built at once (a batch of 32 code prompts
    counted in front of one exploring step cost ~50 ms: STAND at batch 32 ran 0.91x plain
    with the rule off speculation, spec_batch_h100)."""
    import random

    rng = random.Random(5)
    prompt = [rng.randrange(50) for _ in range(300)]
    drafter = StandDrafter()
    drafter.eager_prompt = 100
    drafter.configure(SamplingParams())
    drafter.update([7])  # before the first proposal (PerRowDrafters.begin): nothing to count
    drafter.propose(prompt, 4)
    assert drafter.backlog == 200 and drafter.index_s > 0
    assert drafter.counts == reference_counts(prompt, start=200)  # keys reach into the head
    emitted = [rng.randrange(50) for _ in range(40)]
    drafter.update(emitted[:25])
    drafter.update(emitted[25:])
    drafter.idle(1.0)
    assert drafter.backlog == 0
    assert drafter.counts == reference_counts(prompt + emitted)
    drafter.propose(prompt + emitted, 4)  # nothing left to catch up
    assert drafter.counts == reference_counts(prompt + emitted)
    more = prompt + emitted + [1, 2, 3]  # tokens `update` never saw: caught up at propose
    drafter.propose(more, 4)
    assert drafter.counts == reference_counts(more)
