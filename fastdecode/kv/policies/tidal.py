"""TidalDecode (Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position
Persistent Sparse Attention"): a few *token selection layers* attend fully and pick the K
positions with the highest attention; every later layer attends only to the positions its
most recent selection layer picked (the selection persists across layers within a step,
so it is computed twice per step, not once per layer). Layers before the first selection
layer attend fully.

Default selection layers: [2, num_layers // 2] (the paper's choice: full attention in
layers 0-1, selection at layer 2, one re-selection in the middle, e.g. 2 and 12 for a
24-layer model), clipped to the model (a 2-layer model selects at layer 1, so it reads
everything). For GQA a position's score is the attention its KV head's query group gives
it (the softmax weights summed over the group); positions are chosen per KV head.
"""

from __future__ import annotations

import torch

from fastdecode.kv.policies.base import ReadPolicy, top_slots


def default_selection_layers(num_layers: int) -> list[int]:
    first = min(2, num_layers - 1)
    middle = num_layers // 2
    return [first, middle] if middle > first else [first]


class TidalPolicy(ReadPolicy):
    name = "tidal"

    def __init__(self, budget: int, selection_layers: list[int] | None = None) -> None:
        super().__init__(budget)
        self.selection_layers = None if selection_layers is None else list(selection_layers)

    def setup(self, cache) -> None:
        layers = self.selection_layers
        if layers is None:
            layers = default_selection_layers(cache.num_layers)
        if not layers or any(not 0 <= i < cache.num_layers for i in layers):
            raise ValueError(
                f"tidal selection_layers must be a non-empty list of layer indices in "
                f"[0, {cache.num_layers}), got {layers}"
            )
        batch, num_kv_heads = cache.k[0].shape[:2]
        device = cache.k[0].device
        cache.state["selection_layers"] = tuple(sorted(set(layers)))
        # the step's selection: written by a selection layer, read by the layers after it
        cache.state["selection"] = torch.full(
            (batch, num_kv_heads, cache.read_size), -1, dtype=torch.long, device=device
        )

    def decode_reads_qk(self, layer, cache) -> bool:
        return False  # later layers reuse a selection; selection layers get weights instead

    def wants_scores(self, layer, cache):
        return layer in cache.state["selection_layers"]

    def select(self, layer, cache, q, visible):
        layers = cache.state["selection_layers"]
        if layer < layers[0] or layer in layers:
            return None  # full attention (a selection layer also observes its weights)
        return cache.state["selection"]

    def observe_weights(self, layer, cache, weights, visible):
        chosen = top_slots(weights, visible, cache.read_size)
        cache.state["selection"].copy_(chosen)
