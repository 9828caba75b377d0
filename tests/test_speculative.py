"""Speculative decoding: draft trees, the verification rules, the n-gram drafter, the batched
loop (greedy parity with plain decoding, KV-cache compaction, tau) and the sampling
distribution (chi-square), plus bad input.

The real SmolLM2-135M (float32, CPU) checks greedy parity and the cache; a tiny random
Llama (vocabulary 128) checks the distribution of speculative sampling.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB
from test_engine import chi_square_critical, chi_square_statistic

from fastdecode import SamplingParams
from fastdecode.api import SpeculativeConfig
from fastdecode.engine.sampling import filtered_probs
from fastdecode.engine.speculative import SpecTiming, run_speculative
from fastdecode.spec import (
    DraftTree,
    make_drafter,
    pad_trees,
    verify_batch,
    verify_greedy,
    verify_sampling,
)
from fastdecode.spec.drafters import NgramDrafter

# -- DraftTree and padding -------------------------------------------------------------------


def test_chain_and_tree_structure():
    chain = DraftTree.chain([5, 6, 7])
    assert chain.parents == [-1, 0, 1] and chain.depth == [1, 2, 3]
    assert chain.children(-1) == [0] and chain.children(2) == []
    assert chain.ancestor_rows(3) == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]
    tree = DraftTree([1, 2, 3, 4], [-1, -1, 0, 1])
    assert tree.depth == [1, 1, 2, 2] and tree.max_depth == 2
    assert tree.children(-1) == [0, 1] and tree.children(1) == [3]
    assert tree.ancestor_rows(4)[3] == [False, True, False, True]
    assert len(tree.truncate(3)) == 3 and tree.truncate(9) is tree
    assert len(DraftTree.empty()) == 0


def test_tree_rejects_bad_shapes():
    with pytest.raises(ValueError, match="topological"):
        DraftTree([1, 2], [1, -1])
    with pytest.raises(ValueError, match="parents"):
        DraftTree([1, 2], [-1])
    with pytest.raises(ValueError, match="draft distributions"):
        DraftTree.chain([1, 2], q=[None])


def test_host_built_verify_inputs_match_on_every_real_column():
    """verify_step_inputs (Python lists, at a graph's width) gives the tree's columns the
    inputs TreeBatch.verify_inputs gives them; padding columns write only the trash slot
    and see only the root's slot."""
    from fastdecode.spec.tree import verify_step_inputs

    trees = [DraftTree([7, 8, 9], [-1, -1, 0]), DraftTree.empty(), DraftTree.chain([4])]
    last, lengths = [1, 2, 3], [5, 2, 3]
    ref = pad_trees(trees).verify_inputs(torch.tensor(last), torch.tensor(lengths))
    for columns in (None, 8):
        tokens, positions, slots, mask = verify_step_inputs(trees, last, lengths, columns, 99)
        width = columns or 4
        assert tokens.shape == (3, width) and mask.local.shape == (3, width, width)
        assert mask.prefix.tolist() == lengths
        for b, tree in enumerate(trees):
            real = 1 + len(tree)
            assert tokens[b, :real].tolist() == ref[0][b, :real].tolist()
            assert positions[b, :real].tolist() == ref[1][b, :real].tolist()
            assert slots[b, :real].tolist() == ref[2][b, :real].tolist()
            assert mask.local[b, :real, :real].tolist() == ref[3].local[b, :real, :real].tolist()
            assert not mask.local[b, :real, real:].any()
            assert set(slots[b, real:].tolist()) <= {99}
            assert all(
                row == [True] + [False] * (mask.local.shape[2] - 1)
                for row in mask.local[b, real:].tolist()
            )
    with pytest.raises(ValueError, match="does not fit"):
        verify_step_inputs(trees, last, lengths, 3)


def test_pad_trees_and_verify_inputs():
    trees = [DraftTree([7, 8, 9], [-1, -1, 0]), DraftTree.empty(), DraftTree.chain([4])]
    batch = pad_trees(trees)
    assert batch.width == 3
    assert batch.valid.tolist() == [[True] * 3, [False] * 3, [True, False, False]]
    lengths = torch.tensor([5, 2, 3])
    tokens, positions, slots, tree = batch.verify_inputs(torch.tensor([1, 2, 3]), lengths)
    assert tree.prefix.tolist() == [5, 2, 3]
    mask = tree.dense(16)
    assert tokens.tolist() == [[1, 7, 8, 9], [2, 0, 0, 0], [3, 4, 0, 0]]
    assert positions[0].tolist() == [5, 6, 6, 7] and positions[2, :2].tolist() == [3, 4]
    assert slots.tolist() == [[5, 6, 7, 8], [2, 3, 4, 5], [3, 4, 5, 6]]
    assert mask.shape == (3, 1, 4, 16)
    row = mask[0, 0]
    assert row[:, :5].all() and not row[:, 9:].any()  # the prefix; nothing past the tree
    assert row[:, 5:9].tolist() == [  # root, node 0, node 1 (sibling of 0), node 2 (child of 0)
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]
    pad = mask[1, 0]  # padded columns see the prefix, the root and themselves, never reals
    assert pad[1, :2].all() and pad[1, 2] and pad[1, 3] and not pad[1, 4:].any()


# -- verification rules on hand-built logits ---------------------------------------------------


def logits_rows(*argmaxes: int, vocab: int = 10) -> torch.Tensor:
    rows = torch.zeros(len(argmaxes), vocab)
    for i, a in enumerate(argmaxes):
        rows[i, a] = 5.0
    return rows


def test_greedy_accepts_longest_matching_prefix_plus_bonus():
    tree = DraftTree.chain([3, 4, 9])
    verdict = verify_greedy(tree, [3, 4, 5, 6])  # the target wants 3, 4, 5, ...
    assert verdict.accepted == [0, 1] and verdict.tokens == [3, 4, 5]
    verdict = verify_greedy(tree, [3, 4, 9, 2])
    assert verdict.accepted == [0, 1, 2] and verdict.tokens == [3, 4, 9, 2]  # bonus token
    verdict = verify_greedy(tree, [1, 4, 9, 2])
    assert verdict.accepted == [] and verdict.tokens == [1]
    assert verify_greedy(DraftTree.empty(), [8]).tokens == [8]


def test_greedy_tree_follows_the_matching_branch():
    # root -> {0: 3, 1: 5}; 0 -> 2: 6; 1 -> 3: 7, 1 -> 4: 8
    tree = DraftTree([3, 5, 6, 7, 8], [-1, -1, 0, 1, 1])
    argmax = [5, 9, 8, 6, 2, 0]  # after root: 5; after node 1: 8; after node 4: 0
    verdict = verify_greedy(tree, argmax)
    assert verdict.accepted == [1, 4] and verdict.tokens == [5, 8, 0]


def test_verify_batch_ragged_rows():
    trees = [DraftTree.chain([3, 4]), DraftTree.empty(), DraftTree.chain([1])]
    logits = torch.stack(
        [logits_rows(3, 4, 7), logits_rows(2, 0, 0), logits_rows(9, 0, 0)]
    )  # [B=3, T=3, V]
    verdicts = verify_batch(trees, logits, [SamplingParams()] * 3, [None] * 3)
    assert [v.tokens for v in verdicts] == [[3, 4, 7], [2], [9]]


def test_sampling_deterministic_proposals_extremes():
    gen = torch.Generator().manual_seed(0)
    sure = torch.zeros(3, 10)
    sure[0, 3] = sure[1, 4] = sure[2, 5] = 1.0  # the target is certain: 3, 4, 5
    verdict = verify_sampling(DraftTree.chain([3, 4]), sure, gen)
    assert verdict.tokens == [3, 4, 5]
    # a proposal the target gives probability 0 is never accepted, and never re-drawn
    probs = torch.full((2, 10), 0.1)
    probs[:, 2] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    for _ in range(50):
        verdict = verify_sampling(DraftTree.chain([2]), probs, gen)
        assert verdict.accepted == [] and verdict.tokens[0] != 2
    # two deterministic siblings: the first rejected one is removed before the second
    one = torch.zeros(3, 10)
    one[0, 7] = 0.5
    one[0, 8] = 0.5
    one[1:, 0] = 1.0
    for _ in range(50):
        verdict = verify_sampling(DraftTree([7, 9], [-1, -1]), one, gen)
        assert verdict.tokens[0] in (7, 8)
        assert verdict.accepted == ([0] if verdict.tokens[0] == 7 else [])


def test_sampling_with_q_equal_to_p_always_accepts():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(2, 10), -1)
    for token in range(10):
        verdict = verify_sampling(DraftTree.chain([token], q=[p[0]]), p, gen)
        assert verdict.accepted == [0]


