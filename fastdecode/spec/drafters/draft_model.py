"""`draft_model`: a separate small model with the target's tokenizer drafts, keeping its own
KV cache in step with the accepted text (Leviathan et al. 2023; Chen et al. 2023).

Its cache holds every token the target accepted, written lazily: the tokens emitted by a
verify step are written by the next catch-up pass, which also yields the first draft
distribution, so each step costs (draft depth) draft passes and no extra resync pass.
Rejected drafts only ever live in scratch slots the next catch-up overwrites. While a row
drafts nothing (K = 0: the goodput rule at large batch) the draft model does not run for it
at all -- not even the prompt's prefill: its tokens wait in `pending`, and when the row
drafts again a long backlog is written first in bulk (`_catch_up`: the prompt's prefill, or
causal chunks like a chunked prefill, projecting no logits), leaving only the root to the
drafting pass.

Big Little Decoder's *fallback* policy (Kim et al. 2023: hand control to the large model as
soon as the small one is unsure) is the chain's confidence threshold (`TreeShape.threshold`);
its *rollback* policy is the exact verification every drafter gets (the lossy tolerance of
the paper is not offered: outputs stay identical to the target's).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from fastdecode.engine.graphed import GraphedForward, trash_slot
from fastdecode.engine.host_copy import to_device
from fastdecode.engine.runner import ModelRunner
from fastdecode.spec.drafters.tree_drafting import TreeShape, draft_generators, draft_trees
from fastdecode.spec.tree import DraftTree

CATCH_UP_SHORT = 16  # a row's pending tokens the drafting pass writes itself (one pass)
CATCH_UP_CHUNK = 128  # columns per bulk catch-up forward: bounds its mask and activations


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
        self.catch_up_s = 0.0  # of the last propose: writing a backlog, not drafting
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
        self.length = [0] * batch  # tokens in the draft cache
        # accepted, not yet in the draft cache: the prompt too, prefilled when first needed
        self.pending = [list(p) + [token] for p, token in zip(prompts, first, strict=True)]

    def _forward_padded(self, tokens, positions, slots, mask) -> torch.Tensor:
        """Draft logits over the target's vocabulary (a smaller embedding pads with -inf)."""
        return self._to_target_vocab(self._forward(tokens, positions, slots, mask))

    def _decode_padded(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One graphed decode step of the draft model (slot = position): a chain level."""
        return self._to_target_vocab(self.runner.decode(tokens, positions))

    def _to_target_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        extra = self.target_vocab - logits.shape[-1]
        if extra > 0:
            return F.pad(logits, (0, extra), value=float("-inf"))
        return logits[..., : self.target_vocab]

    def propose(self, contexts, rooms, lengths) -> list[DraftTree]:
        """Rows with room 0 neither draft nor catch up: their tokens stay pending."""
        drafting = [b for b, room in enumerate(rooms) if room > 0]
        t0 = time.perf_counter()
        self._catch_up([b for b in drafting if len(self.pending[b]) > CATCH_UP_SHORT])
        self.catch_up_s = time.perf_counter() - t0
        growers = [
            self.shape.grower(room, p.greedy, gen) if room > 0 else None
            for room, p, gen in zip(rooms, self.params, self.generators, strict=True)
        ]
        pending = [self.pending[b] if rooms[b] > 0 else [] for b in range(len(rooms))]
        trees = draft_trees(
            self._forward_padded, self._forward.cache, pending, self.length, growers,
            self.params, decode=self._decode_padded,
        )  # fmt: skip
        for b in drafting:
            self.length[b] += len(self.pending[b])
            self.pending[b] = []
        return trees

    @torch.inference_mode()
    def _catch_up(self, rows: list[int]) -> None:
        """Write all but the last pending token of `rows` into the draft cache, in bulk: a
        backlog of plain (K = 0) steps or the prompt. Only K/V are wanted (one logit row).
        An empty cache takes the prompt prefill's path (causal attention over the new
        tokens only); otherwise chunks of CATCH_UP_CHUNK columns attend causally to the
        cache, other rows' columns writing the trash slot."""
        if not rows:
            return
        try:
            self._write_backlog(rows)
        finally:
            if self.runner.device.type == "cuda":  # its time is the backlog's, not drafting's
                torch.cuda.synchronize(self.runner.device)

    def _write_backlog(self, rows: list[int]) -> None:
        model, cache = self.runner.model, self._forward.cache
        batch, device = len(self.pending), self.runner.device
        if not any(self.length):
            texts = [self.pending[b][:-1] if b in rows else [0] for b in range(batch)]
            self.runner.prefill(texts)  # other rows (a dummy token) stay empty: length 0
            for b in rows:
                self.length[b] = len(texts[b])
                self.pending[b] = self.pending[b][-1:]
            return
        trash = trash_slot(cache)
        while any(len(self.pending[b]) > 1 for b in rows):
            width = min(CATCH_UP_CHUNK, max(len(self.pending[b]) - 1 for b in rows))
            tokens = [[0] * width for _ in range(batch)]
            positions = [[0] * width for _ in range(batch)]
            slots = [[trash] * width for _ in range(batch)]
            for b in rows:
                part = self.pending[b][: min(width, len(self.pending[b]) - 1)]
                start = self.length[b]
                tokens[b][: len(part)] = part
                positions[b][: len(part)] = slots[b][: len(part)] = range(start, start + len(part))
                self.length[b] += len(part)
                self.pending[b] = self.pending[b][len(part) :]
            ids = to_device([tokens, positions, slots], device, torch.long)
            model.forward(
                ids[0], ids[1], cache, slots=ids[2],
                logit_index=torch.zeros(batch, dtype=torch.long, device=device),
            )  # fmt: skip

    def accept(self, contexts, verdicts) -> None:
        for b, verdict in enumerate(verdicts):
            if verdict is not None:
                self.pending[b] += verdict.tokens
