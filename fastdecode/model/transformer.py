"""The Llama-family decoder (Llama, SmolLM2, Mistral, Qwen2/2.5, Qwen3) over our KV cache.

Weights arrive under HF names (from safetensors or a dequantized GGUF) and are fused here
(q|k|v, gate|up) so a decode step launches fewer, larger matmuls.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fastdecode.kv.attention import decode_kernel_available, fold_mask_for_gqa, visible_mask
from fastdecode.kv.cache import KVCache
from fastdecode.kv.step import StepContext
from fastdecode.kv.tree_mask import TreeMask
from fastdecode.model.config import ModelConfig
from fastdecode.model.fused_decode import FusedDecodeStep, fused_decode_supported
from fastdecode.model.fused_selective import FusedSelectiveStep
from fastdecode.model.layers import (
    LayerFunctions,
    LayerWeights,
    attention_input,
    attention_output_and_mlp,
    decoder_layer,
    rms_norm,
)
from fastdecode.model.rope import rope_table


class Transformer:
    """Plain container of weights plus a forward over a KVCache (no nn.Module machinery)."""

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
    ) -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        max_position = config.max_position
        cos, sin = rope_table(config.hf_config, config.head_dim, max_position)
        self.cos = cos.to(device=embed.device, dtype=embed.dtype)
        self.sin = sin.to(device=embed.device, dtype=embed.dtype)
        self.layer_fns = LayerFunctions(
            functools.partial(
                attention_input,
                num_heads=config.num_heads,
                num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                eps=config.rms_norm_eps,
            ),
            functools.partial(attention_output_and_mlp, eps=config.rms_norm_eps),
        )
        self.decode_fns = self.layer_fns  # replaced by compiled versions in compile()
        self.multi_fns = self.layer_fns  # multi-token steps (verify, drafting): any shape
        self.decode_kernel = decode_kernel_available(embed.device)
        fused = fused_decode_supported(self)
        self.fused_decode = FusedDecodeStep(self, False) if fused else None
        self.fused_select = FusedSelectiveStep(self, False) if fused else None  # sparse reads

    def compile(self) -> None:
        """Compile the two dense halves of a layer for decode steps; every layer shares the
        kernels (one compile per batch size, not per layer). Prefill stays eager: it is
        compute-bound, and its shapes vary with every prompt length."""
        import torch._dynamo.config as dynamo_config

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, max(getattr(dynamo_config, knob), 64))
        self.decode_fns = LayerFunctions(
            *(torch.compile(fn, fullgraph=True, dynamic=False) for fn in self.layer_fns)
        )
        # Verify / draft steps come in many (batch, tokens) shapes: one dynamic compile
        # serves them all instead of one recompile per shape.
        self.multi_fns = LayerFunctions(
            *(torch.compile(fn, fullgraph=True, dynamic=True) for fn in self.layer_fns)
        )
        if self.fused_decode is not None:
            self.fused_decode = FusedDecodeStep(self, compile=True)
            self.fused_select = FusedSelectiveStep(self, compile=True)

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache
    ) -> torch.Tensor:
        """One token per row: tokens, positions [B] -> logits [B, V] (float32)."""
        if self.fused_decode is not None and getattr(cache, "dense_reads", False):
            return self.fused_decode(tokens, positions, cache)
        if self.fused_select is not None and getattr(cache, "fused_select_ok", False):
            return self.fused_select(tokens, positions, cache)  # a sparse-retrieval cache
        return self.forward(tokens[:, None], positions[:, None], cache, decode=True)[:, 0]

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def weight_bytes(self) -> int:
        """Bytes a decode step streams from memory for the weights (embedding rows excluded)."""
        total = self.lm_head.numel() + self.norm.numel()
        for layer in self.layers:
            total += sum(t.numel() for t in layer if t is not None)
        return total * self.embed.element_size()

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        cfg = self.config
        return KVCache(
            cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, self.dtype, self.device
        )

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        *,
        slots: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        logit_index: torch.Tensor | None = None,
        decode: bool = False,
        prefill: bool = False,
        layer_ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Run tokens [B, T] at RoPE positions [B, T], writing K/V at `slots` (default: positions).

        mask [B, 1, T, capacity] (bool) overrides the causal one (tree verification); a
        `TreeMask` (prefix + tree) lets dense caches on CUDA verify with the tree kernel.
        logit_index [B] picks one position per row to project (prefill); default: all.
        decode=True uses the compiled layer halves (fixed small shapes; one token per row, or
        the dynamic-shape compile for several); prefill=True says the rows start empty (a
        budgeted cache compresses the prompt as it stores it). layer_ids runs only those
        layers (self-speculation that skips layers; the others' K/V are left untouched).
        Returns logits [B, T, V] (or [B, V] with logit_index), in float32.
        """
        batch, length = tokens.shape
        lengths = None
        dense = isinstance(cache, KVCache)  # slot j of row b holds position j
        tree = None
        if isinstance(mask, TreeMask):  # a verify step: the tree kernel, or a dense mask
            use_kernel = self.decode_kernel and length > 1 and getattr(cache, "tree_reads", False)
            tree, mask = (mask, None) if use_kernel else (None, mask.dense(cache.capacity))
        if dense and decode and mask is None and slots is None and length == 1:
            if self.decode_kernel:
                lengths = positions[:, 0] + 1  # the kernel reads slots 0..position
        if dense and mask is None and lengths is None and tree is None and not prefill:
            mask = visible_mask(positions, cache.capacity)
        slots = positions if slots is None else slots
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        batch_index = torch.arange(batch, device=tokens.device)[:, None].expand(batch, length)
        if mask is not None:
            mask = fold_mask_for_gqa(mask, self.config.num_heads // self.config.num_kv_heads)
        prompt_lengths = None
        if prefill:
            full = torch.full((batch,), length, device=tokens.device)
            prompt_lengths = full if logit_index is None else logit_index + 1
        step = StepContext(
            positions, slots, batch_index, mask, lengths, prefill, prompt_lengths, tree
        )
        x = F.embedding(tokens, self.embed)
        fns = self.layer_fns
        if decode:
            fns = self.decode_fns if length == 1 else self.multi_fns
        for i in range(len(self.layers)) if layer_ids is None else layer_ids:
            x = decoder_layer(fns, x, self.layers[i], cos, sin, cache, i, step)
        if logit_index is not None:
            x = x[torch.arange(batch, device=x.device), logit_index]
        x = rms_norm(x, self.norm, self.config.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    @classmethod
    def from_hf_state_dict(
        cls,
        config: ModelConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> Transformer:
        """Build from HF-named tensors ("model.layers.0.self_attn.q_proj.weight", ...)."""

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            tensor = state.get(name)
            if tensor is None:
                if required:
                    raise ValueError(f"checkpoint is missing tensor {name!r}")
                return None
            return tensor.to(device=device, dtype=dtype)

        def cat(*names: str, required: bool = True) -> torch.Tensor | None:
            parts = [take(n, required) for n in names]
            return None if any(p is None for p in parts) else torch.cat(parts, dim=0).contiguous()

        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn = p + "self_attn."
            layers.append(
                LayerWeights(
                    attn_norm=take(p + "input_layernorm.weight"),
                    qkv=cat(attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                    qkv_bias=cat(
                        attn + "q_proj.bias",
                        attn + "k_proj.bias",
                        attn + "v_proj.bias",
                        required=config.attention_bias,
                    ),
                    q_norm=take(attn + "q_norm.weight", config.qk_norm),
                    k_norm=take(attn + "k_norm.weight", config.qk_norm),
                    o=take(attn + "o_proj.weight"),
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    gate_up=cat(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    down=take(p + "mlp.down_proj.weight"),
                )
            )
        embed = take("model.embed_tokens.weight")
        lm_head = take("lm_head.weight", required=False)  # absent when tied to the embedding
        return cls(
            config, embed, layers, take("model.norm.weight"), embed if lm_head is None else lm_head
        )
