"""Prompt lookup decoding (n-gram drafting): find the last n tokens earlier in the prompt +
output and propose the tokens that followed them (Saxena 2023, "Prompt Lookup Decoding";
the model-free baseline of SuffixDecoding and of vLLM's `ngram` method). Deterministic: no
draft distribution, so verification treats each proposal as q = one-hot."""

from __future__ import annotations

import numpy as np

from fastdecode.spec.tree import DraftTree


class NgramDrafter:
    """Match the last n tokens, n from `max_ngram` down to `min_ngram`; the longest n that
    matches wins. Among its matches the most recent one that has `max_nodes` following
    tokens is used (else the one with the most following tokens), proposed as a chain."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1) -> None:
        if min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(
                f"need 1 <= min_ngram <= max_ngram, got min_ngram={min_ngram}, "
                f"max_ngram={max_ngram}"
            )
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.reset()

    def propose(self, context: list[int], max_nodes: int) -> DraftTree:
        if max_nodes <= 0 or len(context) < self.min_ngram + 1:
            return DraftTree.empty()
        tokens = self._tokens(context)
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            # windows starting at 0 .. length - n - 1: each has at least one token after it
            windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
            starts = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if starts.size == 0:
                continue
            follow = length - (starts + n)  # tokens available after each match
            full = starts[follow >= max_nodes]
            start = int(full[-1]) if full.size else int(starts[0])
            begin = start + n
            return DraftTree.chain(context[begin : begin + max_nodes])
        return DraftTree.empty()

    def _tokens(self, context) -> np.ndarray:
        """The context as an array. The engine hands a view over the request's own prompt and
        output lists (`ContextView`), which only grow: then only the tokens added since the
        last call are converted (a long prompt converted on every step cost as much as the
        rest of the step). Anything else is converted whole."""
        parts = (getattr(context, "prompt", None), getattr(context, "output", None))
        length = len(context)
        if parts[0] is None:
            return np.asarray(list(context), dtype=np.int64)
        if parts[0] is not self._parts[0] or parts[1] is not self._parts[1] or length < self._have:
            self._array = np.asarray(list(context), dtype=np.int64)
        elif length > self._have:
            if length > len(self._array):
                grown = np.empty(max(length, 2 * len(self._array)), dtype=np.int64)
                grown[: self._have] = self._array[: self._have]
                self._array = grown
            self._array[self._have : length] = context[self._have : length]
        self._parts, self._have = parts, length
        return self._array[:length]

    def update(self, accepted: list[int]) -> None:
        pass

    def reset(self) -> None:
        self._array = np.empty(0, dtype=np.int64)
        self._have = 0
        self._parts: tuple = (None, None)  # the prompt and output lists the array mirrors
