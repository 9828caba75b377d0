"""A whole greedy self-speculation cycle -- draft a chain, verify it, accept -- as one CUDA
graph (TriForce, Sun et al. 2024; MagicDec, Chen et al. 2024), run one cycle ahead.

The generic loop goes back to the host between the draft and the verify step: it reads the
drafts, builds the verify inputs, then reads the target's argmax. At long context and batch
32 each of those round trips left the GPU idle while Python ran, and the cycle cost the sum
of the two (measured: 13 ms of GPU work in a 19 ms cycle). For greedy chains nothing needs
the host: the draft feeds its own argmax forward, the verify inputs are the chain laid after
the root, and greedy acceptance is "the longest prefix where the chain equals the target's
argmax". So the cycle runs on the device and the host reads once, at the end: per row the
chain, the accepted length and the target's token after it.

Run-ahead: the cycle also computes the next cycle's inputs on the device (the root is the
target's token, the prefix grows by the accepted chain + 1, the room shrinks with each
row's token budget), so the next cycle can be launched *before* the host reads this one.
The host's work per cycle (emitting tokens, stop checks, the length rule, ~2 ms at batch
32) then overlaps the GPU's next cycle instead of leaving it idle (one graph alone: 12.8 ms
of GPU work in a 14.9 ms cycle at 32K x 32). The host stays in charge: the next call passes
its own inputs; the cycle launched ahead is used when they agree with what the device
computed for every row still decoding, and is dropped (its writes land past each row's
prefix, where the next cycle overwrites them) when they do not -- a changed draft budget,
a row that was given no room. A row that stops on a token the device cannot see (EOS, a
stop string) runs one cycle more on the device, and its output is ignored; the host marks
it finished before the cycle after.

Same tokens as the generic path (`draft_trees` + `verify_greedy`): a chain node is a decode
step of the draft at slot = position, the verify step writes the root and the chain at the
slots right after the row's prefix (accepted nodes are already in place: nothing to
compact), and rows with less room pad with draft steps and verify columns at the trash slot
that are never accepted. The depth is fixed (K): one graph, captured on the first cycle (a
graph per depth would capture again as requests near their end, in the middle of decoding).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fastdecode.engine.graphed import CapturedGraphs, capture_graph, trash_slot
from fastdecode.engine.host_copy import to_device
from fastdecode.kv.tree_mask import TreeMask

LAST, LENGTH, ROOM, REMAINING, LIVE = range(5)  # rows of the cycle's input state [5, B]


@dataclass
class CycleInputs:
    """One cycle's inputs per row. lengths: the slot of the root (0 for a finished row
    riding at slot 0); rooms: chain nodes the row may draft; remaining: tokens the row may
    still emit; live: the row still decodes (the host's view)."""

    last: list[int]
    lengths: list[int]
    rooms: list[int]
    remaining: list[int]
    live: list[bool]

    def rows(self) -> list[list[int]]:
        return [self.last, self.lengths, self.rooms, self.remaining, [int(x) for x in self.live]]


class _Launched:
    """A cycle queued on the device: its packed output, copied to pinned host memory behind
    an event where the device is a GPU."""

    def __init__(self, packed: torch.Tensor, host: torch.Tensor | None) -> None:
        self.event = None
        if host is None:
            self.packed = packed
            return
        host.copy_(packed, non_blocking=True)
        self.packed = host
        self.event = torch.cuda.Event()
        self.event.record()

    def read(self) -> list[list[int]]:
        if self.event is not None:
            self.event.synchronize()
        return self.packed.tolist()


class FusedChainCycle(CapturedGraphs):
    """Greedy chain self-speculation over one cache. `draft_mode()`: a context manager that
    switches the cache to the draft's reads (TriForce: sparse) around the draft steps.
    ride_at_zero: finished rows run at slot 0 (the cache allows it, `ride_lengths`).
    run_ahead: whether the loop may launch the next cycle before reading this one (off: the
    measured baseline, one host read between cycles)."""

    def __init__(
        self,
        model,
        cache,
        depth: int,
        *,
        enabled: bool,
        draft_mode=contextlib.nullcontext,
        ride_at_zero: bool = False,
    ) -> None:
        super().__init__(model, cache, enabled and getattr(cache, "graph_safe", False))
        self.depth = depth
        self.draft_mode = draft_mode
        self.ride_at_zero = ride_at_zero
        self.run_ahead = True
        self.trash = trash_slot(cache)
        self._host: list[torch.Tensor] = []  # two pinned output buffers, used in turn
        self._turn = 0
        self._ahead: tuple[list[list[int]], _Launched] | None = None  # (its inputs, cycle)
        self.ahead_taken = 0  # cycles launched ahead that became the next step
        self.ahead_dropped = 0  # ... that the host's inputs overruled (wasted GPU time)

    @property
    def ahead(self) -> bool:
        """A cycle was launched ahead and not yet read: the next call should take it."""
        return self._ahead is not None

    def drain(self) -> None:
        """Drop a cycle launched ahead (waiting for it: its time belongs to this batch)."""
        if self._ahead is not None:
            self._ahead[1].read()
            self._ahead = None
            self.ahead_dropped += 1

    def __call__(
        self, inputs: CycleInputs, *, run_ahead: bool = False
    ) -> tuple[list[list[int]], list[int], list[int]]:
        """Returns per row the chain (rooms[b] tokens), the number accepted and the target's
        token after them. run_ahead: launch the next cycle before reading this one."""
        depth = self.depth
        host_view = inputs.rows()
        live = to_device(host_view[LIVE], self.model.device, torch.long)
        launched = self._take_ahead(host_view)
        if launched is None:
            launched = self._launch(to_device(host_view, self.model.device, torch.long), live)
        # run ahead: the next cycle from this one's device-side successor state
        ahead = self._launch(None, live) if run_ahead else None
        rows = launched.read()  # the one host read of the cycle
        if ahead is not None:  # with the inputs it ran with, for the next call to check
            self._ahead = ([[row[depth + 2 + i] for row in rows] for i in range(5)], ahead)
        chains = [row[:room] for row, room in zip(rows, inputs.rooms, strict=True)]
        return chains, [row[depth] for row in rows], [row[depth + 1] for row in rows]

    def _take_ahead(self, host_view: list[list[int]]) -> _Launched | None:
        """The cycle launched ahead if it ran with the host's inputs on every live row."""
        if self._ahead is None:
            return None
        predicted, launched = self._ahead
        self._ahead = None
        live = [b for b, alive in enumerate(host_view[LIVE]) if alive]
        if all(predicted[i][b] == host_view[i][b] for i in range(5) for b in live):
            self.ahead_taken += 1
            return launched
        self.ahead_dropped += 1
        launched.read()  # its writes sit past each row's prefix: the new cycle overwrites
        return None

    def _launch(self, state: torch.Tensor | None, live: torch.Tensor) -> _Launched:
        """Queue one cycle: from `state` [5, B] (None: the state the last cycle left on the
        device, which is where the graph keeps it) with the host's `live` mask."""
        batch = len(live)
        if self.enabled:
            captured = self._graph(
                (batch, self.depth),
                lambda pool: self._capture(pool, state, live),
                "a cycle",
            )
            if captured is not None:
                graph, static_state, static_live, packed = captured
                if state is not None:
                    static_state.copy_(state)
                static_live.copy_(live)
                graph.replay()
                return _Launched(packed, self._host_buffer(packed))
        if state is None:
            state = self._state
        self._state = state.clone()
        packed = self._cycle(self._state, live)
        return _Launched(packed, None)

    def _host_buffer(self, packed: torch.Tensor) -> torch.Tensor:
        if not self._host:
            self._host = [torch.empty(packed.shape, dtype=packed.dtype).pin_memory()
                          for _ in range(2)]  # fmt: skip
        self._turn ^= 1
        return self._host[self._turn]

    def _capture(self, pool, state: torch.Tensor, live: torch.Tensor):
        static_state, static_live = state.clone(), live.clone()
        graph, packed = capture_graph(lambda: self._cycle(static_state, static_live), pool)
        return graph, static_state, static_live, packed

    def _cycle(self, state: torch.Tensor, host_live: torch.Tensor) -> torch.Tensor:
        """state [5, B] (root tokens, prefix lengths, rooms, remaining tokens, live) ->
        [B, depth + 2 + 5]: the chain, the accepted count, the target's next token, and the
        next cycle's state, also left in `state` (updated in place)."""
        depth = self.depth
        live = state[LIVE] * host_live  # the host may have stopped a row the device cannot
        last, remaining = state[LAST], state[REMAINING]
        lengths = torch.where(live > 0, state[LENGTH], self._ride(state[LENGTH]))
        rooms = state[ROOM] * live
        steps = torch.arange(depth + 1, device=last.device)
        inside = steps[None, :] <= rooms[:, None]  # [B, depth + 1]: root + the row's nodes
        slots = torch.where(inside, lengths[:, None] + steps, self.trash)
        chain, token = [], last
        with self.draft_mode():
            for k in range(depth):  # node k + 1 is drafted from the step at slot length + k
                token = self.model.decode_step(token, slots[:, k], self.cache).argmax(-1)
                chain.append(token)
        chain = torch.stack(chain, 1)  # [B, depth]
        tokens = torch.cat([last[:, None], chain], 1)
        local = torch.ones(depth + 1, depth + 1, dtype=torch.bool, device=last.device).tril()
        mask = TreeMask(lengths, local.expand(len(last), -1, -1))
        logits = self.model.forward(tokens, slots, self.cache, slots=slots, mask=mask, decode=True)
        target = logits.argmax(-1)  # [B, depth + 1]
        match = (chain == target[:, :depth]) & inside[:, 1:]
        accepted = match.long().cumprod(1).sum(1)
        bonus = target.gather(1, accepted[:, None])
        out = torch.cat([chain, accepted[:, None], bonus], 1)
        state.copy_(self._successor(lengths, remaining, live, accepted, bonus[:, 0]))
        return torch.cat([out, state.t()], 1)

    def _successor(self, lengths, remaining, live, accepted, bonus) -> torch.Tensor:
        """The next cycle's state as the host would build it: the prefix grows by the
        accepted chain and the root, the room is K within the row's token budget and the
        cache, a row whose budget ran out stops (and rides)."""
        produced = (accepted + 1) * live
        remaining = remaining - produced
        live = live * (remaining > 0)
        grown = torch.clamp(lengths + produced, max=self.trash)
        lengths = torch.where(live > 0, grown, self._ride(grown))
        room = torch.minimum(remaining - 1, self.trash - lengths - 1).clamp(0, self.depth)
        return torch.stack([bonus, lengths, room * live, remaining, live])

    def _ride(self, lengths: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(lengths) if self.ride_at_zero else lengths
