"""Resolve a model spec (registry name, GGUF file, HF directory, hub id) to weights + tokenizer."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdecode.model.config import ModelConfig, UnsupportedModelError
from fastdecode.model.gguf_loader import load_gguf_config, load_gguf_tensors, load_gguf_tokenizer
from fastdecode.model.transformer import Transformer


class ModelLoadError(ValueError):
    """A model could not be located or read; the message names the cause."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any
    source: str


def _registry_names() -> list[str]:
    from fastdecode import hub

    return sorted(hub.registry())


def resolve(spec: str | os.PathLike, *, progress: bool = True) -> Path:
    """Turn a spec into a local GGUF file or HF directory, fetching registry names."""
    spec_str = str(spec)
    if spec_str in _registry_names():
        from fastdecode import hub

        return hub.fetch(spec_str, progress=progress)
    path = Path(spec_str).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: a model file must be a .gguf checkpoint")
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelLoadError(
            f"{path}: directory holds neither config.json (an HF checkpoint) nor one .gguf file"
        )
    if spec_str.count("/") == 1 and not spec_str.startswith((".", "/", "~")):
        return _download_from_hub(spec_str)
    raise ModelLoadError(
        f"{spec_str!r} is not a registry name, a .gguf file, a model directory or a hub id; "
        f"registry names: {', '.join(_registry_names())}"
    )


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]
            )
        )
    except Exception as exc:  # network errors come in many types; all mean the same here
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). This machine may be offline: pass a registry name "
            f"({', '.join(_registry_names())}), a local .gguf file or an HF directory instead."
        ) from exc


def _load_hf_dir(path: Path) -> tuple[Any, dict[str, torch.Tensor], Any]:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    hf_config = AutoConfig.from_pretrained(str(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    state = {
        k if k.startswith(("model.", "lm_head.")) else f"model.{k}": v for k, v in state.items()
    }
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ModelLoadError(f"{path}: missing tokenizer (tokenizer.json or tokenizer.model)")
    return hf_config, state, AutoTokenizer.from_pretrained(str(path))


def _read_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, ModelConfig, dict, Any]:
    try:
        hf_config = load_gguf_config(path)
        config = ModelConfig.from_hf(hf_config)
        state = load_gguf_tensors(path, config, dtype)
        tokenizer = load_gguf_tokenizer(path)
    except UnsupportedModelError:
        raise
    except (ValueError, struct.error, EOFError, OSError, IndexError, KeyError) as exc:
        # A truncated or corrupt file fails deep inside the gguf parser (struct.error,
        # a reshape ValueError, ...): name the file and the likely cause.
        kind = "struct.error" if isinstance(exc, struct.error) else type(exc).__name__
        raise ModelLoadError(
            f"{path}: could not read this GGUF file; it may be truncated or corrupt ({kind}: {exc})"
        ) from exc
    return hf_config, config, state, tokenizer


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> LoadedModel:
    path = resolve(spec, progress=progress)
    try:
        if path.is_file():
            hf_config, config, state, tokenizer = _read_gguf(path, dtype)
        else:
            hf_config, state, tokenizer = _load_hf_dir(path)
            config = ModelConfig.from_hf(hf_config)
    except ModelLoadError:
        raise
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    model = Transformer.from_hf_state_dict(config, state, dtype, device)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path))
