"""Speculative decoding: draft trees, drafters and one lossless verification path."""

from __future__ import annotations

from fastdecode.spec.config import SpeculativeConfig
from fastdecode.spec.drafters import DRAFTERS, Drafter, make_drafter
from fastdecode.spec.tree import DraftTree, TreeBatch, pad_trees
from fastdecode.spec.verify import Verdict, verify_batch, verify_greedy, verify_sampling

__all__ = [
    "DRAFTERS",
    "DraftTree",
    "Drafter",
    "SpeculativeConfig",
    "TreeBatch",
    "Verdict",
    "make_drafter",
    "pad_trees",
    "verify_batch",
    "verify_greedy",
    "verify_sampling",
]
