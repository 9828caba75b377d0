"""Drafters while speculation is off (K = 0, the goodput rule at large batch): the draft
model does not run at all -- no prefill, no per-token sync -- and catches up in bulk when a
row drafts again (its cache then equals a prefill of the same text, as eager syncing would
leave it); model-free drafters get every plain step's tokens, in one update per row per
burst. Greedy output stays token-identical to plain greedy throughout."""

from __future__ import annotations

import pytest
import test_model_drafters
import torch
from test_model_drafters import TINY_PROMPTS, draft_config

import fastdecode.spec.drafters.draft_model as draft_model_module
from fastdecode import SamplingParams
from fastdecode.api import SpeculativeConfig
from fastdecode.engine.runner import ModelRunner
from fastdecode.engine.speculative import SpecTiming, run_speculative
from fastdecode.spec.drafters.suffix import SuffixTree
from fastdecode.spec.step_cost import StepCostModel

PARAMS = SamplingParams(max_tokens=70, ignore_eos=True)
PROMPTS = [TINY_PROMPTS[i] for i in (3, 17, 11, 19)]  # 22, 1, 21 and 12 tokens
tiny_drafts = test_model_drafters.tiny_drafts  # the fixture: draft models of the tiny target


class Phases:
    """K = 0 for `off` plans, then max_k for `on` plans, over and over; logs each plan's K
    and what the draft cache held then (`drafter.length`, when given a drafter)."""

    def __init__(self, off: int, on: int, drafter=None) -> None:
        self.off, self.on, self.drafter = off, on, drafter
        self.log: list[tuple[int, list[int] | None]] = []

    def plan(self, rows, stats, max_k):
        k = 0 if len(self.log) % (self.off + self.on) < self.off else max_k
        self.log.append((k, None if self.drafter is None else list(self.drafter.length)))
        return {row: k for row in rows}

    def record_verify(self, batch, width, seconds) -> None:
        pass

    def record_plain(self, batch, seconds) -> None:
        pass


def speculate(llm, spec, prompts, policy_for):
    """Run the loop with `policy_for(drafter)`; (states, drafter, policy)."""
    states = llm._new_states([PARAMS] * len(prompts))
    drafter = spec.batch_drafter(llm.runner, llm.tokenizer, len(prompts))
    policy = policy_for(drafter)
    loop = run_speculative(llm.runner, prompts, states, SpecTiming(), drafter, 4, policy)
    for _ in loop:
        pass
    return states, drafter, policy


@pytest.fixture(scope="module")
def plain(tiny_llm) -> list[list[int]]:
    return [r.token_ids for r in tiny_llm.generate(PROMPTS, PARAMS)]


def test_draft_model_catches_up_in_bulk_after_plain_bursts(
    tiny_llm, tiny_drafts, plain, monkeypatch
):
    monkeypatch.setattr(draft_model_module, "CATCH_UP_CHUNK", 8)  # several chunks per backlog
    backlogs = []
    write = draft_model_module.DraftModelDrafter._write_backlog

    def counting(self, rows):
        backlogs.append(max(len(self.pending[b]) - 1 for b in rows))
        write(self, rows)

    monkeypatch.setattr(draft_model_module.DraftModelDrafter, "_write_backlog", counting)
    spec = draft_config(tiny_drafts["perturbed"], k=4)
    states, drafter, policy = speculate(
        tiny_llm, spec, PROMPTS, lambda drafter: Phases(1, 2, drafter)
    )
    assert [s.token_ids for s in states] == plain
    kinds = [k for k, _ in policy.log]
    assert kinds[:3] == [0, 4, 4] and kinds.count(0) > 1
    # nothing written to the draft cache across a K = 0 step: the draft model did not run
    for (k, before), (_, after) in zip(policy.log, policy.log[1:], strict=False):
        if k == 0:
            assert after == before
    assert policy.log[1][1] == [0] * len(PROMPTS)  # no prefill before the first draft
    assert len(backlogs) >= 2 and max(backlogs) > draft_model_module.CATCH_UP_CHUNK
    # the draft cache holds what a prefill of the same text writes (eager syncing's cache)
    reference = ModelRunner(drafter.runner.model)
    for b, (prompt, state) in enumerate(zip(PROMPTS, states, strict=True)):
        seen = drafter.length[b]
        assert len(prompt) < seen <= len(prompt) + len(state.token_ids)
        reference.allocate(1, seen + 1)
        reference.prefill([(prompt + state.token_ids)[:seen]])
        for layer, (k, v) in enumerate(
            zip(drafter.runner.cache.k, drafter.runner.cache.v, strict=True)
        ):
            torch.testing.assert_close(k[b, :, :seen], reference.cache.k[layer][0, :, :seen])
            torch.testing.assert_close(v[b, :, :seen], reference.cache.v[layer][0, :, :seen])


