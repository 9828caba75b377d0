"""SuffixDecoding (Oliaro et al. 2024, "SuffixDecoding: Extreme Speculative Decoding for
Emerging AI Applications"; the `suffix` method of ArcticInference / vLLM): model-free
drafting from suffix trees over this request's prompt + output and over earlier requests'
outputs (the global tree), proposing a *tree* of likely continuations whose size follows the
length of the match.

The suffix structure is a depth-bounded suffix trie: every substring of at most `max_depth`
tokens of the indexed sequences is a path from the root, and each node counts the positions
where its substring ends. Appending a token extends the (at most `max_depth`) suffixes that
end at the previous token, so indexing costs O(max_depth) per token and the node count is at
most `max_depth` per indexed token (fewer on repetitive text, where substrings recur).

Proposal (per tree, local and global; the one with the higher score wins):

1. match: the longest suffix u of the context, |u| <= `max_match`, that occurs in the tree
   followed by at least one token (binary search: if u occurs with a continuation, so does
   every suffix of u);
2. frequencies: a child c of a node v has probability count(v c) / sum of v's children's
   counts, i.e. the empirical frequency of the continuation among the occurrences of the
   match that have one (the context's own, last occurrence has none, so it does not dilute);
3. speculation length (the paper's adaptive MAX_SPEC = alpha * p, p the match length):
   budget = min(max_nodes, floor(spec_factor * p + spec_offset)) nodes;
4. tree: grown greedily by path probability (the product of the frequencies from the match
   down to the node), best first, under the budget, dropping nodes whose path probability is
   below `min_token_prob`; score = the sum of the nodes' path probabilities (the expected
   number of accepted tokens if frequencies were acceptance rates).

Constants (defaults): max_depth 32 and max_match 16 (= max_depth // 2), so a match always
leaves >= 16 levels to speculate; spec_factor 2.0 and spec_offset 1.0 (ArcticInference uses
factor 1.0, offset 0; the paper's alpha ranges over 1-4: a 1-token match speculates up to 3
nodes, a 4-token match up to 9); min_token_prob 0.1 (ArcticInference's default).

Proposals are deterministic (q = None): verification treats them as one-hot proposals, so
speculative sampling stays lossless.

Sharing: every drafter made by one SpeculativeConfig (one per request) gets the same global
tree (`SpeculativeConfig` calls `SuffixDrafter.shared_state` once), so reuse one config -- or
set it on the LLM -- to carry outputs across `generate` calls. Each request's output is
added to it as it is generated. The global tree assumes one tokenizer; it is cleared when it
grows past `max_global_nodes`.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Sequence

from fastdecode.spec.drafters.prompt_backlog import PromptBacklog
from fastdecode.spec.tree import DraftTree


class SuffixTree:
    """A depth-bounded suffix trie with occurrence counts over several token sequences.

    Node 0 is the root. `counts[v]`: the number of positions where v's substring ends (over
    all indexed sequences). Sequences are indexed incrementally: `new_sequence()` gives an id,
    `extend(id, tokens)` appends tokens to it.
    """

    def __init__(self, max_depth: int = 32) -> None:
        if not isinstance(max_depth, int) or max_depth < 2:
            raise ValueError(f"max_depth must be an integer >= 2, got {max_depth!r}")
        self.max_depth = max_depth
        self._next_id = itertools.count()
        self.clear()

    def clear(self) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.counts: list[int] = [0]
        self.depth: list[int] = [0]
        # per sequence: the nodes of the suffixes (of length 1 .. max_depth - 1) ending at
        # its last token, i.e. the nodes the next token extends
        self._active: dict[int, list[int]] = {}

    def __len__(self) -> int:
        """Number of nodes, the root included."""
        return len(self.counts)

    def new_sequence(self) -> int:
        seq = next(self._next_id)
        self._active[seq] = []
        return seq

    def add(self, tokens: Sequence[int]) -> int:
        """Index a whole new sequence; returns its id."""
        seq = self.new_sequence()
        self.extend(seq, tokens)
        return seq

    def extend(self, seq: int, tokens: Sequence[int]) -> None:
        """Append tokens to sequence `seq` (an unknown id starts a new sequence)."""
        active = self._active.get(seq, [])
        children, counts, depth = self.children, self.counts, self.depth
        last_level = self.max_depth
        for token in tokens:
            token = int(token)
            extended = []
            for node in (0, *active):
                kids = children[node]
                child = kids.get(token)
                if child is None:
                    child = len(counts)
                    kids[token] = child
                    children.append({})
                    counts.append(0)
                    depth.append(depth[node] + 1)
                counts[child] += 1
                if depth[child] < last_level:
                    extended.append(child)
            active = extended
        self._active[seq] = active

    def find(self, tokens: Sequence[int]) -> int | None:
        """The node of substring `tokens`, or None if it does not occur."""
        node = 0
        children = self.children
        for token in tokens:
            node = children[node].get(token)
            if node is None:
                return None
        return node

    def continuation_total(self, node: int) -> int:
        """Occurrences of the node's substring that are followed by a token."""
        counts = self.counts
        return sum(counts[c] for c in self.children[node].values())

    def frequencies(self, node: int) -> dict[int, float]:
        """token -> empirical probability that it follows the node's substring."""
        total = self.continuation_total(node)
        counts = self.counts
        return {t: counts[c] / total for t, c in self.children[node].items()} if total else {}

    def match(self, context: Sequence[int], max_match: int) -> tuple[int, int]:
        """(node, length): the longest suffix of `context` of at most `max_match` tokens that
        occurs followed by a token; (0, 0) if none does (not even a single token)."""
        high = min(max_match, len(context), self.max_depth - 1)
        best_node, best_len, low = 0, 0, 1
        while low <= high:  # monotone: a suffix of a continued match is a continued match
            mid = (low + high) // 2
            node = self.find(context[len(context) - mid :])
            if node is not None and self.children[node]:
                best_node, best_len, low = node, mid, mid + 1
            else:
                high = mid - 1
        return best_node, best_len

    def speculate(
        self, node: int, budget: int, min_prob: float
    ) -> tuple[list[int], list[int], list[float]]:
        """The best-first tree below `node`: (tokens, parents, path probabilities), at most
        `budget` nodes, each with path probability >= min_prob; parents before children."""
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        tie = itertools.count()
        heap: list[tuple[float, int, int, int, int]] = []

        def push(trie_node: int, parent: int, prob: float) -> None:
            kids = self.children[trie_node]
            total = self.continuation_total(trie_node)
            for token, child in kids.items():
                path = prob * self.counts[child] / total
                if path >= min_prob:
                    heapq.heappush(heap, (-path, next(tie), token, child, parent))

        push(node, -1, 1.0)
        while heap and len(tokens) < budget:
            neg, _, token, trie_node, parent = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            probs.append(-neg)
            push(trie_node, len(tokens) - 1, -neg)
        return tokens, parents, probs


