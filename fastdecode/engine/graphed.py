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

from fastdecode.engine.host_copy import to_device
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


_captures = 0  # CUDA graphs captured so far in this process (all CapturedGraphs)


def captures() -> int:
    """How many graphs this process has captured: a step timed across a change of this count
    paid for a capture (and the compiling in its warm-up runs), tens to hundreds of ms that
    are not its cost -- timing-driven rules (the goodput rule) must not learn from it."""
    return _captures


def _flat(inputs) -> list[torch.Tensor]:
    """The tensors of (tokens, positions, slots, mask), a `TreeMask` counting as two."""
    *tensors, mask = inputs
    return tensors + (list(mask) if isinstance(mask, TreeMask) else [mask])


def trash_slot(cache) -> int:
    """The slot padding columns write to: the cache's last one (callers allocate one extra)."""
    return cache.capacity - 1


class CapturedGraphs:
    """One cache's CUDA graphs, captured on first use of each shape key into one memory pool.
    A failed capture never loses the step: the instance warns and runs eagerly from then on."""

    def __init__(self, model, cache, enabled: bool) -> None:
        self.model = model
        self.cache = cache
        self.enabled = enabled and model.device.type == "cuda"
        self._graphs: dict = {}
        self._pool = None

    def _graph(self, key, capture, what: str):
        """The captured (graph, static inputs..., output) for `key`, capturing it now with
        `capture(pool)`; None once a capture has failed (the caller then runs eagerly)."""
        if key not in self._graphs:
            global _captures
            _captures += 1
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                self._graphs[key] = capture(self._pool)
            except Exception as exc:
                warnings.warn(
                    f"CUDA graph capture of {what} failed ({type(exc).__name__}: {exc}); "
                    "running it eagerly",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.enabled = False
                self._capture_failed(exc)
                torch.cuda.synchronize()
                return None
        return self._graphs[key]

    def _capture_failed(self, exc: Exception) -> None:
        """Hook: what else a failed capture rules out."""


class GraphedForward(CapturedGraphs):
    """`model.forward(tokens, positions, cache, slots=, mask=, decode=True)` for one cache,
    optionally over a subset of layers, one CUDA graph per (batch, width bucket, and for a
    `TreeMask` its local block's bucket)."""

    def __init__(
        self, model, cache, *, enabled: bool, layer_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__(model, cache, enabled)
        self.layer_ids = None if layer_ids is None else list(layer_ids)

    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """tokens, positions, slots [B, T]; mask [B, 1, T, capacity] or a `TreeMask` (a verify
        step) -> logits [B, T, V]. Inputs may be on the host (a `TreeMask` verify step): they
        are padded there and sent in two copies (one of the long tensors, packed, one of the
        mask), not built with ~20 small kernels on the device (0.4-0.6 ms of host time per
        verify step at batch 1, with the GPU idle: a third of a plain step)."""
        if not self.enabled:
            return self._forward(*self._on_device(tokens, positions, slots, mask))
        batch, width = tokens.shape
        padded = bucket(width)
        block = bucket(mask.local.shape[2]) if isinstance(mask, TreeMask) else 0
        padded_inputs = self._pad(tokens, positions, slots, mask, padded, block)
        captured = self._graph(
            (batch, padded, block),
            lambda pool: self._capture(pool, *self._on_device(*padded_inputs)),
            f"a {batch}x{padded} forward",
        )
        if captured is None:
            return self._forward(*self._on_device(tokens, positions, slots, mask))
        graph, inputs, logits, packed = captured
        values = _flat(padded_inputs)
        if values[0].device.type == "cpu" and packed is not None:
            longs = torch.cat([v.reshape(-1) for v in values if v.dtype == torch.long])
            packed.copy_(longs.pin_memory(), non_blocking=True)
            for static, value in zip(_flat(inputs), values, strict=True):
                if value.dtype != torch.long:
                    static.copy_(value.pin_memory(), non_blocking=True)
        else:
            for static, value in zip(_flat(inputs), values, strict=True):
                static.copy_(value, non_blocking=True)
        graph.replay()
        return logits[:, :width]

    def _on_device(self, tokens, positions, slots, mask):
        """The inputs on the model's device (pinned, asynchronous copies from the host)."""
        device = self.model.device
        if tokens.device == device:
            return tokens, positions, slots, mask
        move = lambda t: to_device(t, device)  # noqa: E731
        mask = TreeMask(*map(move, mask)) if isinstance(mask, TreeMask) else move(mask)
        return move(tokens), move(positions), move(slots), mask

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

    def _capture_failed(self, exc: Exception) -> None:
        if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):
            self.model.multi_fns = self.model.layer_fns  # the compile failed too

    def _forward(self, tokens, positions, slots, mask) -> torch.Tensor:
        return self.model.forward(
            tokens, positions, self.cache, slots=slots, mask=mask, decode=True,
            layer_ids=self.layer_ids,
        )  # fmt: skip

    def _pad(self, tokens, positions, slots, mask, width: int, block: int):
        """Inputs padded to the graph's width, on their own device: extra columns write the
        trash slot and see only it (a dense mask) or the prefix and the block's first slot
        (`TreeMask.padded`)."""
        device = tokens.device
        batch, extra = tokens.shape[0], width - tokens.shape[1]
        trash = trash_slot(self.cache)
        if isinstance(mask, TreeMask):
            mask = mask.padded(width, block)
        elif extra:
            pad_mask = torch.zeros(batch, 1, extra, mask.shape[-1], dtype=torch.bool, device=device)
            pad_mask[..., trash] = True
            mask = torch.cat([mask, pad_mask], dim=2)
        if extra == 0:
            return tokens, positions, slots, mask
        pad = torch.full((batch, extra), trash, dtype=torch.long, device=device)
        tokens = torch.cat([tokens, torch.zeros_like(pad)], dim=1)
        positions = torch.cat([positions, torch.zeros_like(pad)], dim=1)
        return tokens, positions, torch.cat([slots, pad], dim=1), mask

    def _capture(self, pool, tokens, positions, slots, mask):
        """The graph, its static inputs and output, and `packed`: one buffer the long static
        inputs (tokens, positions, slots, a TreeMask's prefix) are views of, so that a step
        built on the host loads them in one copy."""
        tree = isinstance(mask, TreeMask)
        longs = [tokens, positions, slots] + ([mask.prefix] if tree else [])
        packed = torch.cat([t.reshape(-1) for t in longs])
        views = [part.view(t.shape) for part, t in zip(
            packed.split([t.numel() for t in longs]), longs, strict=True
        )]  # fmt: skip
        mask = TreeMask(views[3], mask.local.clone()) if tree else mask.clone()
        inputs = (*views[:3], mask)
        graph, logits = capture_graph(lambda: self._forward(*inputs), pool)
        return graph, inputs, logits, packed if tree else None


class GraphedDecode(CapturedGraphs):
    """`model.decode_step` over one cache, one CUDA graph per batch size. Whatever the cache's
    Python-side switches say at capture time is baked into the graph (a sparse-reading
    draft and the fully-reading target over one cache need one instance each)."""

    def __init__(self, model, cache, *, enabled: bool) -> None:
        super().__init__(model, cache, enabled and getattr(cache, "graph_safe", False))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions [B] -> logits [B, V]; K/V stored at slot = position."""
        captured = None
        if self.enabled:
            captured = self._graph(
                tokens.shape[0],
                lambda pool: self._capture(pool, tokens, positions),
                "the decode step",
            )
        if captured is None:
            return self.model.decode_step(tokens, positions, self.cache)
        graph, static_tokens, static_positions, logits = captured
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return logits

    def _capture(self, pool, tokens: torch.Tensor, positions: torch.Tensor):
        static_tokens = tokens.clone()
        static_positions = positions.clone()

        def step() -> torch.Tensor:
            return self.model.decode_step(static_tokens, static_positions, self.cache)

        graph, logits = capture_graph(step, pool, warmups=3)
        return graph, static_tokens, static_positions, logits
