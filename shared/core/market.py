"""Market data values: what the outside world tells the core. Times are integer UTC ns.

Named tuples, not dataclasses: immutable, and several times cheaper to create on the
per-tick path.
"""

from __future__ import annotations

import re
from decimal import Decimal
from enum import IntEnum
from typing import NamedTuple

NS_PER_SECOND = 1_000_000_000
NS_PER_HOUR = 3600 * NS_PER_SECOND
NS_PER_DAY = 24 * NS_PER_HOUR
MAX_TS_NS = 2**63  # the wire's int64 nanoseconds: an instant is in (0, MAX_TS_NS)
NS_PER_YEAR = 365 * NS_PER_DAY
# A symbol names Redis hash tags, table keys (`<symbol>|signal`) and product ids
# (`<symbol>:LONG`): letters, digits, '.', '_' and '-' only, so it can break none of them.
SYMBOL = re.compile(r"[A-Za-z0-9._-]{1,40}")


def symbol_problem(symbol: object) -> str | None:
    """Why `symbol` cannot be a symbol, or None."""
    if isinstance(symbol, str) and SYMBOL.fullmatch(symbol):
        return None
    return f"symbol {symbol!r} must be 1-40 characters of A-Z a-z 0-9 . _ -"


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


# The largest funding rate a settlement may carry, either sign. A product pays leverage
# x rate of its equity to one settlement, so the strategy keeps leverage_ceiling x this
# below 1 (LeverageConfig): funding alone cannot take a NAV to zero. 13 times the largest
# BTC or ETH settlement of 2019-2023 (0.375%); a rate above it is a broken feed or file.
MAX_FUNDING_RATE = Decimal("0.05")


# Decimal places a market figure (price, mark, funding rate) may be written with,
# trailing zeros included: exchanges quote 8 at most. The books multiply prices into
# cash, and a price of 38 places or more made cash no wire could carry, found only once
# the venue had traded (the symbol then halted for good).
MAX_MARKET_DECIMALS = 12
# Seqs and offsets are compared in Redis's Lua, whose numbers are doubles: above 2^53
# two seqs can compare equal.
MAX_SEQ = 2**53 - 1


def funding_rate_problem(rate: Decimal, name: str = "rate") -> str | None:
    """Why `rate` cannot be a settlement's funding rate (MAX_FUNDING_RATE), or None."""
    if abs(rate) > MAX_FUNDING_RATE:
        return f"{name} {rate} is out of bounds (|rate| must be <= {MAX_FUNDING_RATE})"
    return None


# The highest price a market event may carry: no asset trades near it, and the books'
# figures of a position at a price beyond it could pass the wire's 40 integer digits
# (a tick at 5e37 traded, then its update could not be written: the symbol halted).
MAX_MARKET_PRICE = Decimal(10**12)


def market_price_problem(value: Decimal, name: str) -> str | None:
    """Why `value` cannot be a price of a market event (MAX_MARKET_PRICE), or None; its
    places are `market_figure_problem`'s."""
    if value > MAX_MARKET_PRICE:
        return f"{name} {value} is above the highest price taken ({MAX_MARKET_PRICE:,})"
    return None


def market_figure_problem(value: Decimal, name: str) -> str | None:
    """Why `value` cannot be a market figure of the books (MAX_MARKET_DECIMALS), or None."""
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_MARKET_DECIMALS:
        return f"{name} has {-exponent} decimal places, more than {MAX_MARKET_DECIMALS}"
    return None


class FundingRate(NamedTuple):
    """The rate settled at `ts_ns` (fraction per 8h); positive: longs pay shorts."""

    symbol: str
    ts_ns: int
    rate: Decimal


FUNDING_RANK = 0  # a funding settles on the position held up to its instant: first
TICK_RANK = 1
OrderKey = tuple[int, int]


def order_key(event: Tick | FundingRate) -> OrderKey:
    """Where an event stands in a symbol's market stream: by time, a funding before a
    tick of the same instant. Each accepted event moves it forward."""
    return (event.ts_ns, FUNDING_RANK if isinstance(event, FundingRate) else TICK_RANK)


def order_kind(key: OrderKey) -> str:
    """What stands at `key`: "funding" or "tick" (for messages)."""
    return "funding" if key[1] == FUNDING_RANK else "tick"
