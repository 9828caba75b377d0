"""A whole greedy self-speculation cycle -- draft a chain, verify it, accept -- as one CUDA
graph (TriForce, Sun et al. 2024; MagicDec, Chen et al. 2024).

The generic loop goes back to the host between the draft and the verify step: it reads the
drafts, builds the verify inputs, then reads the target's argmax. At long context and batch
32 each of those round trips left the GPU idle while Python ran, and the cycle cost the sum
of the two (measured: 13 ms of GPU work in a 19 ms cycle). For greedy chains nothing needs
the host: the draft feeds its own argmax forward, the verify inputs are the chain laid after
the root, and greedy acceptance is "the longest prefix where the chain equals the target's
argmax". So the cycle runs on the device and the host reads once, at the end: per row the
chain, the accepted length and the target's token after it.

Same tokens as the generic path (`draft_trees` + `verify_greedy`): a chain node is a decode
step of the draft at slot = position, the verify step writes the root and the chain at the
slots right after the row's prefix (accepted nodes are already in place: nothing to
compact), and rows with less room pad with draft steps and verify columns at the trash slot
that are never accepted. The depth is fixed (K): one graph, captured on the first cycle (a
graph per depth would capture again as requests near their end, in the middle of decoding).
"""

from __future__ import annotations

import contextlib

import torch

from fastdecode.engine.graphed import CapturedGraphs, capture_graph, trash_slot
from fastdecode.engine.host_copy import to_device
from fastdecode.kv.tree_mask import TreeMask


class FusedChainCycle(CapturedGraphs):
    """Greedy chain self-speculation over one cache. `draft_mode()`: a context manager that
    switches the cache to the draft's reads (TriForce: sparse) around the draft steps."""

    def __init__(
        self, model, cache, depth: int, *, enabled: bool, draft_mode=contextlib.nullcontext
    ) -> None:
        super().__init__(model, cache, enabled and getattr(cache, "graph_safe", False))
        self.depth = depth
        self.draft_mode = draft_mode
        self.trash = trash_slot(cache)

    def __call__(
        self, last: list[int], lengths: list[int], rooms: list[int]
    ) -> tuple[list[list[int]], list[int], list[int]]:
        """last: each row's root token (at slot lengths[b]); rooms: chain nodes each row may
        draft (0: the row only gets the target's next token). Returns per row the chain
        (rooms[b] tokens), the number accepted and the target's token after them."""
        depth = self.depth
        device = self.model.device
        inputs = to_device([last, lengths, rooms], device, torch.long)
        captured = None
        if self.enabled:
            captured = self._graph(
                (len(last), depth), lambda pool: self._capture(pool, inputs, depth), "a cycle"
            )
        if captured is None:
            out = self._cycle(inputs, depth)
        else:
            graph, static, out = captured
            static.copy_(inputs)
            graph.replay()
        rows = out.tolist()  # the one host read of the cycle
        chains = [row[:room] for row, room in zip(rows, rooms, strict=True)]
        return chains, [row[depth] for row in rows], [row[depth + 1] for row in rows]

    def _capture(self, pool, inputs: torch.Tensor, depth: int):
        static = inputs.clone()
        graph, out = capture_graph(lambda: self._cycle(static, depth), pool)
        return graph, static, out

    def _cycle(self, inputs: torch.Tensor, depth: int) -> torch.Tensor:
        """inputs [3, B] (root tokens, prefix lengths, rooms) -> [B, depth + 2]: the chain,
        the accepted count, the target's next token."""
        last, lengths, rooms = inputs
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
        return torch.cat([chain, accepted[:, None], bonus], 1)
