"""`draft_model`: a separate small model with the target's tokenizer drafts, keeping its own
KV cache in step with the accepted text (Leviathan et al. 2023; Chen et al. 2023).

Its cache holds every token the target accepted: the tokens emitted by a verify step are
written by the next catch-up pass, which also yields the first draft distribution, so each
step costs (draft depth) draft passes and no extra resync pass. Rejected drafts only ever
live in scratch slots the next catch-up overwrites.

Big Little Decoder's *fallback* policy (Kim et al. 2023: hand control to the large model as
soon as the small one is unsure) is the chain's confidence threshold (`TreeShape.threshold`);
its *rollback* policy is the exact verification every drafter gets (the lossy tolerance of
the paper is not offered: outputs stay identical to the target's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdecode.engine.graphed import GraphedForward
from fastdecode.engine.runner import ModelRunner
from fastdecode.spec.drafters.tree_drafting import TreeShape, draft_generators, draft_trees
from fastdecode.spec.tree import DraftTree


def check_same_tokenizer(draft_tokenizer, target_tokenizer, name: str) -> None:
    """Drafts are token ids: the two vocabularies must agree token for token."""
    if draft_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError(
            f"draft model {name!r} has a different tokenizer than the target "
            f"({len(draft_tokenizer.get_vocab())} vs {len(target_tokenizer.get_vocab())} "
            "tokens, or different ids): a draft model must share the target's tokenizer"
        )


class DraftModelDrafter:
    """One per batch; `runner` runs the draft model (its own cache and graphs)."""

    def __init__(
        self, runner: ModelRunner, shape: TreeShape, max_nodes: int, target_vocab: int
    ) -> None:
        self.runner = runner
        self.shape = shape
        self.max_nodes = max_nodes
        self.target_vocab = target_vocab
        self.want_probs: list[bool] = []
        self._forward: GraphedForward | None = None

    def begin(self, prompts, params, generators, first, prefill_logits) -> None:
        batch = len(prompts)
        self.params = params
        self.generators = draft_generators(params, self.runner.device)
        self.want_probs = [False] * batch
        max_new = max(p.max_tokens for p in params)
        needed = max(len(p) for p in prompts) + max_new + self.max_nodes + 2
        cache = self.runner.allocate(batch, needed)
        if self._forward is None or self._forward.cache is not cache:
            self._forward = GraphedForward(
                self.runner.model, cache, enabled=self.runner.cuda_graphs
            )
        self.runner.prefill(prompts)
        self.length = [len(p) for p in prompts]  # tokens in the draft cache
        self.pending = [[token] for token in first]  # accepted, not yet in the draft cache

    def _forward_padded(self, tokens, positions, slots, mask) -> torch.Tensor:
        """Draft logits over the target's vocabulary (a smaller embedding pads with -inf)."""
        logits = self._forward(tokens, positions, slots, mask)
        extra = self.target_vocab - logits.shape[-1]
        if extra > 0:
            return F.pad(logits, (0, extra), value=float("-inf"))
        return logits[..., : self.target_vocab]

    def propose(self, contexts, rooms, lengths) -> list[DraftTree]:
        growers = [
            self.shape.grower(room, p.greedy, gen) if room > 0 else None
            for room, p, gen in zip(rooms, self.params, self.generators, strict=True)
        ]
        trees = draft_trees(
            self._forward_padded, self._forward.cache, self.pending, self.length, growers,
            self.params,
        )  # fmt: skip
        for b, tokens in enumerate(self.pending):
            self.length[b] += len(tokens)
            self.pending[b] = []
        return trees

    def accept(self, contexts, verdicts) -> None:
        for b, verdict in enumerate(verdicts):
            if verdict is not None:
                self.pending[b] += verdict.tokens
