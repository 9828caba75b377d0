"""fastdecode: fast, lossless LLM decoding in one engine."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "GenerationResult", "SpeculativeConfig", "KVPolicyConfig"]


def __getattr__(name: str):
    # Lazy, so `fastdecode fetch` and the hub do not pay for importing torch.
    if name in __all__:
        from fastdecode import api

        if name == "KVPolicyConfig":
            from fastdecode.kv.policies import KVPolicyConfig

            return KVPolicyConfig
        return getattr(api, name)
    raise AttributeError(f"module 'fastdecode' has no attribute {name!r}")
