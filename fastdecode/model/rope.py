"""Rotary position embeddings, with whatever scaling the config asks for.

The inverse frequencies come from transformers' own RoPE functions (linear, dynamic, yarn,
llama3, longrope), so every scaling variant matches the oracle by construction.
"""

from __future__ import annotations

import torch


def _rope_params(hf_config) -> dict:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    params = dict(params or {})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Return (inv_freq [head_dim/2], attention scaling) for the config's RoPE type."""
    params = _rope_params(hf_config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        base = float(params["rope_theta"])
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
        return (1.0 / base**exponents).float(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported RoPE type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def rope_table(hf_config, head_dim: int, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute cos and sin [max_position, head_dim] in float32 (gathered per step)."""
    inv_freq, scaling = inverse_frequencies(hf_config, head_dim)
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [B, 1, T, D] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
