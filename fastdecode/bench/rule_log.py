"""The benchmarks' `--rule-log FILE`: the goodput rule's plans and the timings it learned
from (`fastdecode.spec.length.RULE_LOG`, DEBUG lines), for reading why it speculated or not
in a GPU run."""

from __future__ import annotations

import logging
from pathlib import Path

from fastdecode.spec.length import RULE_LOG


def enable_rule_log(path: Path) -> None:
    """Write the rule's DEBUG lines to `path` (overwritten), each stamped with the ms since
    the process started."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(relativeCreated)d ms %(message)s"))
    RULE_LOG.addHandler(handler)
    RULE_LOG.setLevel(logging.DEBUG)