# -- the n-gram drafter and the registry -------------------------------------------------------


def test_ngram_proposes_what_followed_the_last_match():
    drafter = NgramDrafter(max_ngram=3, min_ngram=1)
    context = [1, 2, 3, 4, 5, 6, 9, 2, 3]
    assert drafter.propose(context, 3).tokens == [4, 5, 6]
    assert drafter.propose(context, 10).tokens == [4, 5, 6, 9, 2, 3]  # up to the end
    assert drafter.propose(context, 0).tokens == []
    assert drafter.propose([1, 2, 3], 4).tokens == []  # no earlier occurrence of 3
    # the longest n wins: "8 2 3" continues with 7, the later bare "3" with 1
    assert drafter.propose([8, 2, 3, 7, 5, 3, 1, 1, 8, 2, 3], 1).tokens == [7]
    # among matches of one n the most recent with enough following tokens is used
    assert drafter.propose([4, 1, 4, 2, 2, 4], 2).tokens == [2, 2]
    assert drafter.propose([4, 1, 1, 3, 4, 4], 2).tokens == [1, 1]


def test_make_drafter_and_config_errors():
    assert isinstance(make_drafter("ngram", max_ngram=2), NgramDrafter)
    with pytest.raises(ValueError, match=r"unknown drafter 'nope'; known drafters: .*ngram"):
        make_drafter("nope")
    with pytest.raises(ValueError, match="unknown drafter"):
        SpeculativeConfig(method="nope")
    with pytest.raises(ValueError, match="num_draft_tokens must be an integer >= 0"):
        SpeculativeConfig(num_draft_tokens=-1)
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        SpeculativeConfig(max_ngram=0)
    config = SpeculativeConfig.from_any(
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}
    )
    assert (config.num_draft_tokens, config.max_ngram) == (3, 2)
    with pytest.raises(ValueError, match="unknown speculative_config key 'bogus'"):
        SpeculativeConfig.from_any({"bogus": 1})


