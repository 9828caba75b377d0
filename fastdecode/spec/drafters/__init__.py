"""Drafter registry: `make_drafter(name, **kwargs)` builds one drafter (one per request)."""

from __future__ import annotations

from collections.abc import Callable

from fastdecode.spec.drafters.base import Drafter
from fastdecode.spec.drafters.ngram import NgramDrafter

DRAFTERS: dict[str, Callable[..., Drafter]] = {
    "ngram": NgramDrafter,
}


def make_drafter(name: str, **kwargs) -> Drafter:
    """A new drafter of kind `name` (see DRAFTERS); unknown names raise ValueError."""
    if name not in DRAFTERS:
        known = ", ".join(sorted(DRAFTERS))
        raise ValueError(f"unknown drafter {name!r}; known drafters: {known}")
    return DRAFTERS[name](**kwargs)


__all__ = ["DRAFTERS", "Drafter", "NgramDrafter", "make_drafter"]
