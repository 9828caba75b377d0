"""Self-speculation: the target drafts for itself, cheaper, on its own KV cache.

`layerskip`: the target with a set of layers skipped (training-free layer skipping, the
SkipDecode / Kangaroo / Draft & Verify family). `triforce`: the target with every layer but
a sparse KV read per step -- sinks + a recent window, or a retrieval policy such as Quest --
while verification reads the full cache (TriForce, Sun et al. 2024; MagicDec, Chen et al.
2024). At long context a step is bound by reading the KV cache, so a sparse draft step is
much cheaper than a full one, and its drafts are accepted often; the gain grows with batch.

Both share the target's cache: a draft writes its root and nodes into the slots the next
verify step overwrites in every layer (column 0 and the tree columns), so no second cache
and no resync exist. Skipped layers simply keep stale entries there until then.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastdecode.engine.graphed import GraphedDecode, GraphedForward, trash_slot
from fastdecode.engine.runner import ModelRunner
from fastdecode.kv.policies import KVPolicyConfig
from fastdecode.kv.step import StepContext
from fastdecode.model.layers import decoder_layer
from fastdecode.spec.drafters.tree_drafting import TreeShape, draft_generators, draft_trees
from fastdecode.spec.fused_chain import FusedChainCycle
from fastdecode.spec.tree import DraftTree

SKIP_FRACTION = 0.35


@torch.inference_mode()
def layer_redundancy(model, tokens: Sequence[int]) -> list[float]:
    """Per layer, 1 - cos(input, output) of its residual stream over `tokens`: how little the
    layer changes the hidden state (Gromov et al. 2024, "The Unreasonable Ineffectiveness of
    the Deeper Layers": such layers can go with little loss). Lower = more redundant."""
    device = model.device
    length = len(tokens)
    cache = model.new_cache(1, length)
    ids = torch.tensor([list(tokens)], device=device)
    positions = torch.arange(length, device=device)[None]
    step = StepContext(
        positions, positions, torch.zeros_like(positions), None, prefill=True,
        prompt_lengths=torch.tensor([length], device=device),
    )  # fmt: skip
    cos, sin = model.cos[positions].unsqueeze(1), model.sin[positions].unsqueeze(1)
    x = F.embedding(ids, model.embed)
    scores = []
    for i, weights in enumerate(model.layers):
        y = decoder_layer(model.layer_fns, x, weights, cos, sin, cache, i, step)
        scores.append(1.0 - F.cosine_similarity(x.float(), y.float(), dim=-1).mean().item())
        x = y
    return scores


def choose_skip(model, tokens: Sequence[int], fraction: float = SKIP_FRACTION) -> list[int]:
    """The `fraction` of layers that change the residual stream least on `tokens` (the first
    two and the last two always run: they move it most)."""
    scores = layer_redundancy(model, tokens)
    candidates = sorted(range(2, len(scores) - 2), key=lambda i: scores[i])
    return sorted(candidates[: int(fraction * len(scores))])


@contextlib.contextmanager
def _sparse_reads(cache):
    """The draft's reads (the cache's sparse policy) for the block; the target reads all."""
    cache.sparse_reads = True
    try:
        yield
    finally:
        cache.sparse_reads = False


class SparseChainForward:
    """TriForce's draft forward. Its chains feed one token per row per pass at slot ==
    position, each seeing slots 0..position: exactly a decode step, so it runs the fused
    sparse decode step (CUDA-graphed per batch, captured with the sparse reads on) instead
    of the generic multi-token forward. Padding rows decode at the trash slot (discarded)."""

    def __init__(self, model, cache, *, enabled: bool) -> None:
        self.cache = cache
        self.trash = trash_slot(cache)
        self.decode = GraphedDecode(model, cache, enabled=enabled)

    def __call__(self, tokens, positions, slots, mask) -> torch.Tensor:
        if tokens.shape[1] != 1:
            raise ValueError("sparse self-speculation drafts one token per row per pass")
        positions = torch.where(slots == self.trash, self.trash, positions)[:, 0]
        return self.decode(tokens[:, 0], positions)[:, None]


class SelfDrafter:
    """One per batch. layer_ids: the layers the draft runs (None: all); sparse_policy: the
    ReadPolicy the draft reads through (the target's cache becomes a SelectiveKVCache
    whose sparse reads are switched on only while drafting). run_ahead: the greedy
    device cycle may start the next cycle before the host reads this one (`fused_chain`)."""

    run_ahead = True

    def __init__(
        self,
        runner: ModelRunner,
        shape: TreeShape,
        *,
        layer_ids: Sequence[int] | None = None,
        sparse_policy: KVPolicyConfig | None = None,
    ) -> None:
        if sparse_policy is not None and shape.kind != "chain":
            raise ValueError(
                "triforce drafts chains: its sparse reads serve single-token steps (use no --tree)"
            )
        self.runner = runner
        self.shape = shape
        self.layer_ids = None if layer_ids is None else list(layer_ids)
        self.sparse_policy = sparse_policy
        self.want_probs: list[bool] = []
        self._forward: GraphedForward | SparseChainForward | None = None
        self._fused: FusedChainCycle | None = None

    def allocate(self, runner: ModelRunner, batch: int, needed: int, prompt_len: int):
        cache = runner.allocate(batch, needed, prompt_len, kv_policy=self.sparse_policy)
        if self.sparse_policy is not None:
            cache.sparse_reads = False  # the target (prefill, verify, plain steps) reads all
        if self._forward is None or self._forward.cache is not cache:
            if self.sparse_policy is not None:
                self._forward = SparseChainForward(runner.model, cache, enabled=runner.cuda_graphs)
            else:
                self._forward = GraphedForward(
                    runner.model, cache, enabled=runner.cuda_graphs, layer_ids=self.layer_ids
                )
        return cache

    def begin(self, prompts, params, generators, first, prefill_logits) -> None:
        self.params = params
        self.generators = draft_generators(params, self.runner.device)
        self.want_probs = [False] * len(prompts)

    def propose(self, contexts, rooms, lengths) -> list[DraftTree]:
        growers = [
            self.shape.grower(room, p.greedy, gen) if room > 0 else None
            for room, p, gen in zip(rooms, self.params, self.generators, strict=True)
        ]
        pending = [[contexts.last(b)] if room > 0 else [] for b, room in enumerate(rooms)]
        cache = self._forward.cache
        sparse = self.sparse_policy is not None
        with _sparse_reads(cache) if sparse else contextlib.nullcontext():
            # a sparse chain's levels are plain decode steps: greedy ones grow on the device
            decode = self._forward.decode if sparse else None
            return draft_trees(
                self._forward, cache, pending, list(lengths), growers, self.params, decode
            )

    @property
    def device_cycle(self) -> FusedChainCycle | None:
        """The greedy device cycle last handed out (its run-ahead counters), if any."""
        return self._fused

    def fused_cycle(self, params, depth: int) -> FusedChainCycle | None:
        """TriForce's greedy chains as one device-side cycle (draft, verify, accept; see
        `fastdecode.spec.fused_chain`) when every row is greedy and chains never stop early;
        None: the generic loop (sampling, trees, a confidence threshold, layer skipping)."""
        plain_chain = self.shape.kind == "chain" and self.shape.threshold <= 0
        if self.sparse_policy is None or not plain_chain or not all(p.greedy for p in params):
            return None
        cache = self._forward.cache
        if self._fused is None or self._fused.cache is not cache or self._fused.depth != depth:
            self._fused = FusedChainCycle(
                self.runner.model, cache, depth, enabled=self.runner.cuda_graphs,
                draft_mode=functools.partial(_sparse_reads, cache),
                ride_at_zero=getattr(cache, "finished_rows_scratch", False),
            )  # fmt: skip
        self._fused.run_ahead = self.run_ahead
        return self._fused

    def accept(self, contexts, verdicts) -> None:
        """Nothing to sync: the verify step already wrote the accepted tokens' K/V."""