def test_llm_rejects_bad_speculative_config(tiny_llm):
    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        tiny_llm.generate([5, 6], speculative_config={"method": "nope"})
    with pytest.raises(ValueError, match="num_draft_tokens"):
        tiny_llm.generate([5, 6], speculative_config={"num_speculative_tokens": -2})


def test_cli_spec_errors(capsys):
    from fastdecode.cli import main

    assert main(["generate", "--spec", "nope", "hi"]) == 2
    err = capsys.readouterr().err
    assert "error: --spec: unknown drafter 'nope'; known drafters: " in err and "ngram" in err
    assert main(["generate", "--spec", "ngram", "--num-draft-tokens", "-1", "hi"]) == 2
    assert "error: --num-draft-tokens must be an integer >= 0" in capsys.readouterr().err


def test_cli_stats_line_shows_tau():
    from fastdecode import cli
    from fastdecode.api import GenerationResult

    metrics = {"completion_tokens": 9, "tau": 2.25, "draft_tokens": 12, "accepted_tokens": 5}
    line = cli._format_stats(GenerationResult("p", [1], "x", [5] * 9, "length", metrics))
    assert "τ 2.25 tokens/step, accepted 5/12 drafts" in line


# -- the loop on SmolLM2: greedy parity, tau, the cache ---------------------------------------

