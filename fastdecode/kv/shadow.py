"""ShadowKV storage (Sun et al., "ShadowKV: KV Cache in Shadows for High-Throughput
Long-Context LLM Inference", 2024): low-rank pre-RoPE keys on the GPU, values on the CPU.

At prefill each layer keeps, per (row, KV head):
- the prompt's *pre-RoPE* keys as coordinates in their top-`rank` right singular vectors
  (coeff [P, r] and basis [D, r]: pre-RoPE keys are low-rank, post-RoPE ones are not). The
  keys arrive rotated (RoPE is applied in `attention_input`); RoPE is a rotation per
  position, so the cache un-rotates them itself and the model is unchanged;
- one landmark per chunk of `chunk_size` tokens (the mean post-RoPE key);
- in full, on the GPU: sink chunks, the prompt's last chunks (local window plus the tokens
  after the last whole chunk) and the outlier chunks, those whose keys are least like their
  landmark (lowest cosine similarity), which landmarks would misjudge;
- all values of the whole chunks on the CPU (pinned when the model is on CUDA).

A single-token decode step scores each KV head's chunks by q . landmark (max over its GQA
query group: one selection per KV head, shared by the group, K/V never repeated), takes the
top `budget / chunk_size`, rebuilds their keys (coeff @ basis^T, then RoPE at their
positions), fetches their values from the CPU (CUDA: gathered on the CPU into a pinned
staging buffer, copied non_blocking; CPU: indexed in place) and attends over resident +
selected + generated tokens (kept in full on the GPU) with `gathered_attention` (its Triton
kernel on CUDA). Multi-token steps (speculative verify, tree masks) attend over a full
reconstruction of every position instead: correct, but they read (and copy from the CPU)
everything.

Lossy unless rank = head_dim and the budget covers the prompt. The selection needs the
chosen chunk ids on the host, so a CUDA decode step syncs once per layer and is not
graph-captured (the paper hides this with a custom gather kernel; not done here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdecode.kv import gathered
from fastdecode.kv.attention import (
    cache_attention,
    fold_mask_for_gqa,
    prompt_attention,
    visible_mask,
)
from fastdecode.kv.cache import write_kv
from fastdecode.kv.policies.shadowkv import ShadowKVPolicy
from fastdecode.kv.step import StepContext
from fastdecode.model.rope import apply_rope


def unrotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys from post-RoPE ones: rotate by -position. Dividing by cos^2 + sin^2
    undoes RoPE variants that scale the table (and bf16 rounding of it)."""
    return apply_rope(k, cos, -sin) / (cos * cos + sin * sin)


def key_basis(pre: torch.Tensor, rank: int) -> torch.Tensor:
    """[..., P, D] -> [..., D, rank]: the top right singular vectors of each key matrix (the
    SVD's V), from the eigenvectors of the D x D Gram matrix, far cheaper than an SVD of the
    P x D matrix and the same subspace."""
    gram = (pre.mT @ pre).double()
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    return vectors[..., -rank:].flip(-1).float()


