"""Multi-token forwards with explicit slots and masks (verification, drafting), captured as
CUDA graphs.

A verify step at 0.1-2B parameters is bound by kernel launches, not bytes: run eagerly it
costs about two plain (graphed) decode steps, which would eat the speculation's gain. So,
as the decode step, each (batch, width) shape is captured once and replayed with new
inputs copied into static buffers. Widths are rounded up to a few buckets so a handful of
graphs serve every draft size; padding columns write their K/V to the cache's last slot
(`trash_slot`), which the caller keeps out of every real row's reach, and see only it.

On CPU (or with graphs off) the forward simply runs eagerly on the unpadded inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from fastdecode.kv.tree_mask import TreeMask

WIDTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def bucket(width: int) -> int:
    for b in WIDTH_BUCKETS:
        if width <= b:
            return b
    return width


def capture_graph(step, pool, warmups: int = 2):
    """Run `step` a few times on a side stream (compile and autotune stay outside the
    capture), then capture it into a CUDA graph drawing on `pool`; returns (graph, output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = step()
    return graph, output


def _flat(inputs) -> list[torch.Tensor]:
    """The tensors of (tokens, positions, slots, mask), a `TreeMask` counting as two."""
    *tensors, mask = inputs
    return tensors + (list(mask) if isinstance(mask, TreeMask) else [mask])


def trash_slot(cache) -> int:
    """The slot padding columns write to: the cache's last one (callers allocate one extra)."""
    return cache.capacity - 1


class GraphedForward:
    """`model.forward(tokens, positions, cache, slots=, mask=, decode=True)` for one cache,
    optionally over a subset of layers, one CUDA graph per (batch, width bucket, and for a
    `TreeMask` its local block's bucket)."""

    def __init__(
        self, model, cache, *, enabled: bool, layer_ids: Sequence[int] | None = None
    ) -> None:
        self.model = model
        self.cache = cache
        self.enabled = enabled and model.device.type == "cuda"
        self.layer_ids = None if layer_ids is None else list(layer_ids)
        self._graphs: dict[tuple[int, int, int], tuple] = {}
        self._pool = None

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """tokens, positions, slots [B, T]; mask [B, 1, T, capacity] or a `TreeMask` (a verify
        step) -> logits [B, T, V]."""
        if not self.enabled:
            return self._forward(tokens, positions, slots, mask)
        batch, width = tokens.shape
        padded = bucket(width)
        block = bucket(mask.local.shape[2]) if isinstance(mask, TreeMask) else 0
        key = (batch, padded, block)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(
                    *self._pad(tokens, positions, slots, mask, padded, block)
                )
            except Exception as exc:  # never lose the step: fall back to eager forwards
                warnings.warn(
                    f"CUDA graph capture of a {batch}x{padded} forward failed "
                    f"({type(exc).__name__}: {exc}); running these forwards eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.enabled = False
                if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    self.model.multi_fns = self.model.layer_fns  # the compile failed too
                torch.cuda.synchronize()
                return self._forward(tokens, positions, slots, mask)
        graph, inputs, logits = self._graphs[key]
        padded_inputs = self._pad(tokens, positions, slots, mask, padded, block)
        for static, value in zip(_flat(inputs), _flat(padded_inputs), strict=True):
            static.copy_(value, non_blocking=True)
        graph.replay()
        return logits[:, :width]

    def prepare(self, batch: int, max_width: int) -> None:
        """Capture the verify graphs of every width bucket up to `max_width` now, so that a
        step whose draft is shorter than usual (an early exit, the end of a request) never
        pays a capture -- or a first kernel compile -- in the middle of decoding. The dummy
        columns write only the trash slot and read slot 0 onwards (outputs discarded)."""
        if not self.enabled:
            return
        device = self.model.device
        trash = trash_slot(self.cache)
        for width in WIDTH_BUCKETS:
            if width < 2 or width > bucket(max_width):
                continue
            if (batch, width, width) in self._graphs:
                continue
            zeros = torch.zeros(batch, width, dtype=torch.long, device=device)
            slots = torch.full_like(zeros, trash)
            local = torch.eye(width, dtype=torch.bool, device=device).expand(batch, -1, -1)
            mask = TreeMask(torch.zeros(batch, dtype=torch.long, device=device), local)
            self(zeros, zeros, slots, mask)
            if not self.enabled:  # a capture failed: eager from now on
                return

    def _forward(self, tokens, positions, slots, mask) -> torch.Tensor:
        return self.model.forward(
            tokens, positions, self.cache, slots=slots, mask=mask, decode=True,
            layer_ids=self.layer_ids,
        )  # fmt: skip

    def _pad(self, tokens, positions, slots, mask, width: int, block: int):
        device = self.model.device
        tokens, positions, slots, mask = (t.to(device) for t in (tokens, positions, slots, mask))
        if isinstance(mask, TreeMask):
            mask = mask.padded(width, block)
        extra = width - tokens.shape[1]
        if extra == 0:
            return tokens, positions, slots, mask
        batch = tokens.shape[0]
        trash = trash_slot(self.cache)
        pad = torch.full((batch, extra), trash, dtype=torch.long, device=device)
        tokens = torch.cat([tokens, torch.zeros_like(pad)], dim=1)
        positions = torch.cat([positions, torch.zeros_like(pad)], dim=1)
        slots = torch.cat([slots, pad], dim=1)
        if isinstance(mask, TreeMask):
            return tokens, positions, slots, mask
        pad_mask = torch.zeros(batch, 1, extra, mask.shape[-1], dtype=torch.bool, device=device)
        pad_mask[..., trash] = True
        return tokens, positions, slots, torch.cat([mask, pad_mask], dim=2)

    def _capture(self, tokens, positions, slots, mask):
        mask = TreeMask(*(t.clone() for t in mask)) if isinstance(mask, TreeMask) else mask.clone()
        inputs = (*(t.clone() for t in (tokens, positions, slots)), mask)

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, logits = capture_graph(lambda: self._forward(*inputs), self._pool)
        return graph, inputs, logits


class GraphedDecode:
    """`model.decode_step` over one cache, one CUDA graph per batch size. Whatever the cache's
    Python-side switches say at capture time is baked into the graph (a sparse-reading
    draft and the fully-reading target over one cache need one instance each)."""

    def __init__(self, model, cache, *, enabled: bool) -> None:
        self.model = model
        self.cache = cache
        on_cuda = model.device.type == "cuda"
        self.enabled = enabled and on_cuda and getattr(cache, "graph_safe", False)
        self._graphs: dict[int, tuple] = {}
        self._pool = None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B] -> logits [B, V]; K/V stored at slot = position."""
        if not self.enabled:
            return self.model.decode_step(tokens, positions, self.cache)
        batch = tokens.shape[0]
        if batch not in self._graphs:
            try:
                self._graphs[batch] = self._capture(tokens, positions)
            except Exception as exc:  # a cache whose step cannot be captured: run it eagerly
                warnings.warn(
                    f"CUDA graph capture of the decode step failed ({type(exc).__name__}: "
                    f"{exc}); decoding eagerly with this cache",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self.enabled = False
                torch.cuda.synchronize()
                return self.model.decode_step(tokens, positions, self.cache)
        graph, static_tokens, static_positions, logits = self._graphs[batch]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return logits

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor):
        static_tokens = tokens.clone()
        static_positions = positions.clone()

        def step() -> torch.Tensor:
            return self.model.decode_step(static_tokens, static_positions, self.cache)

        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, logits = capture_graph(step, self._pool, warmups=3)
        return graph, static_tokens, static_positions, logits
