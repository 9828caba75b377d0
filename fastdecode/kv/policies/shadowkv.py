"""ShadowKV (Sun et al., "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM
Inference", 2024): the options of the `shadowkv` policy. The cache does the work
(`fastdecode.kv.shadow.ShadowKVCache`, storage "shadow").

The prompt's keys are kept as a rank-`rank` projection of the *pre-RoPE* keys (pre-RoPE keys
are low-rank, post-RoPE ones are not), its values go to CPU memory, and each decode step
reads `budget` tokens of it: the chunks (of `chunk_size` tokens) whose landmark (mean
post-RoPE key) best matches the query, reconstructed on the fly. Sinks (`sink_chunks`), the
prompt's last `local_chunks` chunks, the `outlier_chunks` chunks least like their landmark
and every generated token stay on the GPU in full and are always read.

LOSSY: low-rank keys and top-k chunks approximate attention. It is exact only with
rank = head_dim and a budget that covers the prompt; the default rank (None) is
head_dim // 4, or head_dim when the budget covers the prompt (nothing is sparse then).
"""

from __future__ import annotations

from fastdecode.kv.policies.base import KVPolicy


class ShadowKVPolicy(KVPolicy):
    name = "shadowkv"
    storage = "shadow"  # runner builds a ShadowKVCache

    def __init__(
        self,
        budget: int,
        rank: int | None = None,
        chunk_size: int = 8,
        outlier_chunks: int = 48,
        sink_chunks: int = 1,
        local_chunks: int = 4,
    ) -> None:
        super().__init__(budget)
        if rank is not None and rank < 1:
            raise ValueError(f"shadowkv rank must be >= 1 (or None: head_dim // 4), got {rank}")
        if chunk_size < 1:
            raise ValueError(f"shadowkv chunk_size must be >= 1, got {chunk_size}")
        for name, value in (
            ("outlier_chunks", outlier_chunks),
            ("sink_chunks", sink_chunks),
            ("local_chunks", local_chunks),
        ):
            if value < 0:
                raise ValueError(f"shadowkv {name} must be >= 0, got {value}")
        self.rank = rank
        self.chunk_size = chunk_size
        self.outlier_chunks = outlier_chunks
        self.sink_chunks = sink_chunks
        self.local_chunks = local_chunks

    @property
    def select_chunks(self) -> int:
        """Chunks a decode step reconstructs per (row, KV head): the budget in whole chunks."""
        return -(-self.budget // self.chunk_size)

    def resolve_rank(self, head_dim: int, prompt_width: int) -> int:
        """The key rank for a prompt of `prompt_width` tokens. Default (rank=None):
        head_dim // 4, but head_dim (exact keys) when the budget reads every prompt chunk
        anyway: with nothing sparse there is nothing to approximate, so a budget that covers
        the context reproduces full attention, as for every policy."""
        if self.rank is None:
            covered = self.select_chunks * self.chunk_size >= prompt_width
            return head_dim if covered else max(1, head_dim // 4)
        if self.rank > head_dim:
            raise ValueError(
                f"shadowkv rank {self.rank} exceeds the model's head_dim {head_dim}; "
                f"use 1..{head_dim} (head_dim keeps the keys exactly)"
            )
        return self.rank
