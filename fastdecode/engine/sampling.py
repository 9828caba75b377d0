"""Token selection: greedy, temperature, top-k, top-p, with per-request seeded generators.

Sampling uses the exponential race (argmax of p / E, E ~ Exp(1)), which draws exactly from p
and lets each row use its own generator: a seeded request samples the same tokens whether it
runs alone or inside any batch.
"""

from __future__ import annotations

import torch

from fastdecode.params import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax of logits [..., V] / temperature, restricted to the top-k and top-p set."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (always keep the first)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample_row(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token from probs [V] with the row's own generator."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def select_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """logits [B, V] -> next tokens [B] (stays on the device: no host sync)."""
    tokens = logits.argmax(-1)
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            tokens[row] = sample_row(filtered_probs(logits[row], p), gen)
    return tokens
