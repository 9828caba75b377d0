"""Drafter registry: `make_drafter(name, **kwargs)` builds one drafter (one per request)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from fastdecode.spec.drafters.base import Drafter
from fastdecode.spec.drafters.ngram import NgramDrafter
from fastdecode.spec.drafters.stand import StandDrafter
from fastdecode.spec.drafters.suffix import SuffixDrafter, SuffixTree

DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "ngram": NgramDrafter,
    "suffix": SuffixDrafter,
    "stand": StandDrafter,
}


def make_drafter(name: str, **kwargs) -> Drafter:
    """A new drafter of kind `name` (see DRAFTERS); unknown names and arguments the drafter
    does not take raise ValueError."""
    if name not in DRAFTERS:
        known = ", ".join(sorted(DRAFTERS))
        raise ValueError(f"unknown drafter {name!r}; known drafters: {known}")
    factory = DRAFTERS[name]
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no introspectable signature: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            takes = ", ".join(p for p in signature.parameters if p not in ("args", "kwargs"))
            raise ValueError(
                f"bad arguments for drafter {name!r}: {exc}; it takes: {takes or 'nothing'}"
            ) from None
    return factory(**kwargs)


__all__ = [
    "DRAFTERS",
    "Drafter",
    "NgramDrafter",
    "StandDrafter",
    "SuffixDrafter",
    "SuffixTree",
    "make_drafter",
]
