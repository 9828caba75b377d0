"""KV-cache policies (one file each) and `make_policy`, which turns a budget into one."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fastdecode.kv.policies.base import KVPolicy
from fastdecode.kv.policies.cake import CakePolicy
from fastdecode.kv.policies.duo import DuoPolicy
from fastdecode.kv.policies.h2o import H2OPolicy
from fastdecode.kv.policies.quant import QuantPolicy
from fastdecode.kv.policies.quest import QuestPolicy
from fastdecode.kv.policies.shadowkv import ShadowKVPolicy
from fastdecode.kv.policies.snapkv import SnapKVPolicy
from fastdecode.kv.policies.streaming import StreamingPolicy
from fastdecode.kv.policies.streaming_read import StreamingReadPolicy
from fastdecode.kv.policies.tidal import TidalPolicy

POLICIES: dict[str, type[KVPolicy]] = {
    "streaming": StreamingPolicy,
    "snapkv": SnapKVPolicy,
    "h2o": H2OPolicy,
    "cake": CakePolicy,
    "duo": DuoPolicy,  # per-head storage: retrieval heads full, streaming heads sinks+window
    # sparse retrieval (storage = "select"): keep everything, read a subset per step
    "quest": QuestPolicy,
    "tidal": TidalPolicy,
    "streaming_read": StreamingReadPolicy,
    # low-rank keys + CPU values, sparse reconstruction (storage = "shadow"); LOSSY
    "shadowkv": ShadowKVPolicy,
    # packed 2/4-bit KV, recent window + salient tokens in fp (storage = "quant"); LOSSY
    "quant": QuantPolicy,
}


def budget_tokens(budget: float, context: int) -> int:
    """A budget is a fraction of the context (0 < b <= 1) or a number of positions (> 1)."""
    if budget <= 0:
        raise ValueError(f"a KV budget must be positive, got {budget}")
    tokens = math.ceil(budget * context) if budget <= 1 else int(budget)
    if tokens > context:
        raise ValueError(
            f"KV budget of {tokens} positions is larger than the context ({context} "
            f"positions: prompt + max_tokens); use a fraction <= 1 or at most {context}"
        )
    return tokens


def make_policy(name: str, budget: float, context: int, **kwargs) -> KVPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](budget_tokens(budget, context), **kwargs)


@dataclass
class KVPolicyConfig:
    """Which policy and how much it keeps: `budget` is a fraction of the context
    (prompt + max_tokens) or a number of positions; `options` go to the policy."""

    name: str
    budget: float
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            known = ", ".join(sorted(POLICIES))
            raise ValueError(f"unknown KV policy {self.name!r}; known: {known}")
        if self.budget <= 0:
            raise ValueError(f"a KV budget must be positive, got {self.budget}")

    def build(self, context: int) -> KVPolicy:
        return make_policy(self.name, self.budget, context, **self.options)

    @property
    def storage(self) -> str:
        """How the policy's cache stores KV ("evict", "select", "heads", "shadow", "quant")."""
        return POLICIES[self.name].storage

    @classmethod
    def from_any(cls, spec: KVPolicyConfig | Mapping[str, Any]) -> KVPolicyConfig:
        if isinstance(spec, KVPolicyConfig):
            return spec
        spec = dict(spec)
        return cls(spec.pop("name", spec.pop("policy", "")), spec.pop("budget", 1.0), spec)


__all__ = ["POLICIES", "KVPolicy", "KVPolicyConfig", "budget_tokens", "make_policy"]