MAX_TOKENS = 16
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
NGRAM = SpeculativeConfig(method="ngram", num_draft_tokens=4)
# Raw-text prompts with repetition (code, lists), so n-gram drafts get accepted.
SPEC_PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Repeat this list: apple, banana, cherry, date. Again: apple, banana,",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,",
    "for i in range(10):\n    print(i)\nfor j in range(10):\n",
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "a b c d e f g a b c d e f g a b",
    "import os\nimport sys\nimport json\nimport",
    "Monday, Tuesday, Wednesday, Thursday, Friday. Monday, Tuesday,",
    'x = {"name": "Ann", "age": 3}\ny = {"name": "Bob", "age": 4}\nz = {"name":',
    "class A:\n    def __init__(self):\n        self.x = 1\n\nclass B:\n    def __init__(self):\n",
    "red green blue red green blue red green",
    "Q: What is 2+2? A: 4. Q: What is 3+3? A: 6. Q: What is 4+4? A:",
    "<ul>\n  <li>one</li>\n  <li>two</li>\n  <li>",
    "SELECT name FROM users WHERE id = 1;\nSELECT name FROM users WHERE id =",
    "Hello world! Hello world! Hello",
    "if x > 0:\n    y = 1\nelif x < 0:\n    y = -1\nelse:\n",
    "Copy the text exactly. Text: the quick brown fox jumps over the lazy dog. Copy:",
    "January, February, March, April, May, June,",
    "ls -la\ncd /tmp\nls -la\ncd",
    "To be, or not to be, that is the question. To be, or not",
]


@pytest.fixture(scope="module")
def plain_greedy(smollm2_llm) -> list:
    """Plain greedy decoding of SPEC_PROMPTS (one batch; batching invariance of plain
    decoding is test_engine's business)."""
    return smollm2_llm.generate(SPEC_PROMPTS, GREEDY)


@pytest.mark.slow
def test_ngram_greedy_equals_plain_batch_one(smollm2_llm, plain_greedy):
    assert len(SPEC_PROMPTS) >= 20
    taus = []
    for prompt, plain in zip(SPEC_PROMPTS, plain_greedy, strict=True):
        spec = smollm2_llm.generate(prompt, GREEDY, speculative_config=NGRAM)[0]
        assert spec.token_ids == plain.token_ids, prompt
        assert spec.text == plain.text
        taus.append(spec.metrics["tau"])
        assert spec.metrics["spec_steps"] < MAX_TOKENS or spec.metrics["tau"] == 1.0
    assert max(taus) > 1.5 and sum(taus) / len(taus) > 1.1, taus


@pytest.mark.slow
def test_ngram_greedy_equals_plain_batched(smollm2_llm, plain_greedy):
    results = smollm2_llm.generate(SPEC_PROMPTS, GREEDY, speculative_config=NGRAM)
    for prompt, spec, plain in zip(SPEC_PROMPTS, results, plain_greedy, strict=True):
        assert spec.token_ids == plain.token_ids, prompt
    m = results[2].metrics  # counting: drafts get accepted
    assert m["tau"] > 1
    assert len(m["acceptance_per_position"]) == NGRAM.num_draft_tokens
    assert all(0 <= a <= 1 for a in m["acceptance_per_position"])
    assert m["draft_s"] >= 0 and m["verify_s"] > 0
    assert m["accepted_tokens"] <= m["draft_tokens"]


@pytest.mark.slow
def test_tau_above_one_on_repetitive_prompt_with_stops(smollm2_llm):
    prompt = SPEC_PROMPTS[2]
    params = SamplingParams(max_tokens=30, ignore_eos=True, stop=["17"])
    plain = smollm2_llm.generate(prompt, params)[0]
    spec = smollm2_llm.generate(prompt, params, speculative_config=NGRAM)[0]
    assert spec.metrics["tau"] > 1.5
    assert (spec.token_ids, spec.text, spec.finish_reason) == (
        plain.token_ids,
        plain.text,
        plain.finish_reason,
    )


