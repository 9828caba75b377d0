"""SpeculativeConfig: which drafter, how many draft tokens (vLLM's `speculative_config`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from fastdecode.spec.drafters import DRAFTERS, Drafter, make_drafter
from fastdecode.spec.drafters.batch import BatchDrafter, PerRowDrafters

# Drafters that run a model (the batch drafts in shared forward passes); see `batch_drafter`.
MODEL_DRAFTERS = {
    "draft_model": "a separate small model with the target's tokenizer "
    "(drafter_kwargs: model=NAME_OR_PATH)",
    "layerskip": "the target skipping layers (drafter_kwargs: skip=[layer ids])",
    "triforce": "the target over a sparse KV read, lossless (drafter_kwargs: "
    "policy=streaming_read|quest|tidal, budget=fraction or positions)",
}

# vLLM spellings -> ours
_ALIASES = {
    "num_speculative_tokens": "num_draft_tokens",
    "prompt_lookup_max": "max_ngram",
    "prompt_lookup_min": "min_ngram",
}


@dataclass
class SpeculativeConfig:
    """method: a drafter name (`fastdecode.spec.drafters.DRAFTERS`, or a model drafter of
    MODEL_DRAFTERS; "draft:NAME" is short for draft_model with model NAME);
    num_draft_tokens: the most draft nodes per step (K; 0 turns drafting off, every step is
    then a plain decode step). max_ngram / min_ngram: n-gram lengths for prompt lookup.
    `drafter_kwargs` go to the drafter as they are.

    Model drafters only: `tree` shapes the drafts ("chain", static "4,2,1" or DySpec's
    "dynamic[:DEPTH:PER_LEVEL]"); `confidence_threshold` stops a chain once the draft is
    less sure than this (SpecDec++ / Kangaroo / BiLD fallback). `draft_length` picks K per
    request and step: "fixed", "feedback" (recent acceptance, DiffuSpec) or "goodput"
    (batch-aware, from measured step times: SmartSpec), with `draft_length_kwargs`.

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
    tree: str | None = None
    confidence_threshold: float = 0.0
    draft_length: str = "fixed"
    draft_length_kwargs: dict[str, Any] = field(default_factory=dict)
    _shared: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)
    # the engine's own state (loaded draft model, self-drafter, length policy): never passed
    # to a drafter constructor, unlike `_shared`
    _engine: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method.startswith("draft:"):
            self.drafter_kwargs = {**self.drafter_kwargs, "model": self.method[len("draft:") :]}
            self.method = "draft_model"
        if self.method not in DRAFTERS and self.method not in MODEL_DRAFTERS:
            known = ", ".join(sorted(DRAFTERS) + sorted(MODEL_DRAFTERS) + ["draft:MODEL"])
            raise ValueError(f"unknown drafter {self.method!r}; known drafters: {known}")
        if not isinstance(self.num_draft_tokens, int) or self.num_draft_tokens < 0:
            raise ValueError(
                f"num_draft_tokens must be an integer >= 0, got {self.num_draft_tokens!r}"
            )
        if not 0.0 <= self.confidence_threshold < 1.0:
            raise ValueError(
                f"confidence_threshold must be in [0, 1), got {self.confidence_threshold!r}"
            )
        from fastdecode.spec.length import make_length_policy

        make_length_policy(self.draft_length, **self.draft_length_kwargs)  # fail now
        if self.method in MODEL_DRAFTERS:
            check_model_drafter_args(self)
        else:
            if self.tree is not None:
                raise ValueError(
                    f"tree shapes are for model drafters ({', '.join(MODEL_DRAFTERS)}); "
                    f"{self.method!r} proposes its own trees"
                )
            make_drafter(self.method, **self._kwargs())  # fail now on bad drafter arguments

    def _kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.drafter_kwargs)
        if self.method == "ngram":
            kwargs.setdefault("max_ngram", self.max_ngram)
            kwargs.setdefault("min_ngram", self.min_ngram)
        return kwargs

    def batch_drafter(self, runner, tokenizer, batch: int) -> BatchDrafter:
        """The drafter for one batch of `batch` requests on `runner` (the target's)."""
        if self.method in MODEL_DRAFTERS:
            from fastdecode.spec.drafters.model_drafters import build_model_drafter

            return build_model_drafter(self, runner, tokenizer, self._engine)
        return PerRowDrafters([self.new_drafter() for _ in range(batch)])

    def forget_requests(self) -> None:
        """Drop what earlier requests left in the drafters' shared state (SuffixDecoding's
        global tree) but keep the engine's (a loaded draft model, the length policy's
        measured step costs). Benchmarks warm up, forget, then measure: a warm-up on the
        same prompts would otherwise hand the measured run its own outputs to draft from."""
        self._shared = None

    def length_policy(self):
        """The draft-length policy (kept across batches: its step-cost model learns); None
        for "fixed" (every row drafts num_draft_tokens)."""
        if self.draft_length == "fixed" and not self.draft_length_kwargs:
            return None
        if "length_policy" not in self._engine:
            from fastdecode.spec.length import make_length_policy

            self._engine["length_policy"] = make_length_policy(
                self.draft_length, **self.draft_length_kwargs
            )
        return self._engine["length_policy"]

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
        spec = dict(spec)
        if "model" in spec:  # vLLM: {"model": DRAFT, "num_speculative_tokens": K}
            drafter_kwargs = {**spec.get("drafter_kwargs", {}), "model": spec.pop("model")}
            spec.setdefault("method", "draft_model")
            spec["drafter_kwargs"] = drafter_kwargs
        for key, value in spec.items():
            key = _ALIASES.get(key, key)
            if key not in names:
                raise ValueError(
                    f"unknown speculative_config key {key!r}; known: "
                    + ", ".join(sorted(names | set(_ALIASES)))
                )
            kwargs[key] = value
        return cls(**kwargs)


def check_model_drafter_args(config: SpeculativeConfig) -> None:
    """Clear errors before any model loads."""
    from fastdecode.spec.drafters.tree_drafting import TreeShape

    TreeShape.parse(config.tree, config.confidence_threshold)
    allowed = {"draft_model": {"model"}, "layerskip": {"skip"}, "triforce": {"policy", "budget"}}
    known = allowed[config.method]
    unknown = set(config.drafter_kwargs) - known
    if unknown:
        raise ValueError(
            f"bad arguments for drafter {config.method!r}: {', '.join(sorted(unknown))}; "
            f"it takes: {', '.join(sorted(known))}"
        )
    if config.method == "draft_model" and not config.drafter_kwargs.get("model"):
        raise ValueError("draft_model needs a draft model: drafter_kwargs={'model': NAME_OR_PATH}")
    if config.method == "triforce" and config.tree not in (None, "chain"):
        raise ValueError("triforce drafts chains: its sparse reads serve single-token steps")
