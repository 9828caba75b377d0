"""Find DuoAttention's retrieval heads for one model, once, on synthetic passkey data.

DuoAttention (Xiao et al., ICLR 2025) learns a gate per head by distillation: how much the
model's output suffers when that head sees only sinks + a recent window. This is the
training-free version of the same question, asked per head in one forward pass per sample:
at the queries that must produce the passkey (the answer tokens, teacher-forced), compare
each head's attention output with full attention against its output restricted to
`sinks` + `window` recent positions. The relative deviation ||o_full - o_stream||^2 /
||o_full||^2, summed over a KV head's query group and averaged over samples, is its score;
the top `retrieval_fraction` of all (layer, KV head) pairs become retrieval heads (one
global ranking, as the paper's single threshold over gates). The forward itself is the
exact model: a probe cache computes full causal attention and only measures.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import torch

from fastdecode.kv.attention import prompt_attention
from fastdecode.kv.duo_heads import HeadCalibration, model_identity
from fastdecode.kv.step import StepContext
from fastdecode.model.transformer import Transformer

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
METHOD = "output-deviation"


def passkey_sample(
    encode: Callable[[str], list[int]], length: int, rng: random.Random
) -> tuple[list[int], int, int]:
    """A `length`-token passkey prompt (filler, the key at a random depth, the question)
    followed by its answer; returns (tokens, answer start, answer end)."""
    key = str(rng.randrange(10_000, 100_000))
    needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
    question = encode(" What is the pass key? The pass key is")
    answer = encode(f" {key}")
    filler_needed = length - len(needle) - len(question) - len(answer)
    if filler_needed < 1:
        raise ValueError(f"--length {length} is too short for a passkey prompt")
    unit = encode(FILLER) or [0]
    filler = (unit * (filler_needed // len(unit) + 1))[:filler_needed]
    depth = int(rng.uniform(0.1, 0.9) * filler_needed)
    tokens = filler[:depth] + needle + filler[depth:] + question + answer
    return tokens, len(tokens) - len(answer), len(tokens)


class DeviationProbe:
    """A stand-in KV cache for one prefill: attends fully (the exact model) and adds, per
    (layer, KV head), how much the answer queries' outputs change under sinks + window."""

    def __init__(self, num_layers: int, num_kv_heads: int, queries: torch.Tensor, sinks, window):
        self.scores = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        self.queries, self.sinks, self.window = queries, sinks, window

    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        batch, num_heads, length, head_dim = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        qa = q[:, :, self.queries].reshape(batch, num_kv_heads, -1, head_dim).float()
        logits = qa @ k.float().transpose(-1, -2) * head_dim**-0.5  # [B, Hkv, G*A, T]
        query_pos = self.queries.repeat(group)[:, None]
        key_pos = torch.arange(length, device=q.device)[None, :]
        causal = key_pos <= query_pos
        stream = causal & ((key_pos < self.sinks) | (key_pos > query_pos - self.window))
        full = logits.masked_fill(~causal, float("-inf")).softmax(-1) @ v.float()
        part = logits.masked_fill(~stream, float("-inf")).softmax(-1) @ v.float()
        deviation = (full - part).pow(2).sum((-1, -2)) / full.pow(2).sum((-1, -2)).clamp_min(1e-12)
        self.scores[layer] += deviation.sum(0).double().cpu()
        return prompt_attention(q, k, v)


@torch.inference_mode()
def head_scores(
    model: Transformer,
    encode: Callable[[str], list[int]],
    *,
    length: int,
    samples: int,
    sinks: int,
    window: int,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Mean deviation score per (layer, KV head) [L, Hkv] over `samples` passkey prompts."""
    from tqdm import tqdm

    cfg = model.config
    rng = random.Random(seed)
    total = torch.zeros(cfg.num_layers, cfg.num_kv_heads, dtype=torch.float64)
    for _ in tqdm(range(samples), desc="calibrating heads", unit="sample", disable=not progress):
        tokens, start, end = passkey_sample(encode, length, rng)
        queries = torch.arange(start - 1, end - 1, device=model.device)  # predict the answer
        probe = DeviationProbe(cfg.num_layers, cfg.num_kv_heads, queries, sinks, window)
        ids = torch.tensor([tokens], device=model.device)
        positions = torch.arange(len(tokens), device=model.device)[None]
        last = torch.tensor([len(tokens) - 1], device=model.device)
        model.forward(ids, positions, probe, logit_index=last, prefill=True)
        total += probe.scores
    return total / samples


def choose_retrieval(scores: torch.Tensor, fraction: float) -> list[list[bool]]:
    """The top `fraction` of all (layer, KV head) scores are retrieval heads."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"--retrieval-fraction must be in [0, 1], got {fraction}")
    count = math.ceil(fraction * scores.numel())
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    chosen[scores.flatten().topk(count).indices] = True
    return chosen.view_as(scores).tolist()


def calibrate(
    model: Transformer,
    encode: Callable[[str], list[int]],
    *,
    model_name: str,
    length: int = 1024,
    samples: int = 8,
    retrieval_fraction: float = 0.5,
    sinks: int = 4,
    window: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> HeadCalibration:
    length = min(length, model.config.max_position)
    settings = dict(length=length, samples=samples, sinks=sinks, window=window, seed=seed)
    scores = head_scores(model, encode, progress=progress, **settings)
    return HeadCalibration(
        retrieval=choose_retrieval(scores, retrieval_fraction),
        scores=scores.tolist(),
        model=model_identity(model),
        meta=dict(
            model_name=model_name,
            method=METHOD,
            retrieval_fraction=retrieval_fraction,
            **settings,
        ),
    )
