"""Market data values: what the outside world tells the core. Times are integer UTC ns.

Named tuples, not dataclasses: immutable, and several times cheaper to create on the
per-tick path.
"""

from __future__ import annotations

from decimal import Decimal
from enum import IntEnum
from typing import NamedTuple

NS_PER_SECOND = 1_000_000_000
NS_PER_HOUR = 3600 * NS_PER_SECOND
NS_PER_DAY = 24 * NS_PER_HOUR
NS_PER_YEAR = 365 * NS_PER_DAY


class Side(IntEnum):
    """Product direction; the value is the sign of its perp position."""

    LONG = 1
    SHORT = -1


class Tick(NamedTuple):
    """A traded (perp) price; `mark_price` is the venue's mark when known."""

    symbol: str
    ts_ns: int
    price: Decimal
    mark_price: Decimal | None = None


class Bar(NamedTuple):
    symbol: str
    open_ts_ns: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal


class FundingRate(NamedTuple):
    """The rate settled at `ts_ns` (fraction per 8h); positive: longs pay shorts."""

    symbol: str
    ts_ns: int
    rate: Decimal
