"""The Drafter interface: every drafter proposes a DraftTree; verification never depends on
which drafter proposed it (see fastdecode.spec.verify).

Optional extensions (looked up with getattr by the speculative loop and SpeculativeConfig;
drafters without them behave as before):

- `configure(params: SamplingParams) -> None`: called once per request, after `reset`,
  with the request's sampling parameters (e.g. to draft deterministically under greedy, or
  to seed the drafter's own generator).
- `wants_target_probs = True` plus `observe(context, tokens, probs) -> None`: the loop then
  hands the drafter the target's next-token distributions at every emitted position
  (STAND): probs [len(tokens), V], probs[j] being the distribution after
  context + tokens[:j] that tokens[j] was emitted from -- filtered as the verifier samples
  (temperature / top-k / top-p), or plain softmax for greedy requests. Called before
  `update` with the same tokens. They are computed only for drafters that ask.
- a static `shared_state(**kwargs) -> dict` on the drafter class: SpeculativeConfig calls
  it once and passes its entries as keyword arguments to every drafter it makes (state
  shared across requests, e.g. SuffixDecoding's global tree).
"""

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
