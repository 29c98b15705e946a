"""Structured JSON logs: one JSON object per line on stderr, same shape for every service.

    log = get_logger("regime")
    log.info("regime_changed", symbol="BTC-USDT", regime="TREND_UP", confidence=0.82)
    -> {"ts": "2024-01-01T00:00:00.123456Z", "level": "info", "service": "regime",
        "event": "regime_changed", "symbol": "BTC-USDT", "regime": "TREND_UP", ...}

Built on stdlib logging (so faust/aiokafka/grpc logs come out as JSON too, with the logger
name as `event`'s context); `configure_logging` is called once by a service entrypoint.
Decimals are written as strings (exact), bytes as hex prefixes, anything else via str().
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sys
import time
from decimal import Decimal
from typing import Any, TextIO

ExcInfo = bool | BaseException  # see `_error_info`

_RESERVED = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
_FIELDS_ATTR = "smartlev_fields"
_service_name = "smartlev"


def _jsonable(value: Any) -> Any:
    if type(value) is str:  # most fields: the hot path of every log line
        return value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value[:64]).hex()
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# One encoder for every line: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def utc_stamp(created: float) -> str:
    """`created` (epoch seconds) as ISO 8601 UTC to the microsecond, "...T00:00:00.123456Z"
    (rounded as datetime.fromtimestamp does): the second's text is made once, not per line
    (the gateway writes a line per order)."""
    fraction, second = math.modf(created)
    micros = round(fraction * 1e6)
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_second_text(int(second))}.{micros:06d}Z"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, service, event, logger, fields."""

    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _FIELDS_ATTR, None)
        if fields is None:  # `extra=` given to plain stdlib calls (e.g. third-party code)
            fields = {k: v for k, v in record.__dict__.items() if k not in _RESERVED}
        message = record.getMessage()
        return self.line(
            record.created, record.levelname, message, record.name, fields, record.exc_info
        )

    def line(
        self,
        created: float,
        level_name: str,
        event: str,
        logger: str,
        fields: dict[str, Any],
        exc_info: Any,
    ) -> str:
        """The JSON line of these; `fields` named like a standard key are left out."""
        out: dict[str, Any] = {
            "ts": utc_stamp(created),
            "level": level_name.lower(),
            "service": self.service or _service_name,
            "event": event,
            "logger": logger,
        }
        out.update({k: _jsonable(v) for k, v in fields.items() if k not in out})
        if exc_info and exc_info[0]:
            out["exc"] = self.formatException(exc_info)
        return _encode(out)


class JsonLines(logging.StreamHandler[TextIO]):
    """The root handler `configure_logging` installs. Besides formatting stdlib records,
    it takes the project's own lines straight from `StructLogger` (`write`): no
    LogRecord and no handler chain, ~10% of the gateway's CPU per order."""

    def __init__(self, stream: TextIO, service: str) -> None:
        super().__init__(stream)
        self.json = JsonFormatter(service)
        self.setFormatter(self.json)

    def write(
        self, level: int, logger: str, event: str, fields: dict[str, Any], exc_info: ExcInfo
    ) -> None:
        """The line `format` writes for a record of these."""
        error = _error_info(exc_info)
        line = self.json.line(
            time.time(), logging.getLevelName(level), event, logger, fields, error
        )
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(line + self.terminator)
            self.stream.flush()


_direct: JsonLines | None = None  # set by configure_logging


def _error_info(exc_info: ExcInfo) -> Any:
    """The (type, value, traceback) a line carries: of `exc_info` if it is an exception,
    of the one being handled if True, none if False."""
    if isinstance(exc_info, BaseException):
        return (type(exc_info), exc_info, exc_info.__traceback__)
    return sys.exc_info() if exc_info else None


class StructLogger:
    """A thin wrapper: `log.info("event_name", key=value, ...)`."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: ExcInfo, fields: dict[str, Any]) -> None:
        """Straight to the JSON handler while it is the only one listening (the
        services); through stdlib logging otherwise (e.g. pytest's caplog added one).
        Not through `Logger.log`: it walks the stack for a caller location the JSON
        lines do not carry (a third of a line's cost)."""
        logger = self._logger
        if not logger.isEnabledFor(level):
            return
        direct = _direct
        if direct is not None and logging.root.handlers == [direct]:
            direct.write(level, logger.name, event, fields, exc_info)
            return
        error = _error_info(exc_info)
        record = logger.makeRecord(
            logger.name, level, "", 0, event, (), error, extra={_FIELDS_ATTR: fields}
        )
        logger.handle(record)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, exc_info: BaseException | None = None, **fields: Any) -> None:
        """`exc_info`: an exception whose traceback the line carries (it was taken for a
        field, and a stage that stopped on a bug logged no traceback anywhere)."""
        self._log(logging.ERROR, event, exc_info or False, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, True, fields)

    @property
    def stdlib(self) -> logging.Logger:
        return self._logger


def configure_logging(
    service: str, level: str | int = "INFO", stream: TextIO | None = None
) -> None:
    """Route all logging (root logger) to JSON lines on `stream` (stderr by default)."""
    global _service_name, _direct
    _service_name = service
    _direct = JsonLines(stream or sys.stderr, service)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_direct)
    root.setLevel(level if isinstance(level, int) else level.upper())


def get_logger(service: str, name: str | None = None) -> StructLogger:
    """A structured logger for `service` (optionally a sub-component `name`)."""
    return StructLogger(logging.getLogger(f"smartlev.{service}" + (f".{name}" if name else "")))
