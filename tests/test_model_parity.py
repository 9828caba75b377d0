"""Our decoder's logits against Hugging Face transformers (the oracle), in float32 on CPU.

Tolerance, everywhere in this file: max |ours - ref| <= 1e-4 * max(1, max |ref|) over all
compared logits (`assert_logits_close`). Float32 reorderings of the same math stay ~1e-6
relative; a wrong RoPE, norm, bias, GQA mapping or cache slot is off by O(1) (checked
below: swapping the RoPE variant moves the logits by far more than the tolerance).

(a) the real SmolLM2-135M GGUF vs transformers reading the same GGUF (full sequence);
(b) each tiny random architecture (Llama incl. llama3/linear RoPE scaling, Mistral, Qwen2,
    Qwen3) saved as an HF directory vs the HF model itself;
(c) prefill, then single-token decode steps through our KV cache, vs HF's full-sequence
    logits at those positions (alone and as a right-padded batch of unequal lengths).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_ARCHS, TINY_VOCAB, save_tiny_model

from fastdecode.model.load import load_model

REL_TOL = 1e-4

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


def tolerance(ref: torch.Tensor) -> float:
    return REL_TOL * max(1.0, ref.abs().max().item())


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == torch.float32
    diff = (ours - ref).abs().max().item()
    tol = tolerance(ref)
    assert diff <= tol, f"{what}: max |ours - HF| = {diff:.3g} > tolerance {tol:.3g}"


def full_positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).expand(batch, length)


@torch.inference_mode()
def our_full_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    batch, length = tokens.shape
    cache = model.new_cache(batch, length + 8)
    return model.forward(tokens, full_positions(batch, length), cache)


@torch.inference_mode()
def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    return hf_model(tokens).logits.float()


@torch.inference_mode()
def prefill_then_decode(model, rows: list[list[int]], prefill_lengths: list[int]) -> list:
    """Prefill each row's first prefill_lengths[b] tokens (right-padded together, as the
    engine does), then feed the rest one token per step. Returns, per row, the logits
    [len(row), V] at every position (prefill positions included)."""
    batch = len(rows)
    width = max(prefill_lengths)
    cache = model.new_cache(batch, max(len(r) for r in rows) + 8)
    tokens = torch.zeros(batch, width, dtype=torch.long)
    for b, (row, n) in enumerate(zip(rows, prefill_lengths, strict=True)):
        tokens[b, :n] = torch.tensor(row[:n])
    prefill = model.forward(tokens, full_positions(batch, width), cache)
    out = [[prefill[b, i] for i in range(n)] for b, n in enumerate(prefill_lengths)]
    # every row keeps decoding its own next token at its own position
    pos = list(prefill_lengths)
    steps = max(len(r) - n for r, n in zip(rows, prefill_lengths, strict=True))
    for _ in range(steps):
        # rows that ran out of tokens rewrite their last one (same K/V; result ignored)
        at = [min(p, len(r) - 1) for r, p in zip(rows, pos, strict=True)]
        step_tokens = torch.tensor([[r[i]] for r, i in zip(rows, at, strict=True)])
        step_pos = torch.tensor([[i] for i in at])
        logits = model.forward(step_tokens, step_pos, cache)[:, 0]
        for b, row in enumerate(rows):
            if pos[b] < len(row):
                out[b].append(logits[b])
                pos[b] += 1
    return [torch.stack(o) for o in out]


# -- (a) the real SmolLM2 from GGUF ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("prompt", SMOLLM2_PROMPTS, ids=["france", "code", "story", "chat"])
def test_smollm2_full_sequence_logits_match_hf(smollm2_llm, smollm2_hf, prompt):
    ids = smollm2_llm.tokenizer.encode(prompt)
    tokens = torch.tensor([ids])
    assert_logits_close(
        our_full_logits(smollm2_llm.model, tokens), hf_logits(smollm2_hf, tokens), prompt
    )


@pytest.mark.slow
def test_smollm2_padded_batch_logits_match_hf(smollm2_llm, smollm2_hf):
    """A right-padded batch: each row's real positions equal the row run alone in HF."""
    rows = [smollm2_llm.tokenizer.encode(p) for p in SMOLLM2_PROMPTS[:3]]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row)
    ours = our_full_logits(smollm2_llm.model, tokens)
    for b, row in enumerate(rows):
        ref = hf_logits(smollm2_hf, torch.tensor([row]))[0]
        assert_logits_close(ours[b, : len(row)], ref, f"row {b}")


