"""Per-request draft length control: how many draft nodes (K) each row proposes this step.

- `FixedLength`: always K.
- `FeedbackLength`: DiffuSpec's adaptive draft length (ADL): the next K follows recent
  acceptance -- one more after a fully accepted draft, down toward the recent accepted
  length + 1 after a rejection.
- `GoodputLength`: SmartSpec's goodput rule: predict the step time t(B, 1 + K) from measured
  timings (`StepCostModel`) and each row's expected accepted tokens from its acceptance
  history, and pick the K maximizing tokens per second -- K = 0 (plain decoding) when the
  batch is large enough that verification is no longer nearly free.

The confidence early exit of SpecDec++ / Kangaroo acts inside one step, while drafting: see
`fastdecode.spec.tree_growth.ChainGrower(threshold=...)`.

The engine calls `plan(rows, stats, max_k)` once per step (stats[i]: row rows[i]'s
SpecStats) and reports timings with `record_verify` / `record_plain`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from fastdecode.spec.realized import RealizedRates
from fastdecode.spec.step_cost import StepCostModel

# The goodput rule's decisions and what it learned from, at DEBUG (e.g. the benchmarks'
# --rule-log): one line per plan and per recorded timing.
RULE_LOG = logging.getLogger("fastdecode.goodput")


class RowStats(Protocol):
    """What the policies read of `fastdecode.engine.speculative.SpecStats` (cumulative per
    request): verify steps, and per draft depth the steps that proposed / accepted it."""

    steps: int
    proposed: list[int]
    accepted: list[int]


@runtime_checkable
class DraftLengthPolicy(Protocol):
    def plan(self, rows: Sequence[int], stats: Sequence[RowStats], max_k: int) -> dict[int, int]:
        """row -> K in [0, max_k] for the active rows (stats[i] is rows[i]'s record)."""
        ...

    def record_verify(self, batch: int, width: int, seconds: float) -> None:
        """One verify step's wall time: `batch` rows, `width` = T columns per row."""
        ...

    def record_plain(self, batch: int, seconds: float) -> None:
        """One plain decode step's wall time."""
        ...


def _check_k(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_rows(rows: Sequence[int], stats: Sequence[RowStats], max_k: int) -> None:
    _check_k("max_k", max_k)
    if len(rows) != len(stats):
        raise ValueError(f"{len(rows)} rows but {len(stats)} stats (stats[i] is rows[i]'s)")


class _Timeless:
    """Policies that ignore step timings."""

    def record_verify(self, batch: int, width: int, seconds: float) -> None:
        pass

    def record_plain(self, batch: int, seconds: float) -> None:
        pass


class FixedLength(_Timeless):
    """K draft nodes every step (capped by max_k)."""

    def __init__(self, k: int = 4):
        self.k = _check_k("k", k)

    def plan(self, rows: Sequence[int], stats: Sequence[RowStats], max_k: int) -> dict[int, int]:
        _check_rows(rows, stats, max_k)
        return {row: min(self.k, max_k) for row in rows}


class _Outcomes:
    """Each row's outcome since the last look, read off its cumulative SpecStats: the draft
    depth proposed (the sum of `proposed` grows by the tree's depth every step) and the depth
    accepted. Several steps between looks come back as their mean."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[int, list[int], list[int], int]] = {}

    def delta(self, row: int, stats: RowStats) -> tuple[int, list[int], list[int], int]:
        """(new steps, new proposals per depth, new acceptances per depth, new steps that
        had room to draft but proposed nothing)."""
        steps, proposed, accepted = stats.steps, list(stats.proposed), list(stats.accepted)
        unproposed = getattr(stats, "unproposed", 0)
        old_steps, old_p, old_a, old_u = self._seen.get(row, (0, [], [], 0))
        if steps < old_steps:  # a new request reuses the row
            old_steps, old_p, old_a, old_u = 0, [], [], 0
        self._seen[row] = (steps, proposed, accepted, unproposed)
        pad = len(proposed) - len(old_p)
        old_p, old_a = old_p + [0] * pad, old_a + [0] * pad
        return (
            steps - old_steps,
            [n - o for n, o in zip(proposed, old_p, strict=True)],
            [n - o for n, o in zip(accepted, old_a, strict=True)],
            unproposed - old_u,
        )

    def forget(self, row: int) -> None:
        self._seen.pop(row, None)


class FeedbackLength(_Timeless):
    """DiffuSpec's adaptive draft length: K_next = K + 1 after a step that accepted its whole
    draft, else min(K, round(EMA of accepted length) + 1); clamped to [min_k, max_k]. A step
    that proposed nothing leaves K unchanged.

    Outcomes come from the rows' SpecStats at each `plan` (no extra wiring), or explicitly
    through `record_row` (then the stats are not read for that row at the next plan)."""

    def __init__(self, initial: int = 4, min_k: int = 1, smoothing: float = 0.5):
        self.initial = _check_k("initial", initial)
        self.min_k = _check_k("min_k", min_k, 1)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self.smoothing = smoothing  # weight of the past in the EMA
        self.k: dict[int, int] = {}
        self.ema: dict[int, float] = {}
        self._outcomes = _Outcomes()
        self._recorded: set[int] = set()

    def record_row(self, row: int, proposed_depth: int, accepted_depth: int) -> None:
        """One verify step's outcome for `row`: draft depth proposed, depth accepted."""
        self._recorded.add(row)
        self._update(row, float(proposed_depth), float(accepted_depth))

    def _update(self, row: int, proposed: float, accepted: float) -> None:
        if proposed <= 0:
            return
        k = self.k.get(row, self.initial)
        past = self.ema.get(row)
        ema = accepted if past is None else self.smoothing * past + (1 - self.smoothing) * accepted
        self.ema[row] = ema
        if accepted >= proposed:
            k = max(k, math.ceil(proposed) + 1)
        else:
            k = min(k, math.floor(ema + 0.5) + 1)
        self.k[row] = max(self.min_k, k)

    def plan(self, rows: Sequence[int], stats: Sequence[RowStats], max_k: int) -> dict[int, int]:
        _check_rows(rows, stats, max_k)
        plan = {}
        for row, st in zip(rows, stats, strict=True):
            steps, proposed, accepted, _ = self._outcomes.delta(row, st)
            if steps > 0 and row not in self._recorded:
                # the sum over depths of a step's proposals is its draft depth
                self._update(row, sum(proposed) / steps, sum(accepted) / steps)
            self.k[row] = min(self.k.get(row, self.initial), max(max_k, self.min_k))
            plan[row] = min(self.k[row], max_k)
        self._recorded.clear()
        return plan

    def reset_row(self, row: int) -> None:
        """Forget a row (a new request takes it)."""
        self.k.pop(row, None)
        self.ema.pop(row, None)
        self._outcomes.forget(row)


class AcceptanceEstimate:
    """Per-row acceptance rate alpha = P(the draft at depth k + 1 is accepted | depth k was),
    one rate per row (a geometric model), from recent outcomes: counts decay by `decay` per
    step and a Beta prior (`prior` with weight `prior_weight` trials) keeps new rows sane.
    Steps where the row could draft but its drafter proposed nothing count as one rejected
    trial each (`unproposed` in the row's stats, when it keeps that count).

    Per depth, the trials are the steps whose verification reached that depth: all proposals
    at depth 1, and at depth k + 1 the proposals times the acceptance rate at depth k."""

    def __init__(self, prior: float = 0.6, prior_weight: float = 4.0, decay: float = 0.95):
        if not 0.0 <= prior <= 1.0:
            raise ValueError(f"prior must be in [0, 1], got {prior!r}")
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be > 0, got {prior_weight!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        self.prior, self.prior_weight, self.decay = prior, prior_weight, decay
        self._outcomes = _Outcomes()
        self._counts: dict[int, tuple[float, float]] = {}  # row -> (accepted, trials)

    def update(self, row: int, stats: RowStats) -> float:
        steps, proposed, accepted, unproposed = self._outcomes.delta(row, stats)
        hits, trials = self._counts.get(row, (0.0, 0.0))
        if steps > 0:
            # a step with room but no proposal yields no extra token: a rejected first draft
            # (else a drafter with nothing to say keeps the prior and the rule keeps asking)
            new_trials, reach = float(unproposed), 1.0
            for p, a in zip(proposed, accepted, strict=True):
                if p <= 0:
                    break
                new_trials += p * reach
                reach = a / p
            factor = self.decay**steps
            hits, trials = hits * factor + sum(accepted), trials * factor + new_trials
            self._counts[row] = (hits, trials)
        return self.alpha(row)

    def alpha(self, row: int) -> float:
        hits, trials = self._counts.get(row, (0.0, 0.0))
        return (hits + self.prior * self.prior_weight) / (trials + self.prior_weight)

    def forget(self, row: int) -> None:
        self._counts.pop(row, None)
        self._outcomes.forget(row)


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verify step emits with a K-token chain: 1 + sum_{k<=K} alpha^k."""
    return 1.0 + sum(alpha**i for i in range(1, k + 1))


class GoodputLength:
    """SmartSpec: per step, the K maximizing goodput = sum over rows of E[tokens | K] divided by
    the predicted step time t(B, 1 + K) (+ K draft levels when their cost is known); K = 0 when
    plain decoding wins, or does not lose by more than `margin` (relative).

    Rows are padded to one width, so the step time depends on the largest K only: one K for
    all rows is optimal. B is len(rows) unless `plan(..., batch=B)` says otherwise (e.g. when
    finished rows still ride along in the forward).

    The guard (`fastdecode.spec.realized`): the engine also reports the tokens per second
    each mode delivered (`record_tokens`). Once speculation has run at a batch size and
    plain decoding has not -- or not in the last `refresh_every` speculative plans (a stale
    plain rate never contradicts speculation) -- the next plan is a short plain probe
    (`probing` is set: the engine runs PROBE_STEPS plain steps); while speculation's
    realized rate is below plain decoding's, the model's choice is overruled with K = 0,
    except for one exploring speculative step after `explore_every` vetoes, then after
    twice as many each time it loses again (up to `max_explore_every`; counted per batch
    size, as the rates are): exploring is not free (a batch of 32 first proposals indexes
    their prompts), so a rule that keeps losing asks ever more rarely.

    Exploring by steps (`plan(..., explore_by_steps=True)`; TriForce's device cycle, whose
    drafting costs the host nothing): plain bursts leave the acceptance estimate at its
    prior, and a model that says K = 0 is never vetoed, so the per-plan exploring above
    never comes. But acceptance moves within a request (TriForce at 32K x 32: the first two
    cycles of a 128-token continuation emitted ~2 tokens per row, the whole run 3.2 per
    cycle; `longcontext_32k_triforce_*ahead_h100`), so after `explore_steps` plain steps
    one speculative step runs whatever the model says (`exploring` is set for its plan),
    and the interval doubles each time the plan after it goes back to plain (up to
    `max_explore_steps`); the exploring step's realized rate replaces speculation's."""

    def __init__(
        self,
        cost: StepCostModel | None = None,
        acceptance: AcceptanceEstimate | None = None,
        margin: float = 0.0,
        guard: bool = True,
        explore_every: int = 8,
        max_explore_every: int = 256,
        refresh_every: int = 64,
        explore_steps: int = 16,
        max_explore_steps: int = 256,
    ):
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        _check_k("explore_every", explore_every, minimum=1)
        _check_k("max_explore_every", max_explore_every, minimum=explore_every)
        _check_k("refresh_every", refresh_every, minimum=1)
        _check_k("explore_steps", explore_steps, minimum=1)
        _check_k("max_explore_steps", max_explore_steps, minimum=explore_steps)
        self.cost = StepCostModel() if cost is None else cost
        self.acceptance = AcceptanceEstimate() if acceptance is None else acceptance
        self.margin = margin
        self.guard = guard
        self.explore_every = explore_every
        self.max_explore_every = max_explore_every
        self._interval: dict[int, int] = {}  # batch -> vetoes before its next exploring step
        self.refresh_every = refresh_every
        self._since_plain: dict[int, int] = {}  # batch -> speculative plans since plain ran
        self.realized = RealizedRates()
        self.probing = False  # the last plan asks for a short plain probe
        self._vetoes: dict[int, int] = {}  # batch -> vetoes since its last exploring step
        self.last_goodput: dict[int, float] = {}  # K -> predicted tokens / s at the last plan
        self.explore_steps = explore_steps
        self.max_explore_steps = max_explore_steps
        self._plain_steps: dict[int, int] = {}  # batch -> plain steps since it speculated
        self._step_interval: dict[int, int] = {}  # batch -> plain steps before exploring
        self._explored: set[int] = set()  # batches whose last plan explored
        self.exploring = False  # the last plan explores (a step whatever the model says)

    def record_tokens(
        self, batch: int, speculative: bool, tokens: int, seconds: float, steps: int = 1
    ) -> None:
        """Tokens a step (or a plain burst of `steps` steps) emitted over its whole wall
        time, the host's loop and the consumer's work between steps included. An exploring
        step's rate replaces speculation's: the rate before it is at least `explore_steps`
        plain steps old (at 32K x 32 it held the first two cycles' ~2 tokens per row and
        vetoed the exploration that emitted 3.6)."""
        if speculative and batch in self._explored:
            self.realized.forget(batch, True)
        self.realized.record(batch, speculative, tokens, seconds)
        RULE_LOG.debug(
            "tokens batch=%d %s %d in %.3f ms", batch, "spec" if speculative else "plain",
            tokens, seconds * 1e3,
        )  # fmt: skip
        if speculative:
            self._plain_steps[batch] = 0
        else:
            self._since_plain[batch] = 0
            self._plain_steps[batch] = self._plain_steps.get(batch, 0) + steps

    def record_verify(self, batch: int, width: int, seconds: float) -> None:
        RULE_LOG.debug("verify batch=%d width=%d %.3f ms", batch, width, seconds * 1e3)
        self.cost.record(batch, width, seconds)

    def record_plain(self, batch: int, seconds: float) -> None:
        RULE_LOG.debug("plain step batch=%d %.3f ms", batch, seconds * 1e3)
        self.cost.record(batch, 1, seconds)

    def record_draft(self, batch: int, levels: int, seconds: float) -> None:
        """Drafting time of one step (`levels` draft-model passes over `batch` rows)."""
        self.cost.record_draft(batch, levels, seconds)

    def choose_k(
        self,
        alphas: Sequence[float],
        max_k: int,
        batch: int,
        candidates: Sequence[int] | None = None,
    ) -> int:
        """candidates: the Ks a step can run (default 0..max_k; 0 is always one)."""
        ks = range(max_k + 1) if candidates is None else sorted({0, *candidates})
        goodput = {}
        for k in (k for k in ks if k <= max_k):
            tokens = sum(expected_tokens(a, k) for a in alphas)
            goodput[k] = tokens / self.cost.step_time(batch, k)
        self.last_goodput = goodput
        best = max(goodput, key=lambda k: (goodput[k], -k))
        best = best if goodput[best] > goodput[0] * (1 + self.margin) else 0
        chosen = self._guarded(best, batch)
        if RULE_LOG.isEnabledFor(logging.DEBUG):
            RULE_LOG.debug(
                "plan batch=%d rows=%d alpha=%.3f goodput=%s model_k=%d k=%d probing=%s "
                "realized spec=%s plain=%s", batch, len(alphas),
                sum(alphas) / max(1, len(alphas)), {k: round(v) for k, v in goodput.items()},
                best, chosen, self.probing, self.realized.rate(batch, True),
                self.realized.rate(batch, False),
            )  # fmt: skip
        return chosen

    def _guarded(self, k: int, batch: int) -> int:
        """The model's K, unless realized throughput says otherwise (class docstring)."""
        self.probing = False
        if not self.guard or k == 0:
            return k
        spec, plain = self.realized.rate(batch, True), self.realized.rate(batch, False)
        if spec is None:
            return k
        if plain is None or self._since_plain.get(batch, 0) >= self.refresh_every:
            self.probing = True
            return 0
        if spec >= plain * (1 + self.margin):
            self._vetoes[batch], self._interval[batch] = 0, self.explore_every
            self._since_plain[batch] = self._since_plain.get(batch, 0) + 1
            return k
        # per batch size: a config serving mixed batch sizes does not let the losses at
        # one size silence exploring at another
        self._vetoes[batch] = self._vetoes.get(batch, 0) + 1
        interval = self._interval.get(batch, self.explore_every)
        if self._vetoes[batch] < interval:
            return 0
        self._vetoes[batch] = 0  # explore once; if it loses again, wait twice as long
        self._interval[batch] = min(2 * interval, self.max_explore_every)
        return k

    def plan(
        self,
        rows: Sequence[int],
        stats: Sequence[RowStats],
        max_k: int,
        batch: int | None = None,
        candidates: Sequence[int] | None = None,
        explore_by_steps: bool = False,
    ) -> dict[int, int]:
        """candidates: the Ks the loop can run (TriForce's one-graph cycle: 0 or its depth);
        explore_by_steps: explore after `explore_steps` plain steps (class docstring)."""
        _check_rows(rows, stats, max_k)
        self.exploring = False
        if not rows:
            return {}
        alphas = [self.acceptance.update(row, st) for row, st in zip(rows, stats, strict=True)]
        batch = len(rows) if batch is None else batch
        k = self.choose_k(alphas, max_k, batch, candidates)
        if explore_by_steps:
            k = self._explore_stale(k, batch)
        return {row: k for row in rows}

    def _explore_stale(self, k: int, batch: int) -> int:
        """`k`, or the best speculative K when plain decoding has run `explore_steps` (then
        twice as many after each exploration that lost) since speculation last ran."""
        interval = self._step_interval.get(batch, self.explore_steps)
        if batch in self._explored:  # the plan after an exploring step: did it win?
            self._explored.discard(batch)
            interval = self.explore_steps if k else min(2 * interval, self.max_explore_steps)
            self._step_interval[batch] = interval
        speculative = [j for j in self.last_goodput if j > 0]
        if k or self.probing or not speculative or self._plain_steps.get(batch, 0) < interval:
            return k
        self.exploring = True
        self._explored.add(batch)
        RULE_LOG.debug("explore batch=%d after %d plain steps", batch, interval)
        return max(speculative, key=self.last_goodput.get)


POLICIES = {"fixed": FixedLength, "feedback": FeedbackLength, "goodput": GoodputLength}


def make_length_policy(name: str, **kwargs: Any) -> DraftLengthPolicy:
    """'fixed' (k=), 'feedback' (initial=, min_k=, smoothing=), 'goodput' (cost=,
    acceptance=, margin=)."""
    if name not in POLICIES:
        raise ValueError(
            f"unknown draft length policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        )
    try:
        return POLICIES[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for draft length policy {name!r}: {e}") from None
