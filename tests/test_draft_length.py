"""Draft length policies (fastdecode.spec.length) and the step cost model
(fastdecode.spec.step_cost): fixed K, DiffuSpec's feedback controller, SmartSpec's goodput
rule (K = 0 when a large batch makes verification expensive), and bad input."""

from __future__ import annotations

import pytest

from fastdecode.engine.speculative import SpecStats
from fastdecode.spec.length import (
    AcceptanceEstimate,
    DraftLengthPolicy,
    FeedbackLength,
    FixedLength,
    GoodputLength,
    expected_tokens,
    make_length_policy,
)
from fastdecode.spec.step_cost import StepCostModel, calibrate
from fastdecode.spec.tree import DraftTree


def stats_with(alpha_steps: list[tuple[int, int]]) -> SpecStats:
    """SpecStats after chain steps of (proposed depth, accepted depth)."""
    stats = SpecStats()
    for proposed, accepted in alpha_steps:
        stats.record(DraftTree.chain([0] * proposed), accepted, accepted + 1)
    return stats


def geometric_stats(alpha: float, k: int, steps: int) -> SpecStats:
    """Steps whose accepted depths follow a geometric law: a fraction alpha^d accepts >= d."""
    outcomes = []
    for s in range(steps):
        u = (s + 0.5) / steps
        accepted = 0
        while accepted < k and u < alpha ** (accepted + 1):
            accepted += 1
        outcomes.append((k, accepted))
    return stats_with(outcomes)


# -- fixed and feedback ---------------------------------------------------------------------


def test_fixed_length():
    policy = FixedLength(5)
    assert isinstance(policy, DraftLengthPolicy)
    assert policy.plan([0, 3], [SpecStats(), SpecStats()], max_k=8) == {0: 5, 3: 5}
    assert policy.plan([1], [SpecStats()], max_k=2) == {1: 2}
    assert FixedLength(0).plan([0], [SpecStats()], max_k=4) == {0: 0}
    with pytest.raises(ValueError, match="k must be"):
        FixedLength(-1)
    with pytest.raises(ValueError, match="stats"):
        policy.plan([0, 1], [SpecStats()], max_k=4)
    with pytest.raises(ValueError, match="max_k"):
        policy.plan([0], [SpecStats()], max_k=-1)


def test_feedback_grows_on_full_acceptance_and_shrinks_on_rejection():
    policy = FeedbackLength(initial=3)
    stats = [SpecStats()]
    assert policy.plan([0], stats, max_k=8) == {0: 3}
    for want in (4, 5, 6):  # every draft accepted: one more each step
        policy.record_row(0, proposed_depth=want - 1, accepted_depth=want - 1)
        assert policy.plan([0], stats, max_k=8) == {0: want}
    policy.record_row(0, proposed_depth=6, accepted_depth=1)  # EMA 0.5 * 4.25 + 0.5 = 2.6
    assert policy.plan([0], stats, max_k=8) == {0: 4}
    policy.record_row(0, proposed_depth=4, accepted_depth=0)  # EMA 1.3
    assert policy.plan([0], stats, max_k=8) == {0: 2}
    for _ in range(6):
        policy.record_row(0, proposed_depth=3, accepted_depth=0)
    assert policy.plan([0], stats, max_k=8) == {0: 1}  # never below min_k
    policy.record_row(0, proposed_depth=0, accepted_depth=0)  # nothing proposed: no change
    assert policy.plan([0], stats, max_k=8) == {0: 1}
    for _ in range(20):
        policy.record_row(0, 9, 9)
    assert policy.plan([0], stats, max_k=8) == {0: 8}  # capped by max_k
    assert policy.plan([0], stats, max_k=2) == {0: 2}


def test_feedback_reads_outcomes_off_the_stats():
    policy = FeedbackLength(initial=2)
    a, b = SpecStats(), SpecStats()
    assert policy.plan([0, 1], [a, b], max_k=6) == {0: 2, 1: 2}
    a.record(DraftTree.chain([1, 2]), 2, 3)  # row 0 accepted everything
    b.record(DraftTree.chain([1, 2]), 0, 1)  # row 1 accepted nothing
    assert policy.plan([0, 1], [a, b], max_k=6) == {0: 3, 1: 1}
    a.record(DraftTree.chain([1, 2, 3]), 3, 4)
    assert policy.plan([0, 1], [a, b], max_k=6) == {0: 4, 1: 1}  # row 1: no new step


# -- acceptance and cost ----------------------------------------------------------------------


