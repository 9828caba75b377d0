"""The HF transformers model the benchmarks compare against, built from the same GGUF
checkpoint our engine loads (so both run the same weights on the same card)."""

from __future__ import annotations

import torch


def hf_model_from_checkpoint(name: str, dtype: torch.dtype = torch.bfloat16, device="cuda"):
    """A registry name or .gguf path -> an eval-mode `AutoModelForCausalLM` on `device`."""
    from transformers import AutoModelForCausalLM

    from fastdecode.model.config import ModelConfig
    from fastdecode.model.gguf_loader import load_gguf_config, load_gguf_tensors
    from fastdecode.model.load import resolve

    path = resolve(name, progress=False)
    hf_config = load_gguf_config(path)
    cfg = ModelConfig.from_hf(hf_config)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.load_state_dict(load_gguf_tensors(path, cfg, dtype), strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()
