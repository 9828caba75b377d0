"""How much host time the speculative loop may hand drafters while the GPU verifies (the
host would only wait for it): deferred drafter work such as SuffixDecoding's prompt
backlog runs in that window."""

from __future__ import annotations

import torch


class IdleClock:
    """How long the host may work while the GPU verifies: a share of the last verify's GPU
    time (CUDA events around the launch, read after the step's host read, when both have
    completed). On a CPU nothing runs asynchronously: a fixed small slice."""

    SHARE = 0.8
    CPU_SLICE_S = 2e-3

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.gpu_s = self.CPU_SLICE_S / self.SHARE
        self.end: torch.cuda.Event | None = None

    def start(self):
        if not self.cuda:
            return None
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin

    def budget(self, begin) -> float:
        """Call right after launching the verify step (records its end)."""
        if begin is not None:
            self.end = torch.cuda.Event(enable_timing=True)
            self.end.record()
        return self.SHARE * self.gpu_s

    def stop(self, begin) -> None:
        """Call after the step's host read (both events have completed)."""
        if begin is not None:
            self.gpu_s = begin.elapsed_time(self.end) / 1e3