def test_acceptance_estimate_recovers_a_geometric_rate():
    for alpha in (0.3, 0.6, 0.9):
        estimate = AcceptanceEstimate(decay=1.0)
        got = estimate.update(0, geometric_stats(alpha, k=4, steps=400))
        assert got == pytest.approx(alpha, abs=0.05)
    assert AcceptanceEstimate(prior=0.6).alpha(7) == pytest.approx(0.6)  # unseen row: prior
    assert expected_tokens(0.5, 0) == 1.0
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)


def test_step_cost_model_interpolates_and_anchors_to_the_shape():
    model = StepCostModel()  # the H100 ratios, nothing measured: plain-step units
    assert model.predict(32, 1) == pytest.approx(1.0)
    assert model.predict(32, 4) == pytest.approx(1.62)
    assert model.predict(32, 16) == pytest.approx(2.22)
    assert model.predict(1, 64) == pytest.approx(1.34)
    assert 1.62 < model.predict(32, 6) < 1.74
    model.record(32, 1, 0.010)
    model.record(32, 3, 0.016)
    model.record(32, 9, 0.018)
    assert model.predict(32, 1) == pytest.approx(0.010)
    assert model.predict(32, 5) == pytest.approx(0.016 + 0.002 * 2 / 6)  # interpolated
    assert model.predict(32, 2) == pytest.approx(0.016)  # T = 2 already pays the jump
    anchored = 0.018 * model.relative(32, 17) / model.relative(32, 9)  # the shape, from T = 9
    assert model.predict(32, 17) == pytest.approx(anchored)
    assert model.predict(16, 1) == pytest.approx(0.010)  # nearest measured batch's plain step
    model.record(32, 1, 0.020)  # moving average, weight 0.3
    assert model.predict(32, 1) == pytest.approx(0.013)
    with pytest.raises(ValueError, match="timing"):
        model.record(0, 1, 0.01)


def test_calibrate_times_a_callable():
    calls = []
    table = calibrate(lambda b, t: calls.append((b, t)), batch=4, widths=[1, 5], repeats=3)
    assert set(table) == {(4, 1), (4, 5)} and all(s >= 0 for s in table.values())
    assert calls.count((4, 5)) == 4  # one warm-up + three timed
    model = StepCostModel(table={(4, 1): 0.01, (4, 5): 0.02})
    assert model.predict(4, 5) == 0.02
    assert model.predict(4, 3) == pytest.approx(0.02, rel=0.01)  # the shape is flat there


# -- goodput ------------------------------------------------------------------------------------

# batch 32, relative to a plain step (issue 3): T=4 1.62x, T=8 1.74x, T=16 2.22x
BATCH32 = {(32, 1): 0.010, (32, 4): 0.0162, (32, 8): 0.0174, (32, 16): 0.0222}
BATCH1 = {(1, 1): 0.008, (1, 4): 0.0101, (1, 16): 0.0103}


def test_goodput_turns_speculation_off_for_a_big_batch_with_low_acceptance():
    policy = GoodputLength(StepCostModel(table=BATCH32))
    rows = list(range(32))
    stats = [geometric_stats(0.3, k=4, steps=50) for _ in rows]
    assert policy.plan(rows, stats, max_k=8) == {r: 0 for r in rows}
    assert max(policy.last_goodput, key=policy.last_goodput.get) == 0
    # the same batch with high acceptance still speculates
    policy = GoodputLength(StepCostModel(table=BATCH32))
    stats = [geometric_stats(0.9, k=4, steps=50) for _ in rows]
    assert all(k > 0 for k in policy.plan(rows, stats, max_k=8).values())


def test_goodput_counts_steps_with_nothing_proposed_as_rejections():
    """A drafter with nothing to say (SuffixDecoding without a match) must not keep the
    prior's optimism: steps that had room but proposed nothing lower alpha, so at batch 32
    the rule stops asking (and plain bursts take over)."""
    rows = list(range(32))

    def silent(steps: int) -> SpecStats:
        stats = SpecStats()
        for _ in range(steps):
            stats.record(DraftTree.empty(), 0, 1, asked=True)
        return stats

    policy = GoodputLength(StepCostModel(table=BATCH32))
    assert policy.plan(rows, [SpecStats() for _ in rows], max_k=8)[0] > 0  # the prior alone
    stats = [silent(20) for _ in rows]
    assert stats[0].unproposed == 20 and stats[0].proposed == []
    assert policy.plan(rows, stats, max_k=8) == {r: 0 for r in rows}
    assert policy.acceptance.alpha(0) < 0.2
    # a step the rule itself turned off (room 0) is no evidence either way
    idle = SpecStats()
    idle.record(DraftTree.empty(), 0, 1, asked=False)
    assert idle.unproposed == 0


