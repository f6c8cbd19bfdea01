"""The JSON log format."""

from __future__ import annotations

import json
import logging

from shared_kernel.platform.logs import JsonFormatter


def test_json_log_lines_carry_extras() -> None:
    record = logging.LogRecord("svc", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.user_id = "u-1"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world"
    assert line["user_id"] == "u-1"
    assert line["level"] == "INFO"