def test_draft_model_never_runs_while_speculation_is_off(tiny_llm, tiny_drafts, plain, monkeypatch):
    spec = draft_config(tiny_drafts["perturbed"], k=4)
    drafter = spec.batch_drafter(tiny_llm.runner, tiny_llm.tokenizer, len(PROMPTS))
    calls = []
    model = drafter.runner.model
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(model, "decode_step", lambda *a, **k: calls.append(1))
    states, drafter, policy = speculate(tiny_llm, spec, PROMPTS, lambda _: Phases(1, 0))
    assert [s.token_ids for s in states] == plain
    assert not calls and drafter.length == [0] * len(PROMPTS)


def tree_paths(tree: SuffixTree) -> dict[tuple[int, ...], int]:
    """A suffix tree's substrings -> counts (independent of the order nodes were made)."""
    paths, stack = {}, [(0, ())]
    while stack:
        node, path = stack.pop()
        for token, child in tree.children[node].items():
            paths[path + (token,)] = tree.counts[child]
            stack.append((child, path + (token,)))
    return paths


@pytest.mark.parametrize("phases", [(1, 0), (2, 1)], ids=["off", "off-on"])
def test_suffix_gets_every_plain_token_in_bulk(tiny_llm, plain, phases):
    """The global suffix tree ends up holding each request's whole output, as per-token
    updates would leave it, though the last burst's updates were handed over late."""
    config = SpeculativeConfig(method="suffix", num_draft_tokens=4)
    states, _, _ = speculate(tiny_llm, config, PROMPTS, lambda _: Phases(*phases))
    assert [s.token_ids for s in states] == plain
    expected = SuffixTree(config.new_drafter().max_depth)
    for state in states:
        expected.add(state.token_ids)
    assert tree_paths(config._shared["global_tree"]) == tree_paths(expected)


def test_stand_takes_plain_bursts_and_keeps_greedy_output(tiny_llm, plain):
    """STAND learns from the target's distributions, which plain bursts do not hand it: it
    still takes them (K = 0 means no drafting, whatever the drafter), loses only those
    statistics, and the output stays plain greedy."""
    spec = SpeculativeConfig(method="stand", num_draft_tokens=4)
    states, drafter, policy = speculate(tiny_llm, spec, PROMPTS, lambda drafter: Phases(2, 2))
    assert [s.token_ids for s in states] == plain
    kinds = [k for k, _ in policy.log]
    assert kinds.count(0) > 1 and kinds.count(4) > 1


class TimedPhases(Phases):
    """Phases that keep the step timings the loop hands the rule."""

    def __init__(self, off: int, on: int) -> None:
        super().__init__(off, on)
        self.timed: list[str] = []

    def record_verify(self, batch, width, seconds) -> None:
        self.timed.append("verify")

    def record_plain(self, batch, seconds) -> None:
        self.timed.append("plain")


