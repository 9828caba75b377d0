"""Per-request stop conditions and incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastdecode.params import SamplingParams


@dataclass
class RequestState:
    """Tokens and text produced so far for one request, and whether/why it finished."""

    params: SamplingParams
    eos_ids: frozenset[int]
    tokenizer: Any
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _emitted: int = 0  # characters of text already handed to a stream
    _text_final: bool = False  # text was cut at a stop string: never re-decode it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        """Append one token and update the finish state; call only while unfinished."""
        p = self.params
        if (not p.ignore_eos and token in self.eos_ids) or token in p.stop_token_ids:
            self.finish_reason = "stop"
            return
        self.token_ids.append(token)
        if p.stop or len(self.token_ids) >= p.max_tokens:
            self._refresh_text()
        for stop in p.stop:
            cut = self.text.find(stop)
            if cut >= 0:
                self.text = self.text[:cut]
                self._text_final = True
                self.finish_reason = "stop"
                return
        if len(self.token_ids) >= p.max_tokens:
            self.finish_reason = "length"

    def _refresh_text(self) -> None:
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def new_text(self) -> str:
        """Text produced since the last call, holding back a possibly partial character
        (and, while stop strings may still match, a tail that could begin one)."""
        if not self._text_final:
            self._refresh_text()
        text = self.text
        end = len(text)
        if not self.finished:
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for stop in self.params.stop:
                for k in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:k]):
                        end = min(end, len(text[:end]) - k)
                        break
        end = max(end, self._emitted)
        chunk = text[self._emitted : end]
        self._emitted = end
        return chunk

    def finalize(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "length"
        if not self._text_final:
            self._refresh_text()
