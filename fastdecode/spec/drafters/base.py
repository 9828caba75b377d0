"""The Drafter interface: every drafter proposes a DraftTree; verification never depends on
which drafter proposed it (see fastdecode.spec.verify)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from fastdecode.spec.tree import DraftTree


@runtime_checkable
class Drafter(Protocol):
    """One instance per request (a drafter may keep per-request state)."""

    def propose(self, context: list[int], max_nodes: int) -> DraftTree:
        """A tree of at most `max_nodes` nodes continuing `context` (prompt + output so far,
        ending with the last accepted token, the tree's root). May be empty."""
        ...

    def update(self, accepted: list[int]) -> None:
        """The tokens the last verify step emitted (accepted drafts + the target's token)."""
        ...

    def reset(self) -> None:
        """Forget per-request state (a new request begins)."""
        ...
