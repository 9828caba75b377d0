"""SpeculativeConfig: which drafter, how many draft tokens (vLLM's `speculative_config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fastdecode.spec.drafters import DRAFTERS, Drafter, make_drafter

# vLLM spellings -> ours
_ALIASES = {
    "num_speculative_tokens": "num_draft_tokens",
    "prompt_lookup_max": "max_ngram",
    "prompt_lookup_min": "min_ngram",
}


@dataclass
class SpeculativeConfig:
    """method: a drafter name (see `fastdecode.spec.drafters.DRAFTERS`); num_draft_tokens:
    the most draft nodes per step (K; 0 turns drafting off, every step is then a plain
    decode step). max_ngram / min_ngram: n-gram lengths for prompt lookup. `drafter_kwargs`
    go to the drafter's constructor as they are.

    State shared across requests (SuffixDecoding's global tree: a drafter class's
    `shared_state`) belongs to the config object: every drafter it makes gets the same one,
    so reuse one config (or set it on the LLM) to share it across `generate` calls.

    `SpeculativeConfig.from_any` also takes vLLM's dict, e.g. {"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 4}.
    """

    method: str = "ngram"
    num_draft_tokens: int = 4
    max_ngram: int = 4
    min_ngram: int = 1
    drafter_kwargs: dict[str, Any] = field(default_factory=dict)
    _shared: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in DRAFTERS:
            known = ", ".join(sorted(DRAFTERS))
            raise ValueError(f"unknown drafter {self.method!r}; known drafters: {known}")
        if not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 0:
            raise ValueError(
                f"num_draft_tokens must be an integer >= 0, got {self.num_draft_tokens!r}"
            )
        make_drafter(self.method, **self._kwargs())  # fail now on bad drafter arguments

    def _kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.drafter_kwargs)
        if self.method == "ngram":
            kwargs.setdefault("max_ngram", self.max_ngram)
            kwargs.setdefault("min_ngram", self.min_ngram)
        return kwargs

    def new_drafter(self) -> Drafter:
        kwargs = self._kwargs()
        make_shared = getattr(DRAFTERS[self.method], "shared_state", None)
        if make_shared is not None:
            if self._shared is None:
                self._shared = make_shared(**kwargs)
            kwargs = {**self._shared, **kwargs}  # explicit drafter_kwargs win
        return make_drafter(self.method, **kwargs)

    @classmethod
    def from_any(cls, spec: SpeculativeConfig | Mapping[str, Any] | str) -> SpeculativeConfig:
        """A SpeculativeConfig, a method name, or a (vLLM-style) dict."""
        if isinstance(spec, SpeculativeConfig):
            return spec
        if isinstance(spec, str):
            return cls(method=spec)
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"speculative_config must be a SpeculativeConfig, a dict or a method name, "
                f"got {type(spec).__name__}"
            )
        names = {f.name for f in fields(cls) if f.init}
        kwargs: dict[str, Any] = {}
        for key, value in spec.items():
            key = _ALIASES.get(key, key)
            if key not in names:
                raise ValueError(
                    f"unknown speculative_config key {key!r}; known: "
                    + ", ".join(sorted(names | set(_ALIASES)))
                )
            kwargs[key] = value
        return cls(**kwargs)
