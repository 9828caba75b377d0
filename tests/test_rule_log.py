"""`--rule-log`: the goodput rule's plans and timings reach the file."""

from __future__ import annotations

import logging

from fastdecode.bench.rule_log import enable_rule_log
from fastdecode.spec.length import GoodputLength


def test_rule_log_records_plans_and_timings(tmp_path):
    path = tmp_path / "rule.log"
    enable_rule_log(path)
    try:
        policy = GoodputLength()
        policy.record_plain(4, 0.005)
        policy.record_verify(4, 5, 0.015)
        policy.record_tokens(4, True, 10, 0.01)
        policy.choose_k([0.7] * 4, 4, batch=4)
    finally:
        log = logging.getLogger("fastdecode.goodput")
        for handler in list(log.handlers):
            handler.close()
            log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
    text = path.read_text()
    assert "plain step batch=4 5.000 ms" in text and "verify batch=4 width=5" in text
    assert "tokens batch=4 spec 10" in text and "plan batch=4 rows=4 alpha=0.700" in text