@pytest.mark.parametrize("capturing", [False, True])
def test_steps_that_capture_a_graph_are_not_timed(tiny_llm, plain, monkeypatch, capturing):
    """A CUDA graph capture (and the compiling in its warm-up) inside a step costs tens to
    hundreds of ms: learned as the step's cost, it turned the goodput rule off for good."""
    import fastdecode.engine.plain_burst as burst_module
    import fastdecode.engine.speculative as spec_module

    counter = iter(range(10**6))
    fake = (lambda: next(counter)) if capturing else (lambda: 0)  # a capture between any two looks
    monkeypatch.setattr(spec_module, "captures", fake)
    monkeypatch.setattr(burst_module, "captures", fake)
    spec = SpeculativeConfig("ngram", num_draft_tokens=4)
    states, _, policy = speculate(tiny_llm, spec, PROMPTS, lambda _: TimedPhases(1, 2))
    assert [s.token_ids for s in states] == plain
    if capturing:
        assert policy.timed == []
    else:
        assert {"verify", "plain"} <= set(policy.timed)


def test_goodput_guard_measures_both_modes_in_the_loop(tiny_llm, plain, monkeypatch):
    """The loop reports each step's (and burst's) realized tokens per second to the rule;
    when speculation has been measured and plain decoding not, the next burst is the
    guard's short probe (PROBE_STEPS plain steps)."""
    import fastdecode.engine.speculative as spec_module
    from fastdecode.spec.length import GoodputLength

    events = []
    original = spec_module.plain_burst

    def spy(*args, **kwargs):
        events.append(("burst", kwargs.get("max_steps")))
        return original(*args, **kwargs)

    class Logged(GoodputLength):
        def record_tokens(self, batch, speculative, tokens, seconds, steps=1):
            events.append(("spec" if speculative else "plain", tokens))
            super().record_tokens(batch, speculative, tokens, seconds, steps)

    monkeypatch.setattr(spec_module, "plain_burst", spy)
    policy = Logged(cost=StepCostModel(table={(4, 1): 1.0, (4, 5): 1.0}))
    monkeypatch.setattr(policy.acceptance, "update", lambda row, stats: 0.95)  # K = 4 wins
    policy.realized.record(4, True, 10, 1.0)  # an earlier batch measured speculation only
    spec = SpeculativeConfig("ngram", num_draft_tokens=4)
    states, _, policy = speculate(tiny_llm, spec, PROMPTS, lambda _: policy)
    assert [s.token_ids for s in states] == plain
    assert events[0] == ("burst", spec_module.PROBE_STEPS)  # the probe comes first
    assert events[1] == ("plain", spec_module.PROBE_STEPS * len(PROMPTS))
    kinds = [kind for kind, _ in events]
    assert "spec" in kinds or kinds.count("burst") > 1  # then the rule goes on deciding


def test_stats_count_the_plain_steps_of_bursts(tiny_llm, plain):
    """Rows' records say how many of their target steps were plain (K = 0 bursts): all of
    them when speculation stays off, fewer when it alternates; the API reports them."""
    spec = SpeculativeConfig(method="ngram", num_draft_tokens=4)
    for phases, all_plain in (((1, 0), True), ((1, 2), False)):
        states = tiny_llm._new_states([PARAMS] * len(PROMPTS))
        timing = SpecTiming()
        drafter = spec.batch_drafter(tiny_llm.runner, tiny_llm.tokenizer, len(PROMPTS))
        steps = run_speculative(
            tiny_llm.runner, PROMPTS, states, timing, drafter, 4, Phases(*phases)
        )
        for _ in steps:
            pass
        assert [s.token_ids for s in states] == plain
        for row in timing.rows:
            assert 0 < row.plain_steps <= row.steps
            assert (row.plain_steps == row.steps) == all_plain
    config = SpeculativeConfig(method="ngram", num_draft_tokens=4, draft_length="goodput")
    result = tiny_llm.generate(PROMPTS[0], PARAMS, speculative_config=config)[0]
    assert 0 <= result.metrics["plain_steps"] <= result.metrics["spec_steps"]
