"""The public face, in vLLM's shape: LLM(model).generate(prompts, SamplingParams(...))."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fastdecode.engine.generate import BatchTiming, run_batch
from fastdecode.engine.runner import ModelRunner
from fastdecode.engine.speculative import SpecTiming, run_speculative
from fastdecode.engine.stopping import RequestState
from fastdecode.kv.policies import KVPolicyConfig
from fastdecode.model.load import load_model
from fastdecode.params import SamplingParams
from fastdecode.spec.config import SpeculativeConfig

DEFAULT_MODEL = "smollm2-135m-instruct"
# End-of-turn markers that chat models emit in place of (or besides) their eos_token.
_END_OF_TURN = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>")

Message = dict[str, str]
Prompt = str | list[int] | list[Message]
SpecArg = SpeculativeConfig | dict[str, Any] | str | None


@dataclass
class GenerationResult:
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    # floats; with speculation also acceptance_per_position (a list of floats)
    metrics: dict[str, Any] = field(default_factory=dict)


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(names)}")
    return names[dtype]


def _is_chat(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


class LLM:
    """A loaded model plus its engine.

    model: a registry name (see `fastdecode fetch --list`), a .gguf file, an HF directory
    (config.json + safetensors + tokenizer) or a hub id. dtype/device "auto" picks bf16 on
    CUDA and float32 on CPU.

    speculative_config turns on speculative decoding for every request (vLLM's option): a
    SpeculativeConfig, a method name, or vLLM's dict, e.g. {"method": "ngram",
    "num_speculative_tokens": 4, "prompt_lookup_max": 4}. `generate` may override it.
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        dtype: str | torch.dtype = "auto",
        device: str = "auto",
        max_batch_size: int = 64,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        progress: bool = True,
        speculative_config: SpecArg = None,
        kv_policy: KVPolicyConfig | dict | None = None,
    ) -> None:
        self.speculative_config = (
            None if speculative_config is None else SpeculativeConfig.from_any(speculative_config)
        )
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        loaded = load_model(model, dtype=self.dtype, device=self.device, progress=progress)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.source = loaded.source
        self.max_batch_size = max_batch_size
        self.kv_policy = None if kv_policy is None else KVPolicyConfig.from_any(kv_policy)
        _check_spec_with_policy(self.speculative_config, self.kv_policy)
        self.runner = ModelRunner(
            self.model, cuda_graphs=cuda_graphs, compile=compile, kv_policy=self.kv_policy
        )
        self.eos_ids = self._eos_ids()
        # On GPU look at the tokens every few steps; on CPU a step dwarfs a sync.
        self.check_every = 8 if self.device.type == "cuda" else 1

    def _eos_ids(self) -> frozenset[int]:
        ids = {self.tokenizer.eos_token_id}
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
        return frozenset(i for i in ids if i is not None)

    # -- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: Prompt, chat_template: bool | None = None) -> list[int]:
        """Token ids for a string, a token list, or a chat (list of {role, content})."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:
            return list(prompt)
        if _is_chat(prompt) or chat_template:
            messages = prompt if _is_chat(prompt) else [{"role": "user", "content": prompt}]
            if not self.tokenizer.chat_template:
                raise ValueError("this model's tokenizer has no chat template")
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            return self.tokenizer.encode(prompt)
        raise TypeError(
            f"a prompt must be a string, a list of token ids or a list of chat messages, "
            f"got {type(prompt).__name__}"
        )

    def _normalize(self, prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str) or _is_chat(prompts):
            return [prompts]
        if isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        return prompts

    # -- generation ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat_template: bool | None = None,
        speculative_config: SpecArg = None,
    ) -> list[GenerationResult]:
        """Generate for each prompt (batched, up to max_batch_size at once).

        Plain strings are used as given unless chat_template=True; chats always get the
        tokenizer's chat template. One SamplingParams applies to all, or give one each.
        speculative_config (default: the LLM's) decodes speculatively; the output is the
        same as without it (greedy: token for token; sampling: in distribution).
        """
        spec = self._spec(speculative_config)
        items = self._normalize(prompts)
        params_list = self._params_for(items, params)
        results: list[GenerationResult] = []
        for start in range(0, len(items), self.max_batch_size):
            chunk = items[start : start + self.max_batch_size]
            chunk_params = params_list[start : start + self.max_batch_size]
            ids = [self.encode(p, chat_template) for p in chunk]
            states = self._new_states(chunk_params)
            steps, timing = self._decode(ids, states, spec, self.check_every)
            for _ in steps:
                pass
            results += [
                self._result(p, i, s, timing, row)
                for row, (p, i, s) in enumerate(zip(chunk, ids, states, strict=True))
            ]
        return results

    def chat(
        self, messages: list[Message] | list[list[Message]], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """vLLM's `chat`: one conversation or a list of them, through the chat template."""
        return self.generate(messages, params, chat_template=True)

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        chat_template: bool | None = None,
        speculative_config: SpecArg = None,
    ) -> Iterator[str]:
        """Yield text pieces of one request as they are decoded; the last value returned by
        the iterator (StopIteration.value) is the GenerationResult."""
        spec = self._spec(speculative_config)
        params = params or SamplingParams()
        ids = self.encode(prompt, chat_template)
        state = self._new_states([params])[0]
        steps, timing = self._decode([ids], [state], spec, check_every=1)
        for _ in steps:
            piece = state.new_text()
            if piece:
                yield piece
        piece = state.new_text()
        if piece:
            yield piece
        return self._result(prompt, ids, state, timing)

    def _spec(self, speculative_config: SpecArg) -> SpeculativeConfig | None:
        if speculative_config is None:
            return self.speculative_config
        spec = SpeculativeConfig.from_any(speculative_config)
        return _check_spec_with_policy(spec, self.runner.kv_policy)

    def _decode(
        self,
        ids: list[list[int]],
        states: list[RequestState],
        spec: SpeculativeConfig | None,
        check_every: int,
    ) -> tuple[Iterator[None], BatchTiming]:
        """The decoding loop for one batch: plain, or speculative when `spec` is set."""
        if spec is None:
            timing = BatchTiming()
            return run_batch(self.runner, ids, states, timing, check_every), timing
        timing = SpecTiming()
        drafter = spec.batch_drafter(self.runner, self.tokenizer, len(ids))
        steps = run_speculative(
            self.runner, ids, states, timing, drafter, spec.num_draft_tokens,
            spec.length_policy(),
        )  # fmt: skip
        return steps, timing

    def _params_for(self, items: list[Prompt], params) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * len(items)
        if isinstance(params, SamplingParams):
            return [params] * len(items)
        params = list(params)
        if len(params) != len(items):
            raise ValueError(f"{len(params)} SamplingParams for {len(items)} prompts")
        return params

    def _new_states(self, params: list[SamplingParams]) -> list[RequestState]:
        return [RequestState(p, self.eos_ids, self.tokenizer) for p in params]

    def _result(
        self,
        prompt: Prompt,
        ids: list[int],
        state: RequestState,
        timing: BatchTiming,
        row: int = 0,
    ) -> GenerationResult:
        total = timing.prefill_s + timing.decode_s
        n = len(state.token_ids)
        metrics = {
            "prompt_tokens": len(ids),
            "completion_tokens": n,
            "ttft_s": timing.prefill_s,
            "total_s": total,
            "decode_tokens_per_s": (timing.steps - 1) / timing.decode_s if timing.decode_s else 0.0,
            "tokens_per_s": n / total if total else 0.0,
        }
        if isinstance(timing, SpecTiming):  # this request's speculation record
            stats = timing.rows[row]
            if timing.decode_s and n > 1:  # steps count verify passes, not tokens
                metrics["decode_tokens_per_s"] = (n - 1) / timing.decode_s
            metrics.update(
                tau=stats.tau,
                spec_steps=stats.steps,
                plain_steps=stats.plain_steps,  # of spec_steps: K = 0 bursts
                draft_tokens=sum(stats.proposed),
                accepted_tokens=sum(stats.accepted),
                acceptance_per_position=stats.acceptance,
                draft_s=stats.draft_s,
                verify_s=stats.verify_s,
                fused_steps=timing.fused_steps,  # drafted inside verify_s (one device pass)
            )
        text_prompt = prompt if isinstance(prompt, str) else None
        return GenerationResult(
            text_prompt, ids, state.text, state.token_ids, state.finish_reason, metrics
        )


def _check_spec_with_policy(
    spec: SpeculativeConfig | None, policy: KVPolicyConfig | None
) -> SpeculativeConfig | None:
    """Verification writes draft tokens that may be rejected, then forgets them: only a cache
    that stores every position at its own slot can (dense, a sparse-retrieval policy, and
    ShadowKV, whose generated tokens stay exact and movable). An evicting, per-head or
    quantized cache cannot take them back. (TriForce brings its own sparse-read cache.)"""
    rolls_back = ("select", "shadow")
    if spec is None or policy is None or policy.storage in rolls_back or spec.method == "triforce":
        return spec
    raise ValueError(
        f"speculative decoding ({spec.method}) cannot run over the {policy.name!r} KV policy: "
        f"its cache ({policy.storage} storage) cannot roll back rejected drafts; use a "
        "sparse-retrieval policy (quest, tidal, streaming_read), shadowkv or no kv_policy"
    )