def test_goodput_speculates_at_batch_one_with_good_acceptance():
    policy = GoodputLength(StepCostModel(table=BATCH1))
    plan = policy.plan([0], [geometric_stats(0.8, k=6, steps=50)], max_k=6)
    assert plan[0] >= 4
    # measured timings move the decision: a verify that costs 3x a plain step stops it
    slow = GoodputLength(StepCostModel(), margin=0.0)
    for width in range(2, 8):
        slow.record_verify(1, width, 0.008 * (1 + 0.5 * (width - 1)))
    slow.record_plain(1, 0.008)
    assert slow.plan([0], [geometric_stats(0.4, k=6, steps=50)], max_k=6) == {0: 0}


def test_goodput_works_from_step_one_and_counts_draft_time():
    policy = GoodputLength()  # no measurement: the default H100 shape
    assert policy.plan([0], [SpecStats()], max_k=4)[0] > 0  # batch 1, prior acceptance
    rows = list(range(32))
    low = [geometric_stats(0.3, k=4, steps=50) for _ in rows]
    assert set(policy.plan(rows, low, max_k=8).values()) == {0}
    # an expensive draft model (a draft level = a whole plain step) makes drafting lose
    policy = GoodputLength(StepCostModel(table=BATCH1))
    policy.record_draft(1, levels=4, seconds=4 * 0.008)
    assert policy.plan([0], [geometric_stats(0.5, k=4, steps=50)], max_k=4) == {0: 0}
    assert policy.plan([], [], max_k=4) == {}


def test_goodput_chooses_among_the_candidates_a_step_can_run():
    """TriForce's one-graph cycle has one depth: the rule weighs K = depth against K = 0
    only (a shorter K would cost the same cycle and emit less)."""
    policy = GoodputLength(StepCostModel(table=BATCH1))
    stats = [geometric_stats(0.8, k=6, steps=50)]
    assert policy.plan([0], stats, max_k=6, batch=1, candidates=(0, 6)) == {0: 6}
    assert set(policy.last_goodput) == {0, 6}
    # a cycle measured at 5 plain steps loses to plain decoding at this acceptance
    slow = GoodputLength(StepCostModel())
    slow.record_plain(1, 0.008)
    slow.record_verify(1, 7, 0.040)
    assert slow.plan([0], stats, max_k=6, batch=1, candidates=(0, 6)) == {0: 0}


def test_make_length_policy():
    assert isinstance(make_length_policy("fixed", k=3), FixedLength)
    assert isinstance(make_length_policy("feedback", initial=2), FeedbackLength)
    assert isinstance(make_length_policy("goodput", margin=0.05), GoodputLength)
    with pytest.raises(ValueError, match="unknown draft length policy 'magic'"):
        make_length_policy("magic")
    with pytest.raises(ValueError, match="k must be"):
        make_length_policy("fixed", k=-2)
    with pytest.raises(ValueError, match="bad arguments"):
        make_length_policy("fixed", K=2)
    with pytest.raises(ValueError, match="min_k"):
        make_length_policy("feedback", min_k=0)
    with pytest.raises(ValueError, match="margin"):
        make_length_policy("goodput", margin=-1)


# -- the goodput rule's guard: realized throughput ---------------------------------------------


def test_realized_rates_average_per_batch_and_mode():
    from fastdecode.spec.realized import RealizedRates

    rates = RealizedRates(smoothing=0.5)
    assert rates.rate(8, True) is None
    rates.record(8, True, 100, 1.0)
    rates.record(8, True, 300, 1.0)
    rates.record(8, False, 0, 1.0)  # nothing emitted: no measurement
    assert rates.rate(8, True) == pytest.approx(200.0)
    assert rates.rate(8, False) is None and rates.rate(32, True) is None
    with pytest.raises(ValueError, match="smoothing"):
        RealizedRates(smoothing=0)


