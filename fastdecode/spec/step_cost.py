"""Predicted step time t(B, T): B rows, T columns per row (T = 1 is a plain decode step).

SmartSpec's goodput rule needs t(B, 1 + K) for every K it considers, including widths it has
not run lately. Measured steps are kept per (B, T) as a moving average; a verify width
between two measured verify widths is interpolated; any other width follows a relative cost
shape r(B, T) (cost / plain step at the same batch), anchored at the nearest measured width.
T = 1 (matrix-vector kernels) is never interpolated with T > 1 (matrix-matrix): the issue's
jump from T = 1 to T = 4 happens at T = 2 already. The default
shape is the issue's H100 measurement (1.5B target, context 512), so the rule is sensible
from the first step; `calibrate` measures a real table instead.

Only ratios at one B matter for choosing K, so with no measurement at all the prediction is
in units of a plain step.
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

# Verify cost relative to a 1-token step (issue 3, H100, Qwen2.5-1.5B shape, ctx 512).
H100_RELATIVE_COST: dict[int, dict[int, float]] = {
    1: {1: 1.0, 4: 1.26, 16: 1.29, 64: 1.34},
    8: {1: 1.0, 16: 1.32, 64: 1.95},
    32: {1: 1.0, 4: 1.62, 8: 1.74, 16: 2.22, 64: 5.41},
}


def _interp(points: Mapping[int, float], x: float) -> float:
    """Piecewise-linear through `points`; constant below the first point; above the last,
    linear extrapolation from the last two, never below the last value."""
    xs = sorted(points)
    if x <= xs[0] or len(xs) == 1:
        return points[xs[0]]
    i = min(bisect.bisect_left(xs, x), len(xs) - 1)
    lo, hi = xs[i - 1], xs[i]
    y = points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)
    return max(y, points[hi]) if x > hi else y


def _along_width(points: Mapping[int, float], width: int) -> float:
    """Cost at `width` from costs at some widths. T = 1 runs matrix-vector kernels and any
    T > 1 matrix-matrix ones (the jump in the issue's table), so widths > 1 are interpolated
    among widths > 1 only: a width under the smallest measured one costs as much as it."""
    wide = {w: c for w, c in points.items() if w > 1}
    if width == 1 or not wide:
        return points[1]
    return _interp(wide, width)


class StepCostModel:
    """shape: batch -> {T: cost relative to T = 1} (default: `H100_RELATIVE_COST`);
    table: measured seconds {(B, T): s} to start from (e.g. from `calibrate`); smoothing: the
    weight of a new measurement in the moving average."""

    def __init__(
        self,
        shape: Mapping[int, Mapping[int, float]] | None = None,
        table: Mapping[tuple[int, int], float] | None = None,
        smoothing: float = 0.3,
    ):
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        shape = H100_RELATIVE_COST if shape is None else shape
        if not shape or any(1 not in row or min(row.values()) <= 0 for row in shape.values()):
            raise ValueError("shape needs batches of positive relative costs, each with T = 1")
        self.shape = {
            int(b): {int(t): float(r) for t, r in row.items()} for b, row in shape.items()
        }
        self.smoothing = smoothing
        self._seconds: dict[int, dict[int, float]] = {}  # batch -> width -> seconds
        self._draft: dict[int, float] = {}  # batch -> seconds per draft level
        for (batch, width), seconds in (table or {}).items():
            self.record(batch, width, seconds)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def record(self, batch: int, width: int, seconds: float) -> None:
        """One measured step (width = T columns per row; 1 = plain decoding)."""
        if batch < 1 or width < 1 or not seconds > 0:
            raise ValueError(f"bad step timing: batch={batch}, width={width}, seconds={seconds}")
        row = self._seconds.setdefault(batch, {})
        row[width] = self._average(row.get(width), seconds)

    def record_draft(self, batch: int, levels: int, seconds: float) -> None:
        """Drafting time of one step: `levels` sequential draft passes (0: nothing to learn)."""
        if levels > 0 and seconds >= 0:
            self._draft[batch] = self._average(self._draft.get(batch), seconds / levels)

    def relative(self, batch: int, width: int) -> float:
        """The shape's cost of (batch, width) relative to a plain step at that batch."""
        by_batch = {b: _along_width(row, width) for b, row in self.shape.items()}
        return max(_interp(by_batch, batch), 1e-9)

    def _plain_seconds(self, batch: int) -> float | None:
        """A plain step at `batch` from measurements there, else at the nearest batch."""
        if not self._seconds:
            return None
        nearest = min(self._seconds, key=lambda b: (abs(b - batch), b))
        return self._from_measured(nearest, 1)

    def _from_measured(self, batch: int, width: int) -> float:
        row = self._seconds[batch]
        if width in row:
            return row[width]
        wide = sorted(w for w in row if w > 1)
        i = bisect.bisect_left(wide, width)
        if width > 1 and 0 < i < len(wide):  # between two measured verify widths
            return _interp({w: row[w] for w in wide[i - 1 : i + 1]}, width)
        if wide:
            anchor = wide[0] if i == 0 else wide[-1]
        else:
            anchor = 1
        return row[anchor] * self.relative(batch, width) / self.relative(batch, anchor)

    def predict(self, batch: int, width: int) -> float:
        """Seconds of one step of `batch` rows x `width` columns (plain-step units when
        nothing has been measured)."""
        if batch in self._seconds:
            return self._from_measured(batch, width)
        plain = self._plain_seconds(batch)
        return self.relative(batch, width) * (1.0 if plain is None else plain)

    def draft_seconds(self, batch: int) -> float:
        """Seconds per draft level (0 if never measured: model-free drafters)."""
        if not self._draft or not self._seconds:
            return 0.0
        return self._draft[min(self._draft, key=lambda b: (abs(b - batch), b))]

    def step_time(self, batch: int, k: int) -> float:
        """A speculative step with K draft nodes per row: draft K levels + verify 1 + K."""
        return self.predict(batch, 1 + k) + (k * self.draft_seconds(batch) if k else 0.0)


def calibrate(
    step: Callable[[int, int], object],
    batch: int,
    widths: Sequence[int],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> dict[tuple[int, int], float]:
    """Median wall time of `step(batch, width)` for each width -> {(batch, width): seconds},
    a `StepCostModel(table=...)`. `sync` (e.g. torch.cuda.synchronize) runs before each
    clock read so that asynchronous GPU work is timed."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    table = {}
    for width in widths:
        for _ in range(warmup):
            step(batch, width)
        times = []
        for _ in range(repeats):
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            step(batch, width)
            if sync is not None:
                sync()
            times.append(time.perf_counter() - t0)
        table[(batch, width)] = statistics.median(times)
    return table