class DecoyTreeDrafter:
    """Proposes a 2-branch tree whose first branch is a wrong decoy, so that accepted nodes
    sit at non-consecutive slots and the loop must move their K/V (compaction)."""

    def __init__(self) -> None:
        self.ngram = NgramDrafter(max_ngram=3)

    def propose(self, context: list[int], max_nodes: int) -> DraftTree:
        chain = self.ngram.propose(context, max(max_nodes - 2, 0)).tokens
        if max_nodes < 3 or not chain:
            return DraftTree.chain(chain[:max_nodes])
        decoy = chain[0] ^ 1
        tokens = [decoy, decoy, *chain]
        parents = [-1, 0, -1, *range(2, 1 + len(chain))]
        return DraftTree(tokens, parents)

    def update(self, accepted: list[int]) -> None:
        pass

    def reset(self) -> None:
        pass


def speculate(llm, prompt: str, params: SamplingParams, drafter, k: int):
    ids = llm.encode(prompt)
    state = llm._new_states([params])[0]
    timing = SpecTiming()
    for _ in run_speculative(llm.runner, [ids], [state], timing, [drafter], k):
        pass
    return ids, state, timing.rows[0]


@pytest.mark.slow
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_cache_after_speculation_equals_plain_cache(smollm2_llm, tree):
    prompt = SPEC_PROMPTS[2]  # counting: drafts get accepted
    drafter = DecoyTreeDrafter() if tree else NgramDrafter()
    ids, state, stats = speculate(smollm2_llm, prompt, GREEDY, drafter, 6)
    assert stats.tau > 1
    length = stats.cache_length
    assert length == len(ids) + MAX_TOKENS - 1  # all but the last emitted token
    cache = smollm2_llm.runner.cache
    spec_k = [k[0, :, :length].clone() for k in cache.k]
    spec_v = [v[0, :, :length].clone() for v in cache.v]
    plain = smollm2_llm.generate(prompt, GREEDY)[0]
    assert state.token_ids == plain.token_ids
    cache = smollm2_llm.runner.cache
    for layer, (k, v) in enumerate(zip(spec_k, spec_v, strict=True)):
        torch.testing.assert_close(k, cache.k[layer][0, :, :length], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(v, cache.v[layer][0, :, :length], atol=1e-4, rtol=1e-4)


# -- the sampling distribution on a tiny random model ------------------------------------------

TRIALS = 20_000
# 5 proposal schemes x 2 statistics (first token, first two tokens) = 10 chi-square tests,
# each at ALPHA: a correct sampler fails any of them with probability <= 10 * ALPHA = 1e-3.
ALPHA = 1e-4
SPEC_SAMPLING = SamplingParams(temperature=1.0, top_k=10)


@pytest.fixture(scope="module")
def two_step_target(tiny_llm):
    """Filtered target distributions of the tiny model after a prompt (p0 [V]) and after the
    prompt plus each possible next token (p1 [V, V]); and its raw logits after the prompt."""
    model = tiny_llm.model
    prompt = [5, 9, 33, 70, 4]
    rows = torch.tensor([prompt + [x] for x in range(TINY_VOCAB)])
    positions = torch.arange(len(prompt) + 1).expand(TINY_VOCAB, -1)
    with torch.inference_mode():
        logits = model.forward(rows, positions, model.new_cache(TINY_VOCAB, 8))
    p0 = filtered_probs(logits[0, -2], SPEC_SAMPLING)
    p1 = filtered_probs(logits[:, -1], SPEC_SAMPLING)
    return p0, p1, logits[0, -2], logits[:, -1]


def random_q(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draft distribution near the target but not equal to it (and wider than top-k)."""
    noise = torch.randn(logits.shape, generator=generator)
    return torch.softmax(logits + 1.5 * noise, -1)


def without(q: torch.Tensor, token: int) -> torch.Tensor:
    q = q.clone()
    q[token] = 0
    return q / q.sum()


def draw_from(q: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(q, 1, generator=generator))


def schemes(target):
    """name -> make_tree(context_tail, draft_generator): the tree proposed after the prompt
    (context_tail None) or after the prompt + one token x (context_tail x)."""
    _, p1, l0, l1 = target
    g = torch.Generator().manual_seed(123)
    q0 = random_q(l0, g)  # draft after the prompt
    q1 = random_q(l1, g)  # [V, V]: draft after the prompt + x
    top0 = torch.argsort(l0, descending=True).tolist()
    top1 = torch.argsort(l1, dim=-1, descending=True).tolist()

    def q_after(x):
        return q0 if x is None else q1[x]

    def chain_q(x, gen):
        if x is not None:  # second step: one node
            return DraftTree.chain([draw_from(q1[x], gen)], q=[q1[x]])
        a = draw_from(q0, gen)
        b = draw_from(q1[a], gen)
        return DraftTree.chain([a, b], q=[q0, q1[a]])

    def tree_iid(x, gen):  # SpecInfer: siblings drawn independently from one q
        q = q_after(x)
        a, b = draw_from(q, gen), draw_from(q, gen)
        if x is not None:
            return DraftTree([a, b], [-1, -1], q=[q, q])
        c, d = draw_from(q1[a], gen), draw_from(q1[b], gen)
        return DraftTree([a, b, c, d], [-1, -1, 0, 1], q=[q, q, q1[a], q1[b]])

    def tree_no_replacement(x, gen):  # Sequoia: the second sibling from q without the first
        q = q_after(x)
        a = draw_from(q, gen)
        q_b = without(q, a)
        b = draw_from(q_b, gen)
        if x is not None:
            return DraftTree([a, b], [-1, -1], q=[q, q_b])
        c = draw_from(q1[a], gen)
        return DraftTree([a, b, c], [-1, -1, 0], q=[q, q_b, q1[a]])

    def chain_deterministic(x, gen):  # n-gram style: fixed tokens, no q
        if x is not None:
            return DraftTree.chain([top1[x][1]])
        return DraftTree.chain([top0[1], top1[top0[1]][0]])

    def tree_deterministic(x, gen):  # fixed siblings, one outside the target's top-k
        if x is not None:
            return DraftTree([top1[x][0], top1[x][50]], [-1, -1])
        a, b, c = top0[2], top0[60], top0[0]
        return DraftTree([a, b, c, top1[a][0], top1[c][1]], [-1, -1, -1, 0, 2])

    del p1
    return {
        "chain-q": chain_q,
        "tree-q-iid": tree_iid,
        "tree-q-without-replacement": tree_no_replacement,
        "chain-deterministic": chain_deterministic,
        "tree-deterministic": tree_deterministic,
    }


def simulate(target, make_tree, trials: int, seed: int) -> torch.Tensor:
    """Counts [V, V] of the first two emitted tokens, running the verify steps the engine
    would run: a second step (from the first token) when the first emitted only one token."""
    p0, p1, _, _ = target
    uniform = torch.full((TINY_VOCAB,), 1.0 / TINY_VOCAB)  # rows for deeper nodes: unused
    verify_gen = torch.Generator().manual_seed(seed)
    draft_gen = torch.Generator().manual_seed(seed + 1)
    counts = torch.zeros(TINY_VOCAB, TINY_VOCAB, dtype=torch.long)

    def probs_for(tree: DraftTree, root: torch.Tensor, x: int | None) -> torch.Tensor:
        rows = [root]
        for token, depth in zip(tree.tokens, tree.depth, strict=True):
            rows.append(p1[token] if x is None and depth == 1 else uniform)
        return torch.stack(rows)

    for _ in range(trials):
        tree = make_tree(None, draft_gen)
        out = verify_sampling(tree, probs_for(tree, p0, None), verify_gen).tokens
        if len(out) < 2:
            x = out[0]
            tree = make_tree(x, draft_gen)
            out = out + verify_sampling(tree, probs_for(tree, p1[x], x), verify_gen).tokens
        counts[out[0], out[1]] += 1
    return counts


@pytest.mark.parametrize(
    "scheme",
    [
        "chain-q",
        "tree-q-iid",
        "tree-q-without-replacement",
        "chain-deterministic",
        "tree-deterministic",
    ],
)
def test_speculative_sampling_reproduces_target_distribution(two_step_target, scheme):
    make_tree = schemes(two_step_target)[scheme]
    seed = 1000 + list(schemes(two_step_target)).index(scheme)
    counts = simulate(two_step_target, make_tree, TRIALS, seed)
    p0, p1, _, _ = two_step_target
    joint = p0[:, None] * p1  # P(first = a, second = b)
    for name, observed, expected in (
        ("first token", counts.sum(1), p0),
        ("two tokens", counts.flatten(), joint.flatten()),
    ):
        stat, df = chi_square_statistic(observed, expected)
        critical = chi_square_critical(df, ALPHA)
        assert stat <= critical, f"{scheme}, {name}: chi-square {stat:.1f} > {critical:.1f}"
    assert counts.flatten()[joint.flatten() == 0].sum() == 0  # nothing outside top-k


def test_engine_speculative_sampling_is_seeded_and_batch_invariant(tiny_llm):
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)
    spec = SpeculativeConfig(num_draft_tokens=3, max_ngram=2)
    alone = tiny_llm.generate(prompt, params, speculative_config=spec)[0]
    again = tiny_llm.generate(prompt, params, speculative_config=spec)[0]
    assert alone.token_ids == again.token_ids and len(alone.token_ids) == 24
    other = SamplingParams(max_tokens=10, temperature=1.0, seed=1)
    batch = tiny_llm.generate(
        [[9, 10, 11], prompt, [40, 41]],
        [other, params, SamplingParams(max_tokens=5)],
        speculative_config=spec,
    )
    assert batch[1].token_ids == alone.token_ids
    assert alone.metrics["spec_steps"] <= 23


def test_tiny_greedy_ngram_and_tree_equal_plain(tiny_llm):
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [40], [3, 4, 3, 4, 3]]
    params = SamplingParams(max_tokens=20)
    plain = tiny_llm.generate(prompts, params)
    for spec in (NGRAM, SpeculativeConfig(num_draft_tokens=0)):
        results = tiny_llm.generate(prompts, params, speculative_config=spec)
        assert [r.token_ids for r in results] == [p.token_ids for p in plain]
        assert [r.finish_reason for r in results] == [p.finish_reason for p in plain]
    for prompt, expected in zip(prompts, plain, strict=True):
        params_i = params
        _, state, _ = speculate(tiny_llm, prompt, params_i, DecoyTreeDrafter(), 6)
        assert state.token_ids == expected.token_ids


class _SpeculationOff:
    """A draft-length policy that always says K = 0 (what goodput says for a large batch)."""

    def __init__(self) -> None:
        self.plain_steps = 0

    def plan(self, rows, stats, max_k):
        return {row: 0 for row in rows}

    def record_verify(self, batch, width, seconds):
        raise AssertionError("no verify step may run while speculation is off")

    def record_plain(self, batch, seconds):
        self.plain_steps += 1


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculation_off_runs_plain_bursts_identical_to_plain(smollm2_llm, temperature):
    """K = 0 everywhere: the loop decodes in on-device bursts (no per-token verify) and emits
    exactly plain decoding's tokens, greedy and seeded sampling alike."""
    prompts = ["Count: 1, 2, 3, 4,", "The capital of France is", "def add(a, b):"]
    params = SamplingParams(max_tokens=19, temperature=temperature, seed=5, stop=["\n\n"])
    plain = smollm2_llm.generate(prompts, params)
    config = SpeculativeConfig.from_any({"method": "suffix", "draft_length": "goodput"})
    off = _SpeculationOff()
    config._engine["length_policy"] = off
    spec = smollm2_llm.generate(prompts, params, speculative_config=config)
    assert [s.token_ids for s in spec] == [p.token_ids for p in plain]
    assert [s.finish_reason for s in spec] == [p.finish_reason for p in plain]
    assert 0 < off.plain_steps < 19  # bursts of several steps, one record each
    assert all(s.metrics["tau"] == 1.0 for s in spec)