def test_goodput_guard_probes_plain_then_follows_realized_throughput():
    """The model alone would speculate (free verification, high acceptance); realized rates
    overrule it: a plain probe once speculation has been measured alone, K = 0 while
    speculation delivers less, one exploring step after `explore_every` vetoes, then after
    twice as many each time."""
    policy = GoodputLength(explore_every=3)
    policy.record_plain(8, 1.0)
    policy.record_verify(8, 5, 1.0)  # verifying 5 tokens costs a plain step
    alphas = [0.9] * 8
    assert policy.choose_k(alphas, 4, batch=8) == 4 and not policy.probing
    policy.record_tokens(8, True, 30, 1.0)
    assert policy.choose_k(alphas, 4, batch=8) == 0 and policy.probing
    policy.record_tokens(8, False, 100, 1.0)  # plain decoding delivered more
    plans = [policy.choose_k(alphas, 4, batch=8) for _ in range(21)]
    explored = [i for i, k in enumerate(plans) if k]
    assert explored == [2, 8, 20] and not policy.probing  # after 3, then 6, then 12 vetoes
    for _ in range(10):
        policy.record_tokens(8, True, 400, 1.0)  # speculation now delivers more
    plans = [policy.choose_k(alphas, 4, batch=8) for _ in range(policy.refresh_every + 1)]
    assert plans[:-1] == [4] * policy.refresh_every  # ... until plain's rate is stale:
    assert plans[-1] == 0 and policy.probing  # a probe refreshes it
    policy.record_tokens(8, False, 100, 1.0)
    assert policy.choose_k(alphas, 4, batch=8) == 4
    assert policy.choose_k(alphas, 4, batch=32) == 4  # another batch size: no data, no veto
    unguarded = GoodputLength(guard=False)
    unguarded.record_plain(8, 1.0)
    unguarded.record_verify(8, 5, 1.0)
    unguarded.record_tokens(8, True, 1, 1.0)
    unguarded.record_tokens(8, False, 100, 1.0)
    assert unguarded.choose_k(alphas, 4, batch=8) == 4
    with pytest.raises(ValueError, match="explore_every"):
        GoodputLength(explore_every=0)
    with pytest.raises(ValueError, match="refresh_every"):
        GoodputLength(refresh_every=0)
    with pytest.raises(ValueError, match="max_explore_every"):
        GoodputLength(explore_every=8, max_explore_every=4)


def test_goodput_guard_backs_off_per_batch_size():
    """Losses at one batch size lengthen only that size's exploring interval: a config
    serving batches of 8 and 32 explores at 32 on its own schedule."""
    policy = GoodputLength(explore_every=2)
    alphas8, alphas32 = [0.9] * 8, [0.9] * 32
    for batch in (8, 32):
        policy.record_plain(batch, 1.0)
        policy.record_verify(batch, 5, 1.0)
        policy.record_tokens(batch, True, 10, 1.0)
        policy.record_tokens(batch, False, 100, 1.0)  # plain wins at both sizes
    at8 = [policy.choose_k(alphas8, 4, batch=8) for _ in range(14)]
    assert [i for i, k in enumerate(at8) if k] == [1, 5, 13]  # after 2, 4, 8 vetoes
    at32 = [policy.choose_k(alphas32, 4, batch=32) for _ in range(6)]
    assert [i for i, k in enumerate(at32) if k] == [1, 5]  # its own schedule from 2


def test_goodput_explores_by_plain_steps_when_the_model_says_plain():
    """TriForce's cycle (explore_by_steps): a model that says K = 0 never gets vetoed, so
    the per-plan exploring never comes; after `explore_steps` plain steps one speculative
    step runs anyway (`exploring`), the interval doubling each time the plan after it is
    plain again and resetting when speculation wins."""
    policy = GoodputLength(StepCostModel(table=BATCH32), explore_steps=4, max_explore_steps=8)
    rows = list(range(32))
    alpha = {"now": 0.3}
    policy.acceptance.update = lambda row, stats: alpha["now"]

    def plan(plain_steps=0):
        if plain_steps:
            policy.record_tokens(32, False, 32 * plain_steps, 0.01 * plain_steps, plain_steps)
        stats = [SpecStats() for _ in rows]
        k = policy.plan(rows, stats, 4, batch=32, candidates=(0, 4), explore_by_steps=True)[0]
        return k, policy.exploring

    assert plan() == (0, False)
    assert plan(plain_steps=3) == (0, False)
    assert plan(plain_steps=1) == (4, True)  # 4 plain steps: explore
    policy.record_tokens(32, True, 40, 0.02)
    assert plan() == (0, False)  # it lost: next after 8
    assert plan(plain_steps=4) == (0, False)
    assert plan(plain_steps=4) == (4, True)
    policy.record_tokens(32, True, 40, 0.02)
    assert plan() == (0, False)
    assert plan(plain_steps=8) == (4, True)  # capped at max_explore_steps
    policy.record_tokens(32, True, 4000, 1.0)  # more than plain: replaces the stale rate
    assert policy.realized.rate(32, True) == 4000
    alpha["now"] = 0.9
    assert plan() == (4, False)  # it won: back to every 4 plain steps
    alpha["now"] = 0.3
    assert plan(plain_steps=4) == (4, True)
    # the generic loop's plans (explore_by_steps off) never explore by steps
    policy = GoodputLength(StepCostModel(table=BATCH32), explore_steps=1)
    policy.record_tokens(32, False, 3200, 1.0, 100)
    low = [geometric_stats(0.3, k=4, steps=50) for _ in rows]
    assert policy.plan(rows, low, 4, batch=32) == dict.fromkeys(rows, 0)
    assert not policy.exploring
    with pytest.raises(ValueError, match="max_explore_steps"):
        GoodputLength(explore_steps=8, max_explore_steps=4)
