"""A model that cannot be loaded fails with ModelLoadError and a message naming the cause."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer

from fastdecode.model.load import ModelLoadError, load_model

REGISTRY_NAME = "smollm2-135m-instruct"


@pytest.mark.parametrize("spec", ["no-such-model", "smollm2-135m", "./missing/model.gguf"])
def test_unknown_name_or_path_lists_registry_names(spec):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    message = str(info.value)
    assert repr(spec) in message or spec in message
    assert "registry names" in message
    assert REGISTRY_NAME in message


def test_directory_without_config_or_gguf(tmp_path):
    (tmp_path / "notes.md").write_text("not a model")
    with pytest.raises(ModelLoadError, match="neither config.json .* nor one .gguf file"):
        load_model(tmp_path)


def test_directory_with_two_ggufs_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="one .gguf file"):
        load_model(tmp_path)


def test_hf_directory_without_tokenizer(tiny_model, tmp_path):
    source, _ = tiny_model("llama")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="missing tokenizer") as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_hf_directory_without_weights(tiny_model, tmp_path):
    source, _ = tiny_model("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, tmp_path / name)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(tmp_path)


def test_unsupported_architecture(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gpt2'") as info:
        load_model(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "llama" in message  # names what is supported


def test_text_file(tmp_path):
    path = tmp_path / "model.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"must be a \.gguf checkpoint") as info:
        load_model(path)
    assert str(path) in str(info.value)


def _truncated_copy(source: Path, target: Path, size: int) -> Path:
    with open(source, "rb") as f:
        target.write_bytes(f.read(size))
    return target


@pytest.mark.slow
@pytest.mark.parametrize("size", [0, 10, 1000, 5_000_000])
def test_truncated_gguf(smollm2_path, tmp_path, size):
    """Cut inside the magic, the header, the metadata, and the tensor data."""
    path = _truncated_copy(smollm2_path, tmp_path / "cut.gguf", size)
    with pytest.raises(ModelLoadError, match="truncated or corrupt") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"definitely not a gguf checkpoint\n" * 64)
    with pytest.raises(ModelLoadError, match="GGUF") as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_hub_id_when_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import: set what it already read as well.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = "fastdecode-tests/no-such-model"
    with pytest.raises(ModelLoadError, match="offline") as info:
        load_model(spec)
    message = str(info.value)
    assert spec in message
    assert REGISTRY_NAME in message  # points at what works without the hub
