"""Realized decoding throughput, speculative vs plain: the goodput rule's check on itself.

The rule (SmartSpec) predicts a step's time from a cost model, but a speculative step pays
more than the model sees: the host's per-row drafting and bookkeeping, the consumer's work
between steps, catching up after plain bursts. Measured on an H100 (1.5B target, batch 32,
`spec_batch_h100.md`), model-priced speculation with SuffixDecoding ran at 0.5x plain
decoding. So the rule also keeps the tokens per second each mode actually delivered, per
batch size, and speculates only while speculation's realized rate beats plain decoding's.
"""

from __future__ import annotations


class RealizedRates:
    """Moving averages of tokens per second, per (batch, speculative or plain)."""

    def __init__(self, smoothing: float = 0.3) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        self.smoothing = smoothing
        self._rates: dict[tuple[int, bool], float] = {}

    def record(self, batch: int, speculative: bool, tokens: int, seconds: float) -> None:
        """`tokens` emitted by a batch of `batch` rows in `seconds` of wall time."""
        if tokens <= 0 or not seconds > 0:
            return
        key, rate = (batch, speculative), tokens / seconds
        old = self._rates.get(key)
        self._rates[key] = rate if old is None else old + self.smoothing * (rate - old)

    def forget(self, batch: int, speculative: bool) -> None:
        """Drop a rate that no longer describes the mode (the next record replaces it)."""
        self._rates.pop((batch, speculative), None)

    def rate(self, batch: int, speculative: bool) -> float | None:
        """Tokens per second at this batch size (None: not measured)."""
        return self._rates.get((batch, speculative))
