"""Builds the model-based drafters of a SpeculativeConfig (the draft model is loaded once
and kept in the config's shared state, so later batches reuse it and its CUDA graphs)."""

from __future__ import annotations

import weakref
from typing import Any

from fastdecode.engine.runner import ModelRunner
from fastdecode.kv.policies import KVPolicyConfig
from fastdecode.spec.drafters.draft_model import DraftModelDrafter, check_same_tokenizer
from fastdecode.spec.drafters.self_draft import SelfDrafter, choose_skip
from fastdecode.spec.drafters.tree_drafting import TreeShape

TRIFORCE_DEFAULT_BUDGET = 1 / 16
# Loaded draft models by (name, device, dtype, graphs): a second config naming the same draft
# reuses its weights, compiled kernels and CUDA graphs instead of loading it again.
_DRAFTS: dict[tuple, tuple[ModelRunner, Any]] = {}


def _load_draft(name: str, runner: ModelRunner) -> tuple[ModelRunner, Any]:
    model = runner.model
    key = (name, str(model.device), model.dtype, runner.cuda_graphs)
    if key not in _DRAFTS:
        from fastdecode.model.load import load_model

        loaded = load_model(name, dtype=model.dtype, device=model.device, progress=False)
        _DRAFTS[key] = (ModelRunner(loaded.model, cuda_graphs=runner.cuda_graphs), loaded.tokenizer)
    return _DRAFTS[key]


# Calibration text for layerskip's default skip set: prose and code, like the workloads.
_CALIBRATION = (
    "The quick brown fox jumps over the lazy dog. Speculative decoding drafts tokens cheaply "
    "and verifies them in one pass of the large model.\n\n"
    "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        a, b = b, a + b\n    return a\n\nQuestion: what is 12 times 7? Answer: 84."
)
_SKIPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its skip set


def _default_skip(runner: ModelRunner, tokenizer) -> list[int]:
    """The layers that change the residual stream least on a fixed calibration text."""
    model = runner.model
    if model not in _SKIPS:  # keyed by the model object: an id could be reused by another
        _SKIPS[model] = choose_skip(model, tokenizer.encode(_CALIBRATION))
    return _SKIPS[model]


def build_model_drafter(config, runner: ModelRunner, tokenizer, shared: dict[str, Any]):
    shape = TreeShape.parse(config.tree, config.confidence_threshold)
    kwargs = config.drafter_kwargs
    if config.method == "draft_model":
        name = str(kwargs["model"])
        if shared.get("draft_name") != name:
            draft_runner, draft_tokenizer = _load_draft(name, runner)
            check_same_tokenizer(draft_tokenizer, tokenizer, name)
            shared["draft_runner"] = draft_runner
            shared["draft_name"] = name
            shared.pop("drafter", None)
        drafter = shared.get("drafter")
        if drafter is None or drafter.shape != shape:
            vocab = runner.model.lm_head.shape[0]
            drafter = DraftModelDrafter(
                shared["draft_runner"], shape, config.num_draft_tokens, vocab
            )
            shared["drafter"] = drafter
        drafter.max_nodes = config.num_draft_tokens
        return drafter
    num_layers = runner.model.config.num_layers
    if config.method == "layerskip":
        skip = kwargs.get("skip")
        skip = _default_skip(runner, tokenizer) if skip is None else [int(i) for i in skip]
        bad = [i for i in skip if not 0 <= i < num_layers]
        if bad or len(set(skip)) >= num_layers:
            raise ValueError(
                f"layerskip: skip must name layers 0..{num_layers - 1} and keep at least one, "
                f"got {skip}"
            )
        kept = [i for i in range(num_layers) if i not in set(skip)]
        key = ("layerskip", shape, tuple(kept))
        make = lambda: SelfDrafter(runner, shape, layer_ids=kept)  # noqa: E731
    else:
        policy = KVPolicyConfig(
            str(kwargs.get("policy", "streaming_read")),
            float(kwargs.get("budget", TRIFORCE_DEFAULT_BUDGET)),
        )
        key = ("triforce", shape, policy.name, policy.budget)
        make = lambda: SelfDrafter(runner, shape, sparse_policy=policy)  # noqa: E731
    # kept across batches: a drafter holds the CUDA graphs of its forward
    if shared.get("self_key") != key or shared.get("self_runner") is not runner:
        shared.update(self_key=key, self_runner=runner, self_drafter=make())
    return shared["self_drafter"]