@pytest.mark.slow
def test_smollm2_prefill_then_decode_matches_hf(smollm2_llm, smollm2_hf):
    """(c) on the real model: 8 decode steps after the prompt, through the KV cache."""
    tok = smollm2_llm.tokenizer
    rows = [
        tok.encode(SMOLLM2_PROMPTS[0] + " Paris, and the capital of Italy is Rome."),
        tok.encode(SMOLLM2_PROMPTS[1] + " fibonacci(n - 1) + fibonacci(n - 2)"),
    ]
    prefill_lengths = [len(r) - 8 for r in rows]
    ours = prefill_then_decode(smollm2_llm.model, rows, prefill_lengths)
    for b, row in enumerate(rows):
        ref = hf_logits(smollm2_hf, torch.tensor([row]))[0]
        assert_logits_close(ours[b], ref, f"row {b}")


@pytest.mark.slow
def test_smollm2_logit_index_picks_last_prompt_token(smollm2_llm, smollm2_hf):
    """The prefill path (logit_index) returns exactly each row's last-token logits."""
    rows = [smollm2_llm.tokenizer.encode(p) for p in SMOLLM2_PROMPTS[:2]]
    width = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.tensor(row)
    model = smollm2_llm.model
    with torch.inference_mode():
        last = model.forward(
            tokens,
            full_positions(len(rows), width),
            model.new_cache(len(rows), width),
            logit_index=torch.tensor([len(r) - 1 for r in rows]),
        )
    assert last.shape == (len(rows), model.config.vocab_size)
    for b, row in enumerate(rows):
        ref = hf_logits(smollm2_hf, torch.tensor([row]))[0, -1]
        assert_logits_close(last[b], ref, f"row {b}")


# -- (b) tiny random architectures from HF directories --------------------------------------


def random_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (batch, length), generator=g)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_full_sequence_logits_match_hf(tiny_model, arch):
    directory, hf_model = tiny_model(arch)
    loaded = load_model(directory)
    assert loaded.model.config.model_type == hf_model.config.model_type
    tokens = random_tokens(3, 48, seed=1)
    assert_logits_close(our_full_logits(loaded.model, tokens), hf_logits(hf_model, tokens), arch)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_prefill_then_decode_matches_hf(tiny_model, arch):
    """(c): unequal prompts, right-padded prefill, then 12+ decode steps per row."""
    directory, hf_model = tiny_model(arch)
    model = load_model(directory).model
    rows = [random_tokens(1, n, seed=n)[0].tolist() for n in (30, 21, 40)]
    prefill_lengths = [5, 9, 1]
    ours = prefill_then_decode(model, rows, prefill_lengths)
    for b, row in enumerate(rows):
        ref = hf_logits(hf_model, torch.tensor([row]))[0]
        assert_logits_close(ours[b], ref, f"{arch} row {b}")


def test_tolerance_detects_a_wrong_rope(tiny_model):
    """The llama3-scaled and plain Llama share weights (same seed): only RoPE differs, and
    that difference is far above the tolerance, so the parity tests would catch it."""
    plain_dir, plain_hf = tiny_model("llama")
    _, scaled_hf = tiny_model("llama-rope-llama3")
    tokens = random_tokens(2, 48, seed=2)
    plain_ref, scaled_ref = hf_logits(plain_hf, tokens), hf_logits(scaled_hf, tokens)
    assert (plain_ref - scaled_ref).abs().max().item() > 100 * tolerance(scaled_ref)
    ours_plain = our_full_logits(load_model(plain_dir).model, tokens)
    assert (ours_plain - scaled_ref).abs().max().item() > 100 * tolerance(scaled_ref)


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("mistral", {"sliding_window": 128}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 128, "max_window_layers": 0}),
    ],
)
def test_sliding_window_caps_the_context(tmp_path, arch, overrides):
    """Sliding-window attention is not implemented: the context is capped at the window,
    where it equals full attention, instead of silently diverging from HF past it."""
    from fastdecode import LLM, SamplingParams

    hf_model = save_tiny_model(arch, tmp_path, **overrides)
    llm = LLM(tmp_path, device="cpu", dtype="float32", progress=False)
    assert llm.model.config.max_position == 128
    tokens = random_tokens(2, 128, seed=3)  # the whole window
    assert_logits_close(our_full_logits(llm.model, tokens), hf_logits(hf_model, tokens), arch)
    with pytest.raises(ValueError, match="context of 128"):
        llm.generate([5, 6, 7], SamplingParams(max_tokens=200))


def test_full_attention_configs_keep_their_context(tiny_model):
    for arch in ("mistral", "qwen2", "qwen3", "llama"):
        directory, hf_model = tiny_model(arch)
        config = load_model(directory).model.config
        assert config.max_position == hf_model.config.max_position_embeddings == 256
