"""Tick validation and seq allocation: pure (no I/O, no clock), one symbol state at a time.

`admit(state, event, policy)` decides whether a candidate market event may enter
`market.ticks` and, if so, gives it the symbol's next `seq`:

- schema: a `Tick` or `FundingRate` with a symbol of 1-40 `[A-Za-z0-9._-]` (it names Redis
  keys and products), an int ns timestamp > 0, and
  `Decimal` numbers (a float is refused: it is not an exact price);
- numbers: price (and mark, when present) finite and > 0; a funding rate finite with
  |rate| <= MAX_FUNDING_RATE (the same bound as the CSV loader);
- time moves forward per symbol: the order key `(ts_ns, rank)` must be strictly above the
  last accepted one, where funding ranks before a tick of the same instant (as in
  `shared.backtest.market_events`). So a tick at an equal or earlier ts is refused, and
  a funding may precede a tick at its own settlement instant but never follow it;
- a jump: a tick more than `policy.max_jump` (default 30%) away from the last accepted
  tick's price is PUBLISHED and flagged, not refused. Real markets gap (the March 2020
  crash, exchange outages) and those are exactly the moves the emergency deleverage
  exists for; refusing them would also freeze the feed, since every later tick would be
  judged against a stale price. The service counts and logs each flagged jump. A tick's
  mark is judged the same way against the last mark accepted (the risk rules watch the
  mark, so its gaps matter as much as the trade's).

A refused event leaves the state unchanged and consumes no seq, so published seqs are
1, 2, 3, ... with no holes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import Decimal

from shared.codec import wire_problem
from shared.core.market import (
    MAX_TS_NS,
    FundingRate,
    OrderKey,
    Tick,
    funding_rate_problem,
    market_figure_problem,
    market_price_problem,
    order_key,
    order_kind,
    symbol_problem,
)

MarketValue = Tick | FundingRate


class Reason(enum.StrEnum):
    """Why an event was refused (also the `reason` label of the rejected metric)."""

    SCHEMA = "schema"
    NOT_FINITE = "not_finite"
    NOT_POSITIVE = "not_positive"
    OUT_OF_BOUNDS = "out_of_bounds"
    NOT_FORWARD = "not_forward"
    PARSE = "parse"  # an exchange message that is not a market event (live parser)


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    max_jump: Decimal = Decimal("0.30")  # relative move from the last accepted tick

    def __post_init__(self) -> None:
        if not self.max_jump.is_finite() or self.max_jump <= 0:
            raise ValueError(f"max_jump must be > 0, got {self.max_jump}")


@dataclass(frozen=True, slots=True)
class SymbolState:
    """What ingestion remembers per symbol: last seq, last accepted order key, last
    accepted tick price and mark (the jump references). Persisted in Redis by the
    service."""

    seq: int = 0
    last_key: OrderKey | None = None
    last_price: Decimal | None = None
    last_mark: Decimal | None = None


EMPTY = SymbolState()


@dataclass(frozen=True, slots=True)
class Accepted:
    seq: int
    event: MarketValue
    jump: Decimal | None = None  # set when the move from the last tick exceeds max_jump
    mark_jump: Decimal | None = None  # the same for the tick's mark against the last mark


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


Verdict = Accepted | Rejected


def _number(value: object, name: str) -> Rejected | None:
    if not isinstance(value, Decimal):
        return Rejected(Reason.SCHEMA, f"{name} must be a Decimal, got {type(value).__name__}")
    if not value.is_finite():
        return Rejected(Reason.NOT_FINITE, f"{name} is {value}")
    beyond = wire_problem(value, name) or market_figure_problem(value, name)
    return None if beyond is None else Rejected(Reason.OUT_OF_BOUNDS, beyond)


def refuse_price(value: object, name: str) -> Rejected | None:
    """A price: a number > 0, at most MAX_MARKET_PRICE, that the wire carries."""
    bad = _number(value, name)
    if bad is None and isinstance(value, Decimal):
        if value <= 0:
            bad = Rejected(Reason.NOT_POSITIVE, f"{name} must be > 0, got {value}")
        elif (beyond := market_price_problem(value, name)) is not None:
            bad = Rejected(Reason.OUT_OF_BOUNDS, beyond)
    return bad


def check(event: object) -> Rejected | None:
    """Stateless checks: schema and numbers."""
    if not isinstance(event, Tick | FundingRate):
        return Rejected(Reason.SCHEMA, f"not a Tick or FundingRate: {type(event).__name__}")
    bad_symbol = symbol_problem(event.symbol)
    if bad_symbol is not None:
        return Rejected(Reason.SCHEMA, bad_symbol)
    ts_ns = event.ts_ns
    if isinstance(ts_ns, bool) or not isinstance(ts_ns, int) or not 0 < ts_ns < MAX_TS_NS:
        return Rejected(Reason.SCHEMA, f"ts_ns must be an int in (0, 2^63), got {ts_ns!r}")
    if isinstance(event, FundingRate):
        bad = _number(event.rate, "rate")
        if bad is None and (beyond := funding_rate_problem(event.rate)) is not None:
            bad = Rejected(Reason.OUT_OF_BOUNDS, beyond)
        return bad
    bad = refuse_price(event.price, "price")
    if bad is None and event.mark_price is not None:
        bad = refuse_price(event.mark_price, "mark_price")
    return bad


def admit(state: SymbolState, event: object, policy: Policy) -> tuple[SymbolState, Verdict]:
    """(next state, verdict) for one candidate event of `state`'s symbol."""
    bad = check(event)
    if bad is not None:
        return state, bad
    assert isinstance(event, Tick | FundingRate)  # check() guarantees it
    key = order_key(event)
    if state.last_key is not None and key <= state.last_key:
        return state, Rejected(
            Reason.NOT_FORWARD,
            f"{order_kind(key)} at ts {event.ts_ns} does not move past the last accepted "
            f"{order_kind(state.last_key)} at {state.last_key[0]}",
        )
    seq = state.seq + 1
    if isinstance(event, FundingRate):
        return SymbolState(seq, key, state.last_price, state.last_mark), Accepted(seq, event)
    mark = event.mark_price
    jump = _jump(state.last_price, event.price, policy)
    mark_jump = None if mark is None else _jump(state.last_mark, mark, policy)
    after = SymbolState(seq, key, event.price, state.last_mark if mark is None else mark)
    return after, Accepted(seq, event, jump, mark_jump)


def _jump(last: Decimal | None, now: Decimal, policy: Policy) -> Decimal | None:
    """The relative move from `last` to `now` when it exceeds `max_jump`, else None."""
    if last is None:
        return None
    move = abs(now / last - 1)
    return move if move > policy.max_jump else None