class SuffixDrafter(PromptBacklog):
    """SuffixDecoding: see the module docstring for the algorithm and its constants.

    max_depth: depth of the suffix tries; max_match: longest suffix of the context matched
    (<= max_depth - 1; default max_depth // 2); spec_factor, spec_offset: the adaptive
    speculation length floor(spec_factor * match_length + spec_offset); min_token_prob:
    smallest path probability of a proposed node; use_global: also draft from the global
    tree of earlier (and concurrent) requests' outputs; global_tree: that tree (normally
    given by SpeculativeConfig; None: a private one); max_global_nodes: clear the global tree
    when it grows past this many nodes.
    """

    def __init__(
        self,
        max_depth: int = 32,
        max_match: int | None = None,
        spec_factor: float = 2.0,
        spec_offset: float = 1.0,
        min_token_prob: float = 0.1,
        use_global: bool = True,
        global_tree: SuffixTree | None = None,
        max_global_nodes: int = 4_000_000,
    ) -> None:
        if not isinstance(max_depth, int) or max_depth < 2:
            raise ValueError(f"max_depth must be an integer >= 2, got {max_depth!r}")
        max_match = max_depth // 2 if max_match is None else max_match
        if not isinstance(max_match, int) or not 1 <= max_match < max_depth:
            raise ValueError(
                f"max_match must be an integer in [1, max_depth - 1 = {max_depth - 1}], "
                f"got {max_match!r}"
            )
        if spec_factor < 0 or spec_offset < 0:
            raise ValueError(
                f"spec_factor and spec_offset must be >= 0, got {spec_factor}, {spec_offset}"
            )
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        if global_tree is not None and global_tree.max_depth != max_depth:
            raise ValueError(
                f"global_tree has max_depth {global_tree.max_depth}, the drafter {max_depth}"
            )
        if max_global_nodes < 1:
            raise ValueError(f"max_global_nodes must be >= 1, got {max_global_nodes}")
        self.max_depth = max_depth
        self.max_match = max_match
        self.spec_factor = float(spec_factor)
        self.spec_offset = float(spec_offset)
        self.min_token_prob = float(min_token_prob)
        self.use_global = bool(use_global)
        self.global_tree = global_tree if global_tree is not None else SuffixTree(max_depth)
        self.max_global_nodes = max_global_nodes
        self.reset()

    @staticmethod
    def shared_state(max_depth: int = 32, **_: object) -> dict[str, object]:
        """What all drafters of one SpeculativeConfig share: the global suffix tree."""
        return {"global_tree": SuffixTree(max_depth)}

    def reset(self) -> None:
        self.local = SuffixTree(self.max_depth)
        self._local_seq = self.local.new_sequence()
        self._indexed = 0  # context tokens already in the local tree
        self._reset_backlog()
        self._backlog_seq = self.local.new_sequence()
        self._global_seq: int | None = None
        self.index_s = 0.0  # of the last propose: indexing new context, not drafting

    def update(self, accepted: list[int]) -> None:
        """Add the emitted tokens to the global tree (this request's output so far)."""
        if not self.use_global or not accepted:
            return
        if len(self.global_tree) > self.max_global_nodes:
            self.global_tree.clear()
        if self._global_seq is None:
            self._global_seq = self.global_tree.new_sequence()
        self.global_tree.extend(self._global_seq, accepted)

    def budget(self, match_length: int, max_nodes: int) -> int:
        """The adaptive speculation length for a match of `match_length` tokens."""
        return min(max_nodes, int(self.spec_factor * match_length + self.spec_offset))

    def _speculate(self, tree: SuffixTree, context: list[int], max_nodes: int):
        node, length = tree.match(context, self.max_match)
        if length == 0:
            return 0.0, [], []
        tokens, parents, probs = tree.speculate(
            node, self.budget(length, max_nodes), self.min_token_prob
        )
        return sum(probs), tokens, parents

    def _index_backlog(self, lo: int, hi: int) -> None:
        self.local.extend(self._backlog_seq, self._backlog[lo:hi])

    def propose(self, context: list[int], max_nodes: int) -> DraftTree:
        start = time.perf_counter()
        if len(context) < self._indexed:  # a new context without reset: start over
            self.reset()
        if self._indexed == 0:  # the older part: its own sequence, indexed in idle time
            self._indexed = self._defer(context)
        self.local.extend(self._local_seq, context[self._indexed :])
        self._indexed = len(context)
        self.index_s = time.perf_counter() - start  # not drafting: the goodput rule skips it
        if max_nodes <= 0:
            return DraftTree.empty()
        best = self._speculate(self.local, context, max_nodes)
        if self.use_global and len(self.global_tree) > 1:
            other = self._speculate(self.global_tree, context, max_nodes)
            if other[0] > best[0]:
                best = other
        _, tokens, parents = best
        return DraftTree(tokens, parents) if tokens else DraftTree.empty()