@dataclass
class ShadowLayer:
    """One layer's storage. n whole chunks of c tokens; R resident slots; T generated slots."""

    coeff: torch.Tensor  # [B, Hkv, n, c * r] pre-RoPE key coordinates, by chunk (GPU)
    basis: torch.Tensor  # [B, Hkv, D, r] (GPU)
    landmarks: torch.Tensor  # [B, Hkv, n, D] mean post-RoPE key per chunk (GPU)
    candidate: torch.Tensor  # [B, Hkv, n] bool: a whole chunk, not resident: selectable
    res_k: torch.Tensor  # [B, Hkv, R, D] sinks, outliers, local window, exact (GPU)
    res_v: torch.Tensor
    res_pos: torch.Tensor  # [B, Hkv, R] their positions, -1: empty
    tail_k: torch.Tensor  # [B, Hkv, T, D] generated tokens, slot s at s - prompt length (GPU)
    tail_v: torch.Tensor
    v_cpu: torch.Tensor  # [B, Hkv, n, c * D] values of the whole chunks (CPU)

    def gpu_tensors(self) -> list[torch.Tensor]:
        return [
            self.coeff, self.basis, self.landmarks, self.candidate, self.res_k, self.res_v,
            self.res_pos, self.tail_k, self.tail_v,
        ]  # fmt: skip


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ShadowKVCache:
    graph_safe = False  # the chosen chunks' values come from the host each step
    dense_reads = False  # decode steps read a subset: no fused dense decode kernel

    def __init__(
        self,
        policy: ShadowKVPolicy,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self.policy = policy
        if policy.rank is not None:
            policy.resolve_rank(head_dim, capacity)  # a bad rank fails before any work
        self.rank = 0  # per prompt: set at prefill
        self.chunk = policy.chunk_size
        self.num_layers, self.batch, self.capacity = num_layers, batch, capacity
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.cos, self.sin = rope  # [max_position, D]: the model's own tables
        self.layers: list[ShadowLayer | None] = [None] * num_layers
        self.base: torch.Tensor | None = None  # [B] prompt lengths: where generated slots start
        self.offload = self.device.type != "cpu"  # values really leave the device
        self._staging: torch.Tensor | None = None  # pinned, for the CPU gather (CUDA)
        self._copied: torch.cuda.Event | None = None

    @classmethod
    def for_model(cls, policy: ShadowKVPolicy, model, batch: int, capacity: int):
        cfg = model.config
        return cls(
            policy, cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim,
            model.dtype, model.device, (model.cos, model.sin),
        )  # fmt: skip

    # -- memory: what the device holds vs what was offloaded --
    def nbytes_gpu(self) -> int:
        """Bytes on the model's device (the GPU tier; on a CPU run, what would be on it)."""
        return _nbytes([t for layer in self.layers if layer for t in layer.gpu_tensors()])

    def nbytes_cpu(self) -> int:
        """Bytes offloaded to host memory (values, staging buffer)."""
        staging = [self._staging] if self._staging is not None else []
        return _nbytes([layer.v_cpu for layer in self.layers if layer] + staging)

    def nbytes(self) -> int:
        return self.nbytes_gpu()

    # -- the one method every cache implements --
    def store_and_attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepContext
    ) -> torch.Tensor:
        if step.prefill:
            self.layers[layer] = self._compress(k, v, step)
            return prompt_attention(q, k, v)
        state = self.layers[layer]
        if state is None:
            raise RuntimeError("ShadowKVCache: decode before prefill (rows must start empty)")
        generated = step.slots - self.base[:, None]  # slot s of row b: tail index s - base[b]
        write_kv(state.tail_k, state.tail_v, k, v, step.batch_index, generated)
        if q.shape[2] == 1 and step.mask is None:
            return self._sparse_attend(state, q, step.positions[:, 0])
        return self._dense_attend(state, q, step)

    def move(self, batch_index: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy generated slots src -> dst (same row) in every layer: speculative compaction."""
        src, dst = src - self.base[batch_index], dst - self.base[batch_index]
        for state in self.layers:
            for tail in (state.tail_k, state.tail_v):
                rows = tail.permute(0, 2, 1, 3)
                rows[batch_index, dst] = rows[batch_index, src]

    # -- prefill: factor the keys, pick the resident chunks, offload the values --
    def _compress(self, k: torch.Tensor, v: torch.Tensor, step: StepContext) -> ShadowLayer:
        policy, c = self.policy, self.chunk
        batch, heads, width, dim = k.shape
        self.rank = r = policy.resolve_rank(dim, width)
        lengths = step.prompt_lengths
        self.base = lengths
        n = width // c  # whole chunks of the padded width; row b has lengths[b] // c of them
        real = torch.arange(width, device=k.device)[None, :] < lengths[:, None]  # [B, W]
        cos = self.cos[step.positions].unsqueeze(1).float()
        sin = self.sin[step.positions].unsqueeze(1).float()
        pre = unrotate(k.float(), cos, sin).masked_fill(~real[:, None, :, None], 0.0)
        basis = key_basis(pre, r)  # [B, Hkv, D, r]
        coeff = (pre[:, :, : n * c] @ basis).reshape(batch, heads, n, c * r)

        chunks = k[:, :, : n * c].float().view(batch, heads, n, c, dim)
        landmarks = chunks.mean(3)
        similarity = F.cosine_similarity(chunks, landmarks[:, :, :, None], dim=-1).amin(-1)
        chunk_id = torch.arange(n, device=k.device)[None, :]
        whole = lengths[:, None] // c  # [B, 1]
        exists = chunk_id < whole  # [B, n]
        fixed = (chunk_id < policy.sink_chunks) | (chunk_id >= whole - policy.local_chunks)
        rest = (exists & ~fixed)[:, None].expand(-1, heads, -1)  # [B, Hkv, n]
        outlier = torch.zeros_like(rest)
        count = min(policy.outlier_chunks, n)
        if count:
            score = similarity.masked_fill(~rest, float("inf"))  # lowest similarity first
            worst = score.topk(count, dim=-1, largest=False)
            outlier.scatter_(-1, worst.indices, worst.values.isfinite())
        resident_chunk = (fixed & exists)[:, None] | outlier
        resident = torch.zeros(batch, heads, width, dtype=torch.bool, device=k.device)
        resident[:, :, : n * c] = resident_chunk.repeat_interleave(c, dim=-1)
        after_chunks = torch.arange(width, device=k.device)[None, :] >= whole * c
        resident |= (after_chunks & real)[:, None]

        size = int(resident.sum(-1).max())
        order = torch.sort((~resident).to(torch.int8), dim=-1, stable=True).indices[..., :size]
        res_pos = torch.where(resident.gather(-1, order), order, -1)
        gather = order[..., None].expand(-1, -1, -1, dim)
        tail = self.capacity - int(lengths.min())
        tail_shape = (batch, heads, tail, dim)
        v_cpu = torch.empty(
            (batch, heads, n, c * dim), dtype=v.dtype, pin_memory=self.device.type == "cuda"
        )
        v_cpu.copy_(v[:, :, : n * c].reshape(batch, heads, n, c * dim), non_blocking=True)
        return ShadowLayer(
            coeff=coeff.to(k.dtype),
            basis=basis.to(k.dtype),
            landmarks=landmarks.to(k.dtype),
            candidate=exists[:, None] & ~resident_chunk,
            res_k=k.gather(2, gather),
            res_v=v.gather(2, gather),
            res_pos=res_pos,
            tail_k=torch.zeros(tail_shape, dtype=k.dtype, device=k.device),
            tail_v=torch.zeros(tail_shape, dtype=k.dtype, device=k.device),
            v_cpu=v_cpu,
        )

    # -- decode: top-k chunks by landmark, rebuilt on the fly --
    def _sparse_attend(
        self, state: ShadowLayer, q: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        batch, num_heads, _, dim = q.shape
        heads = self.num_kv_heads
        keys, values, valid = [state.res_k], [state.res_v], [state.res_pos >= 0]
        n = state.landmarks.shape[2]
        count = min(self.policy.select_chunks, n)
        if count:
            group_q = q.reshape(batch, heads, num_heads // heads, dim)
            scores = (group_q @ state.landmarks.mT).amax(2).float()  # [B, Hkv, n]
            best = scores.masked_fill(~state.candidate, float("-inf")).topk(count, dim=-1)
            keys.append(self._rebuild_keys(state, best.indices))
            values.append(self._fetch_values(state, best.indices))
            valid.append(best.values.isfinite().repeat_interleave(self.chunk, dim=-1))
        generated = torch.arange(state.tail_k.shape[2], device=q.device)
        seen = generated[None, :] <= (positions - self.base)[:, None]  # [B, T]
        keys.append(state.tail_k)
        values.append(state.tail_v)
        valid.append(seen[:, None].expand(-1, heads, -1))
        valid = torch.cat(valid, dim=-1)
        indices = torch.where(valid, torch.arange(valid.shape[-1], device=q.device), -1)
        return gathered.gathered_attention(
            q, torch.cat(keys, dim=2), torch.cat(values, dim=2), indices
        )

    def _rebuild_keys(self, state: ShadowLayer, chunks: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys [B, Hkv, k * c, D] of chunks [B, Hkv, k]: coeff @ basis^T, rotated."""
        batch, heads, count = chunks.shape
        c, r = self.chunk, state.basis.shape[-1]
        coeff = state.coeff.gather(2, chunks[..., None].expand(-1, -1, -1, c * r))
        pre = coeff.view(batch, heads, count * c, r) @ state.basis.mT
        positions = (chunks[..., None] * c + torch.arange(c, device=chunks.device)).flatten(2)
        return apply_rope(pre, self.cos[positions], self.sin[positions])

    def _fetch_values(self, state: ShadowLayer, chunks: torch.Tensor) -> torch.Tensor:
        """Values [B, Hkv, k * c, D] of chunks [B, Hkv, k] from the CPU copy."""
        batch, heads, count = chunks.shape
        row = state.v_cpu.shape[-1]
        if not self.offload:  # a CPU run: the values are already here, just index
            out = state.v_cpu.gather(2, chunks[..., None].expand(-1, -1, -1, row))
            return out.view(batch, heads, count * self.chunk, self.head_dim)
        index = chunks.cpu()  # the host needs the selection: one sync per layer
        numel = batch * heads * count * row
        if self._staging is None or self._staging.numel() < numel:
            self._staging = torch.empty(numel, dtype=state.v_cpu.dtype, pin_memory=True)
            self._copied = torch.cuda.Event()
        else:
            self._copied.synchronize()  # the previous copy out of the staging buffer is done
        staging = self._staging[:numel].view(batch, heads, count, row)
        torch.gather(state.v_cpu, 2, index[..., None].expand(-1, -1, -1, row), out=staging)
        out = staging.to(self.device, non_blocking=True)
        self._copied.record()
        return out.view(batch, heads, count * self.chunk, self.head_dim)

    # -- multi-token steps: every position, rebuilt --
    def _dense_attend(self, state: ShadowLayer, q: torch.Tensor, step: StepContext):
        """Attention over a full reconstruction laid out like the dense cache (slot = position),
        so a verify step's tree mask applies unchanged."""
        batch, heads, n, _ = state.landmarks.shape
        c, dim, device = self.chunk, self.head_dim, q.device
        tail = state.tail_k.shape[2]
        width = int(self.base.max()) + tail + 1  # the last column absorbs empty resident slots
        k_full = torch.zeros(batch, heads, width, dim, dtype=q.dtype, device=device)
        v_full = torch.zeros_like(k_full)
        chunks = torch.arange(n, device=device).expand(batch, heads, n)
        if n:
            k_full[:, :, : n * c] = self._rebuild_keys(state, chunks)
            v_full[:, :, : n * c] = state.v_cpu.to(device).view(batch, heads, n * c, dim)
        res = torch.where(state.res_pos >= 0, state.res_pos, width - 1)[..., None]
        k_full.scatter_(2, res.expand(-1, -1, -1, dim), state.res_k)
        v_full.scatter_(2, res.expand(-1, -1, -1, dim), state.res_v)
        slots = self.base[:, None] + torch.arange(tail, device=device)  # [B, T]
        rows = torch.arange(batch, device=device)[:, None].expand_as(slots)
        write_kv(k_full, v_full, state.tail_k, state.tail_v, rows, slots)
        mask = step.mask
        if mask is None:
            group = q.shape[1] // heads
            mask = fold_mask_for_gqa(visible_mask(step.positions, self.capacity), group)
        width = mask.shape[-1]
        return cache_attention(q, k_full[:, :, :width], v_full[:, :, :width], mask)
