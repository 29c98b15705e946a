"""Binance USDT-M futures messages -> market events: a pure parser and a pure fold.

The live loop (`services.ingestion.runner.run_live`) receives the raw websocket payloads
(ccxt.pro hands them over as the `info` of its unified trades and tickers) and passes
each one to `BinanceFeed.on_message`, which returns the market events it implies or
raises `FeedError` with the reason (the service dead-letters the payload with it).

Payloads (Binance USDT-M websocket streams, combined-stream `{"stream", "data"}` wrapper
accepted):
- `aggTrade`: `{"e": "aggTrade", "E": event ms, "s": "BTCUSDT", "p": "price", "q": qty,
  "T": trade ms, ...}` -> a `Tick` at the trade time, carrying the last mark price seen.
- `markPriceUpdate`: `{"e": "markPriceUpdate", "E": ms, "s": "BTCUSDT", "p": "mark",
  "r": "funding rate", "T": next funding time ms, ...}` -> updates the mark and the
  predicted rate of the next settlement.

Funding: Binance settles, at time `T`, the rate it last published for `T`. So once the
feed passes `T` (a trade at or after it, or a mark update announcing a later `T`), a
`FundingRate` at `T` with the last rate seen for it is emitted, before any tick at or
after `T` (the backtester's order: funding first on an equal instant). The fold's state
(`fields`) is kept in Redis by the live loop, so a restart across `T` still settles it.
Prices are decimal strings on the wire and stay exact; a JSON number is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from services.ingestion.validation import refuse_price
from shared.core.market import FundingRate, Tick

NS_PER_MS = 1_000_000
# How far ahead of this machine's clock a trade may be stamped: exchange and host clocks
# drift apart by seconds at most. A trade stamped later is refused: published, it would
# leave every real trade after it "not forward", refused, for good.
MAX_AHEAD_NS = 60 * 1_000_000_000
# How old the last mark may be for a trade to carry it: Binance sends one every second
# (or three). An older one (the feed restarted after an outage, or the mark stream alone
# stalled) is left off: the risk rules then judge the trade's own price, by design,
# instead of a mark from before the outage.
MARK_MAX_AGE_NS = 10 * 1_000_000_000


class FeedError(ValueError):
    """An exchange payload that is not a usable market message; str() is the reason."""


def exchange_symbol(symbol: str) -> str:
    """ "BTC-USDT" -> "BTCUSDT" (Binance's spelling)."""
    return symbol.replace("-", "").upper()


def ccxt_symbol(symbol: str) -> str:
    """ "BTC-USDT" -> "BTC/USDT:USDT" (ccxt's unified USDT-margined perpetual)."""
    base, _, quote = symbol.partition("-")
    if not base or not quote:
        raise ValueError(f"symbol must look like BASE-QUOTE, got {symbol!r}")
    return f"{base}/{quote}:{quote}"


@dataclass(frozen=True, slots=True)
class TradeObserved:
    ts_ns: int
    price: Decimal
    trade_id: int | None = None  # the exchange's id ("a" of aggTrade, "t" of trade)


@dataclass(frozen=True, slots=True)
class MarkObserved:
    ts_ns: int
    mark: Decimal
    funding_rate: Decimal | None
    next_funding_ns: int | None


def _field(data: Mapping[str, Any], name: str) -> Any:
    if name not in data:
        raise FeedError(f"missing field {name!r}")
    return data[name]


def _decimal(data: Mapping[str, Any], name: str) -> Decimal:
    raw = _field(data, name)
    if not isinstance(raw, str):
        raise FeedError(f"field {name!r} must be a decimal string, got {type(raw).__name__}")
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise FeedError(f"field {name!r} is not a number: {raw[:40]!r}") from None
    if not value.is_finite():
        raise FeedError(f"field {name!r} is not finite: {raw!r}")
    return value


def _ms(data: Mapping[str, Any], name: str) -> int:
    raw = _field(data, name)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise FeedError(f"field {name!r} must be a positive integer of ms, got {raw!r}")
    return raw * NS_PER_MS


def as_mapping(message: object) -> Mapping[str, Any]:
    """A payload as a dict: JSON text/bytes are parsed, a combined-stream wrapper opened."""
    if isinstance(message, bytes | bytearray | str):
        try:
            message = json.loads(message)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FeedError(f"not JSON: {exc}") from None
    if not isinstance(message, Mapping):
        raise FeedError(f"expected a JSON object, got {type(message).__name__}")
    data = message.get("data")
    if "stream" in message and isinstance(data, Mapping):
        return data
    return message


def parse(message: object, symbol: str) -> TradeObserved | MarkObserved:
    """One raw payload for `symbol` (e.g. "BTC-USDT") -> what it says; FeedError if bad."""
    data = as_mapping(message)
    event = data.get("e")
    if event not in ("aggTrade", "trade", "markPriceUpdate"):
        raise FeedError(f"unsupported event type {event!r}")
    if data.get("s") != exchange_symbol(symbol):
        raise FeedError(f"symbol {data.get('s')!r} is not {exchange_symbol(symbol)!r}")
    if event == "markPriceUpdate":
        rate = _decimal(data, "r") if data.get("r") not in (None, "") else None
        next_ns = _ms(data, "T") if data.get("T") not in (None, 0) else None
        mark = _decimal(data, "p")
        refused = refuse_price(mark, "field 'p' (mark price)")
        if refused is not None:  # kept, it would have every trade after it refused
            raise FeedError(refused.detail)
        return MarkObserved(_ms(data, "E"), mark, rate, next_ns)
    trade_id = data.get("a" if event == "aggTrade" else "t")
    if trade_id is not None and (isinstance(trade_id, bool) or not isinstance(trade_id, int)):
        raise FeedError(f"trade id must be an integer, got {trade_id!r}")
    return TradeObserved(_ms(data, "T"), _decimal(data, "p"), trade_id)


@dataclass(frozen=True, slots=True)
class BinanceFeed:
    """The fold over one symbol's messages: last mark, pending funding (immutable; each
    `on_message` returns the next feed with the events to publish)."""

    symbol: str
    mark: Decimal | None = None
    mark_ns: int | None = None  # the exchange's time of the mark
    pending_rate: Decimal | None = None
    pending_at_ns: int | None = None
    last_trade_ns: int | None = None  # the time given to the last trade's tick
    last_trade_id: int | None = None  # the exchange's id of the last trade taken

    def fields(self) -> dict[str, str]:
        """The fold's state worth keeping across a restart (what is not known is left
        out): the mark and the funding awaiting settlement, which change on mark updates
        only (once a second), not on every trade."""
        values = {
            "mark": self.mark,
            "mark_ns": self.mark_ns,
            "pending_rate": self.pending_rate,
            "pending_at_ns": self.pending_at_ns,
        }
        return {name: str(value) for name, value in values.items() if value is not None}

    @classmethod
    def from_fields(cls, symbol: str, fields: Mapping[str, str]) -> BinanceFeed:
        at, marked = fields.get("pending_at_ns"), fields.get("mark_ns")
        return cls(
            symbol,
            mark=Decimal(fields["mark"]) if "mark" in fields else None,
            mark_ns=int(marked) if marked is not None else None,  # none: an older build's
            pending_rate=Decimal(fields["pending_rate"]) if "pending_rate" in fields else None,
            pending_at_ns=int(at) if at is not None else None,
        )

    def _settle(self, now_ns: int) -> tuple[BinanceFeed, list[FundingRate]]:
        if self.pending_at_ns is None or self.pending_rate is None or now_ns < self.pending_at_ns:
            return self, []
        settled = FundingRate(self.symbol, self.pending_at_ns, self.pending_rate)
        return replace(self, pending_rate=None, pending_at_ns=None), [settled]

    def _trade_time(self, ts_ns: int) -> int:
        """Trades come stamped to the millisecond, and one taker order sweeping several
        price levels makes several in the same one: each later trade of that millisecond
        gets the next nanosecond, so time still moves forward and none is refused."""
        last = self.last_trade_ns
        if last is not None and ts_ns <= last and ts_ns // NS_PER_MS == last // NS_PER_MS:
            return last + 1
        return ts_ns

    def on_message(
        self, message: object, received_ns: int
    ) -> tuple[BinanceFeed, list[Tick | FundingRate]]:
        """`received_ns`: this machine's clock when the payload came in."""
        observed = parse(message, self.symbol)
        out: list[Tick | FundingRate] = []
        if isinstance(observed, TradeObserved):
            if observed.ts_ns > received_ns + MAX_AHEAD_NS:
                ahead_s = (observed.ts_ns - received_ns) / 1e9
                raise FeedError(f"trade time is {ahead_s:,.0f} s ahead of the clock")
            last_id, trade_id = self.last_trade_id, observed.trade_id
            if trade_id is not None and last_id is not None and trade_id <= last_id:
                # The latest trade again got the next nanosecond of its millisecond
                # (`_trade_time`): published twice, two ticks.
                raise FeedError(f"trade {trade_id} is not after the last one taken ({last_id})")
            feed, funding = self._settle(observed.ts_ns)
            out.extend(funding)
            ts_ns = self._trade_time(observed.ts_ns)
            marked = feed.mark_ns
            fresh = marked is not None and observed.ts_ns - marked <= MARK_MAX_AGE_NS
            out.append(Tick(self.symbol, ts_ns, observed.price, feed.mark if fresh else None))
            # a late trade (the validator refuses it) must not take the time back
            last_ns = max(ts_ns, self.last_trade_ns or ts_ns)
            taken = trade_id if trade_id is not None else last_id
            return replace(feed, last_trade_ns=last_ns, last_trade_id=taken), out
        if observed.ts_ns > received_ns + MAX_AHEAD_NS:  # never stale: carried for good
            ahead_s = (observed.ts_ns - received_ns) / 1e9
            raise FeedError(f"mark time is {ahead_s:,.0f} s ahead of the clock")
        feed = self
        announced = observed.next_funding_ns
        if (
            announced is not None
            and self.pending_at_ns is not None
            and announced > self.pending_at_ns
            # a later T: the old one settled, if its time has come (else the exchange
            # moved its schedule, and a funding stamped ahead would freeze the feed)
            and self.pending_at_ns <= received_ns + MAX_AHEAD_NS
        ):
            feed, funding = self._settle(self.pending_at_ns)
            out.extend(funding)
        feed = replace(
            feed,
            mark=observed.mark,
            mark_ns=observed.ts_ns,
            pending_rate=(
                observed.funding_rate if observed.funding_rate is not None else feed.pending_rate
            ),
            pending_at_ns=observed.next_funding_ns or feed.pending_at_ns,
        )
        return feed, out
