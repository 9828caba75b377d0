"""ModelRunner: owns the KV cache and runs prefill and decode steps for one model.

On CUDA the decode step is captured as a CUDA graph per batch size (as nano-vllm does), and
the dense halves of each layer are compiled once by torch.compile; on CPU it runs eagerly.
Graph capture uses the real step's inputs: the warm-up writes K/V exactly where the real
step writes them, so capture never disturbs the cache.
"""

from __future__ import annotations

import torch

from fastdecode.engine.graphed import GraphedDecode, GraphedForward
from fastdecode.kv.cache import KVCache
from fastdecode.kv.policies import KVPolicyConfig
from fastdecode.kv.selective import SelectiveKVCache
from fastdecode.kv.shadow import ShadowKVCache
from fastdecode.kv.sparse import SparseKVCache
from fastdecode.model.transformer import Transformer

CAPACITY_ROUNDING = 128


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        *,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        kv_policy: KVPolicyConfig | None = None,
    ) -> None:
        on_cuda = model.device.type == "cuda"
        self.model = model
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs and on_cuda
        if on_cuda if compile is None else compile:
            model.compile()
        self.kv_policy = kv_policy  # None: the dense cache; else a budgeted SparseKVCache
        self.cache: KVCache | SparseKVCache | None = None
        self._decode: GraphedDecode | None = None  # the decode step's CUDA graphs
        self._multi: GraphedForward | None = None

    def multi_forward(self) -> GraphedForward:
        """Multi-token forwards (verification) over the current cache, graphed on CUDA; kept
        while the cache is, so later batches of the same shape replay the same graphs."""
        if self._multi is None or self._multi.cache is not self.cache:
            self._multi = GraphedForward(self.model, self.cache, enabled=self.cuda_graphs)
        return self._multi

    @property
    def device(self) -> torch.device:
        return self.model.device

    def allocate(
        self,
        batch: int,
        tokens_needed: int,
        prompt_len: int | None = None,
        kv_policy: KVPolicyConfig | None = None,
    ) -> KVCache | SparseKVCache:
        """Ensure a cache of `batch` rows holding `tokens_needed` slots (reused when it fits).

        With a KV policy (the runner's, or `kv_policy` for this batch) the cache is budgeted
        instead, sized from the longest prompt (`prompt_len`) and the tokens still to come;
        it is new for every batch."""
        context = self.model.config.max_position
        if tokens_needed > context:
            raise ValueError(
                f"prompt + max_tokens needs {tokens_needed} positions, more than the model's "
                f"context of {context}"
            )
        kv_policy = kv_policy or self.kv_policy
        if kv_policy is not None:
            return self._allocate_budgeted(
                kv_policy, batch, tokens_needed, prompt_len or tokens_needed
            )
        capacity = min(round_up(tokens_needed, CAPACITY_ROUNDING), context)
        cache = self.cache
        # Reuse a cache that fits: its CUDA graphs stay valid, so requests of varying length
        # do not re-capture. The Triton kernels read only a row's valid slots; without them
        # (masked SDPA reads the whole capacity) the cache must not be much larger.
        fits = cache is not None and capacity <= cache.capacity
        if fits and not self.model.decode_kernel:
            fits = cache.capacity <= max(2 * capacity, 2048)
        if not fits or cache.batch != batch or type(cache) is not KVCache:
            self._release()
            self.cache = self.model.new_cache(batch, capacity)
        return self.cache

    def _release(self) -> None:
        """Drop the cache and the graphs that point at its memory (before allocating anew)."""
        self.cache = None
        self._decode = None
        self._multi = None

    def _allocate_budgeted(
        self, kv_policy: KVPolicyConfig, batch: int, tokens_needed: int, prompt_len: int
    ):
        cfg = self.model.config
        policy = kv_policy.build(context=tokens_needed)
        max_new = tokens_needed - prompt_len
        capacities = [policy.capacity(i, prompt_len, max_new) for i in range(cfg.num_layers)]
        self._release()
        if policy.storage == "select":  # keeps every entry (dense capacity), reads a subset
            capacity = min(round_up(tokens_needed, CAPACITY_ROUNDING), cfg.max_position)
            self.cache = SelectiveKVCache(
                policy, cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim,
                self.model.dtype, self.device,
            )  # fmt: skip
            return self.cache
        if policy.storage == "shadow":  # low-rank keys, values offloaded to the CPU (ShadowKV)
            capacity = min(round_up(tokens_needed, CAPACITY_ROUNDING), cfg.max_position)
            self.cache = ShadowKVCache.for_model(policy, self.model, batch, capacity)
            return self.cache
        if policy.storage == "heads":  # KV heads of a layer differ in capacity (duo)
            self.cache = policy.new_cache(self.model, batch, prompt_len, max_new)
            return self.cache
        if policy.storage == "quant":  # every position at 2/4 bits, lossy (KIVI + ZipCache)
            self.cache = policy.new_cache(self.model, batch, prompt_len, max_new)
            return self.cache
        self.cache = SparseKVCache(
            policy, capacities, batch, cfg.num_kv_heads, cfg.head_dim, self.model.dtype, self.device
        )
        return self.cache

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run right-padded prompts from position 0; logits [B, V] at each last prompt token."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt)
        tokens = tokens.to(self.device)
        positions = torch.arange(width, device=self.device).expand(len(prompts), width)
        return self.model.forward(
            tokens, positions, self.cache, logit_index=lengths - 1, prefill=True
        )

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per row: tokens, positions [B] -> logits [B, V]."""
        if self._decode is None or self._decode.cache is not self.cache:
            self._decode = GraphedDecode(self.model, self.cache, enabled=self.cuda_graphs)
        return self._decode(tokens, positions)
