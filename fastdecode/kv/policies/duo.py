"""DuoAttention (Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads", ICLR 2025): only a fraction of heads (retrieval heads) need
the whole context; the others (streaming heads) attend to a few sinks plus recent tokens.
Which is which is found once per model (`fastdecode calibrate-duo`) and saved to a file
(fastdecode.kv.duo_heads) that this policy loads.

Budget: the slots of a streaming head (`sinks` plus `budget - sinks` recent positions);
retrieval heads keep the whole context. The memory saved is real: a layer's heads are
stored in two groups at their own capacities (fastdecode.kv.headsplit). With a budget >=
the context no head is restricted, so the file is not needed and the output is full
attention. Prefill attends fully (as every budgeted cache here does); only what is kept
for decoding differs by head.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastdecode.kv.duo_heads import default_path, load_calibration
from fastdecode.kv.headsplit import HeadGroup, HeadSplitKVCache
from fastdecode.kv.policies.base import KVPolicy
from fastdecode.kv.policies.streaming import StreamingPolicy

if TYPE_CHECKING:
    from fastdecode.model.transformer import Transformer


class DuoPolicy(KVPolicy):
    name = "duo"
    storage = "heads"  # per-KV-head capacities: `new_cache` lays the cache out

    def __init__(self, budget: int, heads: str | Path | None = None, sinks: int = 4) -> None:
        super().__init__(budget)
        self.heads = None if heads is None else Path(heads)  # None: duo_heads.default_path
        self.sinks = min(sinks, budget)

    def new_cache(
        self, model: Transformer, batch: int, prompt_len: int, max_new: int
    ) -> HeadSplitKVCache:
        cfg = model.config
        context = prompt_len + max_new
        everything = list(range(cfg.num_kv_heads))
        if self.budget >= context:  # streaming heads would keep everything too
            layers = [[HeadGroup(everything, KVPolicy(context), context)]] * cfg.num_layers
        else:
            calibration = load_calibration(self.heads or default_path(model), model)
            stream = StreamingPolicy(self.budget, self.sinks)
            layers = []
            for flags in calibration.retrieval:
                retrieval = [h for h in everything if flags[h]]
                streaming = [h for h in everything if not flags[h]]
                layers.append(
                    [
                        HeadGroup(retrieval, KVPolicy(context), context),
                        HeadGroup(streaming, stream, self.budget),
                    ]
                )
        return HeadSplitKVCache(
            layers, batch, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device
        )
