"""One verification path for every drafter: walk the draft tree from the root, accepting
nodes with the target's logits, and end with one token drawn from the target.

Greedy: accept the child whose token equals the target's argmax at its parent; the output
is exactly plain greedy decoding, plus one bonus token (the argmax at the last accepted
node).

Sampling: lossless speculative sampling (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling"): accept x ~ q with probability min(1, p(x) / q(x)), and
on rejection draw from normalize(max(p - q, 0)). For several children of one node this is
applied recursively over the siblings (multi-draft recursive rejection sampling of SpecInfer
and Sequoia): after sibling k is rejected, the target for sibling k + 1 is the residual
normalize(max(p_k - q_k, 0)), where q_k is the distribution sibling k was drawn from given
the earlier ones. Proposals without q (n-gram, suffix: deterministic) are q = one-hot, so
they are accepted with probability p(x) and a rejection removes x from p. Every emitted
token is then distributed exactly as the target's (temperature / top-k / top-p applied
through `filtered_probs`).

Randomness comes from the request's own generator (`fastdecode.engine.sampling`), so a
seeded request is reproducible alone or in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdecode.engine.host_copy import to_device
from fastdecode.engine.sampling import filtered_probs, sample_row
from fastdecode.params import SamplingParams
from fastdecode.spec.tree import DraftTree


@dataclass
class Verdict:
    """The accepted path (node indices, root to leaf) and the tokens to emit: the accepted
    nodes' tokens followed by one token from the target (bonus or correction). probs
    [len(tokens), V], only where `verify_batch(want_probs=...)` asked for it: the target's
    distribution (`target_probs`) that each emitted token was drawn from."""

    accepted: list[int]
    tokens: list[int]
    probs: torch.Tensor | None = None


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target's next-token distributions [..., V] as handed to drafters that observe them
    (STAND): filtered as the verifier samples, or plain softmax for greedy requests."""
    return logits.float().softmax(-1) if params.greedy else filtered_probs(logits, params)


def verify_greedy(tree: DraftTree, argmax: Sequence[int]) -> Verdict:
    """argmax[0]: target's argmax after the root; argmax[i + 1]: after node i."""
    accepted: list[int] = []
    node = -1
    while True:
        target = int(argmax[node + 1])
        for child in tree.children(node):
            if tree.tokens[child] == target:
                accepted.append(child)
                node = child
                break
        else:
            return Verdict(accepted, [tree.tokens[i] for i in accepted] + [target])


def _uniform(generator: torch.Generator) -> float:
    return torch.rand(1, generator=generator, device=generator.device).item()


def verify_sampling(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> Verdict:
    """probs [1 + N, V]: the target's (filtered) distribution after the root and each node."""
    accepted: list[int] = []
    node = -1
    while True:
        p = probs[node + 1].double()
        for child in tree.children(node):
            token = tree.tokens[child]
            q = tree.q_of(child)
            q_token = 1.0 if q is None else q[token].item()
            p_token = p[token].item()
            if _uniform(generator) * q_token < p_token:  # accept with min(1, p / q)
                accepted.append(child)
                node = child
                break
            if q is None:
                residual = p.clone()
                residual[token] = 0.0
            else:
                residual = (p - q.to(p.device, torch.float64)).clamp_(min=0.0)
            total = residual.sum()
            # total == 0 means p == q: rejection had probability 0 (a rounding artefact).
            if total > 0:
                p = residual / total
        else:
            final = int(sample_row(p, generator))
            return Verdict(accepted, [tree.tokens[i] for i in accepted] + [final])


def verify_batch(
    trees: Sequence[DraftTree],
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    want_probs: Sequence[bool] | None = None,
) -> list[Verdict]:
    """logits [B, T, V] of one verify step (column 0: root, column i + 1: node i; columns
    past a row's tree are padding) -> one Verdict per row. Rows with want_probs[b] also get
    the target's distributions at their emitted positions (Verdict.probs)."""
    # every row's argmax in one transfer (indexing the greedy rows first would copy a list
    # of row numbers to the device: a stream sync before the read that follows anyway)
    by_row = logits.argmax(-1).tolist() if any(p.greedy for p in params) else []
    verdicts, greedy_observed = [], []
    for b, (tree, p, gen) in enumerate(zip(trees, params, generators, strict=True)):
        if p.greedy:
            verdict = verify_greedy(tree, by_row[b])
        else:
            probs = filtered_probs(logits[b, : 1 + len(tree)], p)
            verdict = verify_sampling(tree, probs, gen)
        if want_probs is not None and want_probs[b]:
            columns = [0] + [node + 1 for node in verdict.accepted]  # emitted positions
            if p.greedy:
                greedy_observed.append((b, columns))
            else:
                verdict.probs = probs[columns]
        verdicts.append(verdict)
    if greedy_observed:  # every greedy row's emitted positions in one gather and softmax
        rows = [b for b, columns in greedy_observed for _ in columns]
        columns = [c for _, cols in greedy_observed for c in cols]
        index = to_device([rows, columns], logits.device, torch.long)
        # greedy rows' distributions are a plain softmax whatever else their params say
        probs = target_probs(logits[index[0], index[1]], params[rows[0]])
        sizes = [len(cols) for _, cols in greedy_observed]
        for (b, _), part in zip(greedy_observed, probs.split(sizes), strict=True):
            verdicts[b].probs = part
    return verdicts
