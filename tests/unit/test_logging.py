"""Structured logs (shared/logging.py): one JSON object per line, the same line whether
it comes straight from the project's logger or through stdlib logging."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from decimal import Decimal
from io import StringIO
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from shared.logging import configure_logging, get_logger, utc_stamp


def test_logs_are_one_json_object_per_line() -> None:
    stream = StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("regime", "DEBUG", stream=stream)
    try:
        log = get_logger("regime")
        log.info("regime_changed", symbol="BTC-USDT", price=Decimal("1.10"), ids=("a", 1))
        logging.getLogger("aiokafka").warning("third party %s", "x", extra={"topic": "t"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("step_failed", step=3)
        log.debug("detail", raw=b"\x01\xff")
        root.setLevel("INFO")
        log.debug("not_written")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["service"] == "regime" and lines[0]["event"] == "regime_changed"
    assert lines[0]["price"] == "1.10" and lines[0]["level"] == "info"
    assert lines[0]["ids"] == ["a", 1] and lines[0]["logger"] == "smartlev.regime"
    assert lines[1]["event"] == "third party x" and lines[1]["logger"] == "aiokafka"
    assert lines[1]["topic"] == "t" and lines[1]["level"] == "warning"
    assert lines[2]["event"] == "step_failed" and lines[2]["level"] == "error"
    assert lines[2]["step"] == 3 and "ValueError: boom" in lines[2]["exc"]
    assert lines[3] == {**lines[3], "event": "detail", "level": "debug", "raw": "01ff"}
    assert len(lines) == 4


def test_project_lines_skip_stdlib_records_and_read_the_same() -> None:
    """While the JSON handler is the only one on the root logger, the project's lines are
    written without a LogRecord (the gateway's per-order line cost ~10% of an order);
    once another handler listens (pytest's caplog, say) they go through stdlib logging.
    Either way the line is the same."""
    stream = StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogRecordFactory())
    made: list[str] = []
    stdlib_factory = logging.getLogRecordFactory()

    def counting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = stdlib_factory(*args, **kwargs)
        made.append(record.name)
        return record

    def emit_lines() -> None:
        log = get_logger("gateway", "orders")
        log.info("position_opened", user="alice", units=Decimal("1.50"), raw=b"\x02")
        try:
            raise KeyError("gone")
        except KeyError:
            log.exception("settle_failed", level="not the level")

    configure_logging("gateway", "INFO", stream=stream)
    logging.setLogRecordFactory(counting_factory)
    try:
        emit_lines()
        direct_made = list(made)
        root.addHandler(logging.NullHandler())
        emit_lines()
    finally:
        logging.setLogRecordFactory(saved[2])
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    assert direct_made == []
    assert made == ["smartlev.gateway.orders"] * 2
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    for line in lines:
        assert line.pop("ts").endswith("Z")
    direct, through_stdlib = lines[:2], lines[2:]
    assert direct == through_stdlib
    assert direct[0] == {
        "level": "info",
        "service": "gateway",
        "event": "position_opened",
        "logger": "smartlev.gateway.orders",
        "user": "alice",
        "units": "1.50",
        "raw": "02",
    }
    assert direct[1]["level"] == "error" and "KeyError: 'gone'" in direct[1]["exc"]


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))  # 1970..2100
@example(1_700_000_000.9999996)  # rounds up into the next second
def test_timestamps_read_as_datetime_writes_them(created: float) -> None:
    """The line's ts is made from a text kept per second: the same text, rounding and
    carry into the next second included, as datetime's ISO form of the timestamp."""
    expected = (
        datetime.fromtimestamp(created, tz=UTC)
        .isoformat(timespec="microseconds")
        .replace("+00:00", "Z")
    )
    assert utc_stamp(created) == expected
    assert utc_stamp(created + 1e-7) >= utc_stamp(created)  # never backwards


def test_an_error_line_carries_the_traceback_of_the_exception_it_names() -> None:
    """A stage that stopped on a bug logged `stage_failed` with `exc_info=exc`, taken
    for a field (the exception's text): no traceback anywhere, the process then exiting
    `from None`."""
    stream = StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("hedging", "INFO", stream=stream)
    try:
        try:
            {}["BTC-USDT:LONG"]
        except KeyError as exc:
            caught = exc
        get_logger("hedging").error("stage_failed", error=repr(caught), exc_info=caught)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert "exc_info" not in line and "KeyError: 'BTC-USDT:LONG'" in line["exc"]
    assert "Traceback" in line["exc"] and line["error"] == "KeyError('BTC-USDT:LONG')"
