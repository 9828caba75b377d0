"""Read a GGUF checkpoint: config and tokenizer through transformers, tensors through `gguf`.

Tensors are dequantized to float and renamed to HF names with gguf's own name map, so the
same `Transformer.from_hf_state_dict` builds the model from GGUF and from safetensors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastdecode.model.config import ModelConfig

# llama.cpp's converter interleaves the rotary halves of q/k for these architectures.
_PERMUTED_QK = ("llama", "mistral")


def load_gguf_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _hf_names(config: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
    ]
    per_layer += [f"self_attn.{p}_proj.{kind}" for p in "qkv" for kind in ("weight", "bias")]
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{n}" for n in per_layer]
    return names


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of a q/k projection (rows grouped per head)."""
    dim = weight.shape[0] // heads // 2
    w = weight.reshape(heads, dim, 2, *weight.shape[1:])
    return w.swapaxes(2, 1).reshape(weight.shape)


def load_gguf_tensors(
    path: Path, config: ModelConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Dequantize every tensor of the file into a dict keyed by HF parameter names."""
    import gguf

    arch = {"qwen2": "QWEN2", "qwen3": "QWEN3"}.get(config.model_type, "LLAMA")
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), config.num_layers)
    gguf_to_hf = {}
    for hf_name in _hf_names(config):
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            gguf_to_hf[gguf_name] = hf_name
    reader = gguf.GGUFReader(str(path))
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        hf_name = gguf_to_hf.get(tensor.name)
        if hf_name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if config.model_type in _PERMUTED_QK and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute(array, config.num_heads)
        elif config.model_type in _PERMUTED_QK and hf_name.endswith(
            ("k_proj.weight", "k_proj.bias")
        ):
            array = _unpermute(array, config.num_kv_heads)
        state[hf_name] = torch.from_numpy(np.array(array, copy=True)).to(dtype)
    return state
