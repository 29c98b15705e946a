"""Reconciliation: prove from the outside that the books balance (DESIGN section 5).

`python -m shared.reconcile [--namespace NS] [--symbol S ...]` reads what the services
left in Redis and the history on Kafka, and checks, per symbol:

1. books: hedging's engine snapshot against the venue service's account: the products'
   qty sum to the venue position, their cash to the venue wallet, and equity + platform
   fees + insurance fund == deposits - payouts + venue PnL (the core's `check_balanced`
   identity); hedging's mirror of the account and its `positions` hash agree with both.
2. replay: every HedgeUpdate on `hedge.fills` re-applied, in order, to fresh core `Books`
   (orders from `orders.events`, fills, funding, management fees, insurance claims) must
   give each update's ProductBookState and, at the end, hedging's snapshot; the venue's
   position, wallet, transfers, fees and funding must equal the sums on the topic.
3. orders: every order on `orders.events` applied by hedging exactly once (its applied
   ids and one HedgeUpdate each); with the order gateway, every user position's units ==
   its opens - closes, and each product's units == the positions' units.
4. NAV: each `nav:{product}` equals the books of the HedgeUpdate NAV last marked it on,
   marked by the core (`ProductBook.nav`).

Every check is a pure function over plain values returning `Row`s (expected vs actual,
exact Decimals); the loader below reads Redis and Kafka. Exit 0 when every row agrees,
1 listing each difference, 2 on a usage or connection error. `BooksMonitor` runs check 1
continuously inside a service and exports `smartlev_books_balanced{symbol}`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf.message import Message
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import Gauge
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from smartlev.v1 import hedging_pb2, orders_pb2

from shared import codec
from shared.adapters.redis_wire import redacted
from shared.codec import POSITION_ID
from shared.core.accounting import Books, BooksOutOfBalance, ProductBook
from shared.core.config import StrategyConfig
from shared.core.events import HedgeAllocation, HedgeExecuted
from shared.core.market import NS_PER_SECOND
from shared.core.money import ZERO, MoneyError, usdt_down
from shared.core.products import smart_product_specs
from shared.core.venue import PerpVenue
from shared.redis_store import ApplyOnceStore, Version, key
from shared.settings import KafkaSettings, load_strategy
from shared.topics import HEDGE_FILLS, ORDERS_EVENTS

Value = Decimal | int | str
M = TypeVar("M", bound=Message)

# ProductBook fields hedging sends in every ProductBookState and a replay re-derives.
REPLAYED = (
    "units",
    "cash",
    "qty",
    "trading_fees",
    "slippage",
    "funding",
    "management_fees",
    "insurance_received",
    "last_nav",
)
BOOK_TOTALS = ("deposits", "payouts", "platform_fees", "insurance_fund")
ACCOUNT = ("wallet", "position", "transfers_in", "fees_paid", "funding_paid", "insurance_fund")


@dataclass(frozen=True, slots=True)
class Row:
    """One comparison: `expected` is what the derivation says, `actual` the state checked."""

    check: str
    subject: str
    expected: Value
    actual: Value

    @property
    def ok(self) -> bool:
        return self.expected == self.actual

    @property
    def difference(self) -> Decimal | None:
        if isinstance(self.expected, str) or isinstance(self.actual, str):
            return None
        try:
            difference = Decimal(self.actual) - Decimal(self.expected)
        except ArithmeticError:  # a stored 1E+999999999: the row says it, unsubtracted
            return None
        return None if difference.is_nan() else difference  # (a stored "NaN": no amount)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # per check, the comparisons that agreed and were counted, not kept (one per fill:
    # a history's worth of rows held only for the summary's counts)
    agreed: Counter[str] = field(default_factory=Counter)

    @property
    def differences(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    @property
    def balanced(self) -> bool:
        return not self.differences


# --------------------------------------------------------------------------- 1. books


def check_books(
    symbol: str,
    books: Books,
    venue: PerpVenue,
    price: Decimal,
    mirror: PerpVenue | None = None,
    positions: Mapping[str, str] | None = None,
) -> list[Row]:
    """Hedging's books against the venue account (the sides of `Books.check_balanced`),
    plus hedging's own mirror of the account and its `positions` hash."""
    products = books.products.values()
    left = sum((b.equity(price) for b in products), ZERO) + books.platform_fees
    left += books.insurance_fund
    rows = [
        Row("books.qty", symbol, venue.position, sum((b.qty for b in products), ZERO)),
        Row("books.cash", symbol, venue.wallet, sum((b.cash for b in products), ZERO)),
        Row("books.identity", symbol, books.deposits - books.payouts + venue.pnl(price), left),
    ]
    if all(r.ok for r in rows):
        try:  # the core's own check must agree: never report balanced when it does not
            books.check_balanced(venue, price)
        except BooksOutOfBalance as exc:
            rows.append(Row("books.check_balanced", symbol, "balanced", str(exc)))
    if mirror is not None:
        rows += [
            Row(f"hedging.mirror.{name}", symbol, getattr(venue, name), getattr(mirror, name))
            for name in ACCOUNT
        ]
    if positions is not None:
        wanted = {b.product: str(b.qty) for b in products} | {"venue": str(venue.position)}
        rows += [
            Row("hedging.positions", f"{symbol} {name}", Decimal(qty), _dec(positions.get(name)))
            for name, qty in wanted.items()
        ]
    return rows


def _dec(text: str | None) -> Value:
    """A stored figure: not a number is a difference to show, not a Decimal to compare
    (a signalling NaN raised on `==`, after the checks, as a traceback)."""
    if text is None:
        return "(missing)"
    value = Decimal(text)
    return f"{text!r}, not a number" if value.is_nan() else value


# --------------------------------------------------------------------------- 2. replay


@dataclass(frozen=True, slots=True)
class Mark:
    """What the NAV service last wrote for a product: the books it marked, at a price."""

    seq: int
    price: Decimal
    book: ProductBook


@dataclass
class VenueFlows:
    """The venue account as the sums on hedge.fills say it must be."""

    position: Decimal = ZERO
    transfers_in: Decimal = ZERO
    cost: Decimal = ZERO
    fees_paid: Decimal = ZERO
    funding_paid: Decimal = ZERO

    @property
    def wallet(self) -> Decimal:
        return self.transfers_in - self.cost - self.fees_paid - self.funding_paid


def order_id_of(symbol: str, event_id: str) -> str | None:
    """`<symbol>:order:<order id>` (hedging's event id of an order) -> the order id."""
    prefix = f"{symbol}:order:"
    return event_id[len(prefix) :] if event_id.startswith(prefix) else None


class Replay:
    """hedge.fills of one symbol re-applied to fresh core `Books`; every update's books
    compared with what hedging sent (a difference is listed once, then the replay takes
    hedging's figure so one slip is not reported on every later update)."""

    def __init__(
        self, symbol: str, config: StrategyConfig, orders: Mapping[str, orders_pb2.OrderEvent]
    ) -> None:
        self.symbol = symbol
        self.config = config.accounting
        self.orders = orders
        specs = smart_product_specs(symbol, config)
        self.books = Books(
            config.accounting, [ProductBook(s.product, symbol, s.side) for s in specs]
        )
        self.venue = VenueFlows()
        self.price = ZERO
        self.rows: list[Row] = []  # differences, and what the rows of a report keep
        self.agreed: Counter[str] = Counter()  # per check, the comparisons that agreed
        self.updates = 0
        self.matched = 0  # updates whose every book equalled the replay's
        self.applied: Counter[str] = Counter()  # order id -> distinct HedgeUpdates
        self.order_units: dict[str, Decimal] = {}  # order id -> signed units it moved
        self.marks: dict[str, Mark] = {}
        self.liquidated = False
        # event id -> digest of the update sent under it (not the update: this map is
        # what a replay keeps per update of the whole history)
        self._seen: dict[str, bytes] = {}
        self._reported: set[tuple[str, str]] = set()

    def apply_all(self, updates: Iterable[hedging_pb2.HedgeUpdate]) -> Replay:
        for update in updates:
            self.apply(update)
        return self

    def apply(self, update: hedging_pb2.HedgeUpdate) -> None:
        digest = hashlib.blake2b(codec.encode(update), digest_size=16).digest()
        seen = self._seen.get(update.event_id)
        if seen == digest:
            return  # re-sent after a crash (output before state): the same output again
        if seen is not None:
            self.rows.append(
                Row("fills.repeat", update.event_id, "one content", "sent twice, different")
            )
        self._seen[update.event_id] = digest
        self.updates += 1
        which = update.market.WhichOneof("event") if update.HasField("market") else None
        seq = 0
        if which == "tick":
            self.price = Decimal(update.market.tick.price)
            seq = update.market.tick.seq
        order_id = order_id_of(self.symbol, update.event_id)
        if order_id is not None:
            self.applied[order_id] += 1
            self._order(order_id, update)
        if update.HasField("filled"):
            self._filled(update.filled)
        if update.HasField("funding"):
            self._funding(update.event_id, update.funding)
        for fee in update.management_fees:
            self._management_fee(fee.product, Decimal(fee.amount))
        for claim in update.insurance_claims:
            self._claim(claim.product, Decimal(claim.amount))
        if update.HasField("liquidated"):  # never allowed (section 5); not replayable
            self.liquidated = True
            self.rows.append(Row("venue.liquidated", update.event_id, "never", "liquidated"))
        self._compare(update)
        self._mark(update, which, seq)

    def _order(self, order_id: str, update: hedging_pb2.HedgeUpdate) -> None:
        event = self.orders.get(order_id)
        if event is None:
            self.rows.append(Row("orders.unknown", order_id, "on orders.events", "missing"))
            return
        order = codec.order_of(event)
        nav = Decimal(order.nav) if order.nav else None
        try:
            if isinstance(order, orders_pb2.PositionOpened):
                amount = Decimal(order.amount)
                issued = self.books.issue(order.product, amount, self.price, order.ts_event_ns, nav)
                self.order_units[order_id] = issued.units
                self.venue.transfers_in += amount - issued.fee
            else:
                units = Decimal(order.units)
                redeemed = self.books.redeem(order.product, units, self.price, 0, nav)
                self.order_units[order_id] = -units
                self.venue.transfers_in -= redeemed.gross
        except (MoneyError, KeyError) as exc:
            self.rows.append(Row("orders.settle", order_id, "settles", f"refused: {exc}"))

    def _filled(self, filled: hedging_pb2.HedgeFilled) -> None:
        allocations = tuple(
            HedgeAllocation(
                a.product,
                Decimal(a.qty),
                Decimal(a.cost) - Decimal(a.slippage),
                Decimal(a.slippage),
                Decimal(a.fee),
            )
            for a in filled.allocations
        )
        net, fee = Decimal(filled.net_qty), Decimal(filled.venue_fee)
        subject = filled.event_id
        self._tally(Row("fills.qty", subject, net, sum((a.qty for a in allocations), ZERO)))
        self._tally(Row("fills.fee", subject, fee, sum((a.fee for a in allocations), ZERO)))
        self.books.apply_hedge(HedgeExecuted(self.symbol, 0, self.price, net, (), allocations))
        self.venue.position += net
        self.venue.fees_paid += fee
        self.venue.cost += sum((a.notional + a.slippage for a in allocations), ZERO)

    def _tally(self, row: Row) -> None:
        """Keep a difference; count a comparison that agreed."""
        if row.ok:
            self.agreed[row.check] += 1
        else:
            self.rows.append(row)

    def _funding(self, event_id: str, funding: hedging_pb2.FundingSettled) -> None:
        sent = {a.product: Decimal(a.amount) for a in funding.allocations}
        total = sum(sent.values(), ZERO)
        derived = self.books.funding(
            self.symbol, 0, Decimal(funding.rate), Decimal(funding.mark_price), total
        )
        for product, amount in derived.allocations:
            self._tally(
                Row("fills.funding", f"{product} @ {event_id}", amount, sent.get(product, ZERO))
            )
        self.venue.funding_paid += total

    def _management_fee(self, product: str, amount: Decimal) -> None:
        """`Books.accrue_management_fee`'s effect of one accrued fee (the accrual itself
        needs the elapsed time, which the topic does not carry)."""
        book = self.books.products[product]
        book.cash -= amount
        book.management_fees += amount
        to_insurance = usdt_down(amount * self.config.insurance_share)
        self.books.insurance_fund += to_insurance
        self.books.platform_fees += amount - to_insurance
        self.venue.transfers_in -= amount

    def _claim(self, product: str, amount: Decimal) -> None:
        book = self.books.products[product]
        book.cash += amount
        book.insurance_received += amount
        self.books.insurance_fund -= amount
        self.venue.transfers_in += amount

    def _compare(self, update: hedging_pb2.HedgeUpdate) -> None:
        matched = True
        for state in update.products:
            book = self.books.products.get(state.product)
            if book is None:
                self.rows.append(Row("fills.product", state.product, "a known product", "unknown"))
                continue
            book.equity_floor = Decimal(state.equity_floor)  # set by rebalances, not flows
            for name in REPLAYED:
                sent, derived = Decimal(getattr(state, name)), getattr(book, name)
                if sent != derived:
                    matched = False
                    if (state.product, name) not in self._reported:
                        self._reported.add((state.product, name))
                        subject = f"{state.product} @ {update.event_id}"
                        self.rows.append(Row(f"replay.{name}", subject, derived, sent))
                    setattr(book, name, sent)
        self.matched += matched

    def _mark(self, update: hedging_pb2.HedgeUpdate, which: str | None, seq: int) -> None:
        """The NAV service's rule: a tick marks every product at its price; an order
        re-marks, at the last mark, the products whose units it changed; funding none."""
        if which == "funding":
            return
        for state in update.products:
            if state.product not in self.books.products:
                continue
            book = replace(self.books.products[state.product])  # as hedging sent it
            last = self.marks.get(state.product)
            if which == "tick":
                self.marks[state.product] = Mark(seq, self.price, book)
            elif (ZERO if last is None else last.book.units) != book.units:
                # (a product never marked has no NAV hash, as if marked with no units)
                seq_, price = (0, ZERO) if last is None else (last.seq, last.price)
                self.marks[state.product] = Mark(seq_, price, book)

    def totals(self, snapshot: Books, venue: PerpVenue) -> list[Row]:
        """The replay's end against hedging's snapshot and the venue account."""
        rows = [Row("replay.updates_matched", self.symbol, self.updates, self.matched)]
        rows += [
            Row(f"replay.{name}", f"{self.symbol} {p.product}", getattr(p, name), getattr(s, name))
            for p in self.books.products.values()
            if (s := snapshot.products.get(p.product)) is not None
            for name in REPLAYED
        ]
        rows += [
            Row(f"replay.{name}", self.symbol, getattr(self.books, name), getattr(snapshot, name))
            for name in BOOK_TOTALS
        ]
        if self.liquidated:
            return rows
        rows += [
            Row(f"venue.{name}", self.symbol, getattr(self.venue, name), getattr(venue, name))
            for name in ("position", "wallet", "transfers_in", "fees_paid", "funding_paid")
        ]
        return rows


# --------------------------------------------------------------------------- 3. orders


def unique_orders(
    events: Iterable[orders_pb2.OrderEvent],
) -> tuple[dict[str, orders_pb2.OrderEvent], list[Row]]:
    """Orders by id; the gateway's outbox may publish one twice (identical: fine)."""
    orders: dict[str, orders_pb2.OrderEvent] = {}
    rows = []
    for event in events:
        order_id = codec.order_of(event).event_id
        first = orders.setdefault(order_id, event)
        if codec.encode(first) != codec.encode(event):
            rows.append(Row("orders.repeat", order_id, "one content", "published twice, different"))
    return orders, rows


# How hedging records an order its books refused (dead-lettered) among its applied ids,
# before the reason: so a redelivery is skipped, and this check names it.
REFUSED_MARKER = "refused: "
# hedging's state hash of the event it began and has not committed (services/hedging/desks.py)
INFLIGHT = "inflight"


def check_orders(
    symbol: str,
    orders: Mapping[str, orders_pb2.OrderEvent],
    applied_ids: Mapping[str, str],
    applied_updates: Mapping[str, int],
) -> list[Row]:
    """Each order applied once: in hedging's applied ids (id -> its record) and with one
    HedgeUpdate; an order hedging refused is named with the reason (the gateway settled
    it, the books did not: a difference to mend by hand)."""
    applied = set(applied_ids)
    rows = []
    settled = []
    for order_id in orders:
        record = applied_ids.get(order_id, "")
        if record.startswith(REFUSED_MARKER):  # "refused: <reason>"
            rows.append(Row("orders.refused", order_id, "applied", record))
            continue
        settled.append(order_id)
        if order_id not in applied:
            rows.append(Row("orders.applied", order_id, "applied", "not in hedging's ids"))
        if applied_updates.get(order_id, 0) != 1:
            rows.append(Row("orders.updates", order_id, 1, applied_updates.get(order_id, 0)))
    rows += [
        Row("orders.applied", order_id, "on orders.events", "unknown order applied")
        for order_id in sorted(applied - set(orders))
    ]
    once = sum(1 for o in settled if o in applied and applied_updates.get(o, 0) == 1)
    rows.append(Row("orders.applied_once", symbol, len(settled), once))
    return rows


@dataclass(frozen=True, slots=True)
class GatewayState:
    """The order gateway's state of one symbol (services/gateway/ledger.py)."""

    positions: Sequence[Mapping[str, str]]
    ledger: Mapping[str, str]
    pending: int  # orders in its outbox, not yet on orders.events
    stuck: int = 0  # of those, settled more than OUTBOX_STUCK_S ago


# An order settles with its outbox entry and the relay publishes it within ~50 ms, or
# within seconds of Kafka coming back: one pending for longer is not on its way.
OUTBOX_STUCK_S = 30


def check_gateway(
    symbol: str,
    gateway: GatewayState,
    orders: Mapping[str, orders_pb2.OrderEvent],
    books: Books,
    order_units: Mapping[str, Decimal],
) -> list[Row]:
    """Positions against their orders (and every gateway order against a position);
    products' units against the positions."""
    rows = []
    if gateway.stuck:  # positions and units are not compared while orders are pending
        subject = f"{symbol} outbox, settled over {OUTBOX_STUCK_S} s ago"
        rows.append(Row("gateway.outbox", subject, 0, gateway.stuck))
    moved: defaultdict[str, Decimal] = defaultdict(Decimal)
    for order_id, event in orders.items():
        order = codec.order_of(event)
        try:
            units = codec.decimal_from_wire(order.units or "0", name="units")
        except codec.DecodeError as exc:  # hedging dead-letters it too: it moved nothing
            rows.append(Row("orders.figures", order_id, "plain decimals", exc.reason))
            continue
        sign = 1 if isinstance(order, orders_pb2.PositionOpened) else -1
        moved[order.position_id] += sign * units
    held: defaultdict[str, Decimal] = defaultdict(Decimal)
    ids = set()
    for position in gateway.positions:
        pid, units = position["position_id"], Decimal(position["units"])
        ids.add(pid)
        held[position["product"]] += units
        if gateway.pending == 0:
            rows.append(Row("gateway.position", pid, moved.get(pid, ZERO), units))
    # a gateway order on the topic whose position the gateway no longer has (Redis lost
    # the settle's writes, position and ledger entry together): the other checks match
    rows += [
        Row("gateway.position", pid, moved[pid], "no position")
        for pid in sorted(moved)
        if pid not in ids and POSITION_ID.fullmatch(pid)
    ]
    for product, book in books.products.items():
        units = held.get(product, ZERO)
        ledger = gateway.ledger.get(f"{product}:units")
        rows.append(Row("gateway.ledger", product, units, _dec(ledger) if ledger else ZERO))
        if gateway.pending == 0:
            outside = sum(  # orders from elsewhere (a pipeline's seed deposits)
                (
                    order_units.get(o, ZERO)
                    for o, e in orders.items()
                    if (order := codec.order_of(e)).product == product
                    and order.position_id not in ids
                    and not POSITION_ID.fullmatch(order.position_id)
                ),
                ZERO,
            )
            rows.append(Row("gateway.units", f"{symbol} {product}", book.units - outside, units))
    return rows


# --------------------------------------------------------------------------- 4. NAV


def check_nav(product: str, mark: Mark | None, nav: Mapping[str, str]) -> list[Row]:
    """`nav:{product}` against the core's marking of the books NAV last marked."""
    if mark is None:
        return [Row("nav.marked", product, "none", "written" if nav else "none")]
    book, price = mark.book, mark.price
    expected: dict[str, Value] = {
        "nav": book.nav(price),
        "equity": book.equity(price),
        "units": book.units,
        "qty": book.qty,
        "price": price,
        "seq": mark.seq,
    }
    rows = []
    for name, value in expected.items():
        raw = nav.get(name)
        actual: Value = int(raw) if name == "seq" and raw is not None else _dec(raw)
        rows.append(Row(f"nav.{name}", product, value, actual))
    return rows


# --------------------------------------------------------------------------- loading


@dataclass
class SymbolState:
    """Everything Redis holds about one symbol that the checks need."""

    symbol: str
    engine: dict[str, object]
    mirror: dict[str, object]
    positions: dict[str, str]
    account: dict[str, str]
    applied: dict[str, str]  # hedging's applied order ids -> their records (none: not read)
    navs: dict[str, dict[str, str]]
    gateway: GatewayState | None
    versions: tuple[Version, Version]  # hedging's and the venue's tag versions
    # hedging had begun an event it had not committed (its Inflight): the venue may have
    # moved for it already, so the books may differ from the venue for now
    in_progress: bool = False


class StateUnreadable(ValueError):
    """Hedging's stored state for a symbol is not what it writes (not JSON, a field
    missing, the wrong shape): a difference to name, not a traceback."""


class StateMissing(LookupError):
    """No hedging state for a symbol under the namespace: nothing to reconcile, unless
    money moved without it (`moved`: what did, "" when nothing did)."""

    def __init__(self, message: str, moved: str = "") -> None:
        super().__init__(message)
        self.moved = moved


VENUE_MONEY = ("wallet", "position", "transfers_in", "fees_paid", "funding_paid", "insurance_fund")


def _moved(account: Mapping[str, str]) -> str:
    """What moved at the venue for a symbol with no hedging state: its account's money
    (a deposit reached the venue, and hedging died before it committed or published);
    a figure that is not a number says so ("" when nothing moved)."""
    moved = {}
    for name in VENUE_MONEY:
        if name not in account:
            continue
        try:
            if Decimal(account[name]) != 0:
                moved[name] = account[name]
        except ArithmeticError:  # (decimal's InvalidOperation)
            moved[name] = f"{account[name]!r}, not a number"
    return f"venue account {moved}" if moved else ""


async def load_symbol(
    redis: Redis, namespace: str, symbol: str, products: Sequence[str]
) -> SymbolState:
    """Read one symbol's state; retried until hedging's and the venue's versions stood
    still across the read, so both sides are each as of one commit. NAV and gateway
    state, and hedging's applied order ids (one per order ever), only for `products`
    (none: the books alone, cheap enough for a timer)."""
    hedge = ApplyOnceStore(redis, namespace=f"{namespace}hedge")
    venue = ApplyOnceStore(redis, namespace=f"{namespace}venue")
    nav = ApplyOnceStore(redis, namespace=f"{namespace}nav")
    for _ in range(20):
        before = (await hedge.version(symbol), await venue.version(symbol))
        (state, positions, inflight), _ = await hedge.read_together(
            symbol, [["state"], ["positions"], [INFLIGHT]]
        )
        account, _ = await venue.read(symbol, "account")
        applied_key = key(f"{namespace}hedge", symbol, "applied")
        records = await redis.hgetall(applied_key) if products else {}
        applied = {_text(k): _text(v) for k, v in records.items()}
        after = (await hedge.version(symbol), await venue.version(symbol))
        if before == after:
            break
    if not state:
        in_event = " (hedging's Inflight is set: an event begun)" if inflight.get("kind") else ""
        raise StateMissing(
            f"no hedging state for {symbol} under namespace {namespace!r}{in_event}",
            _moved(account),
        )
    engine, mirror = _snapshots(symbol, state)
    navs = {p: (await nav.read(p))[0] for p in products}
    gateway = await load_gateway(redis, namespace, symbol) if products else None
    return SymbolState(
        symbol,
        engine,
        mirror,
        positions,
        account,
        applied,
        navs,
        gateway,
        after,
        in_progress=bool(inflight.get("kind")),
    )


def _snapshots(symbol: str, state: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The engine's and the venue mirror's snapshots in hedging's state, or
    StateUnreadable."""
    try:
        snapshots = json.loads(state["engine"]), json.loads(state["venue"])
    except (KeyError, ValueError) as exc:  # a field missing, or no JSON
        raise StateUnreadable(f"hedging's state of {symbol} is unreadable: {exc!r}") from None
    for name, snapshot in zip(("engine", "venue"), snapshots, strict=True):
        if not isinstance(snapshot, dict):
            kind = type(snapshot).__name__
            raise StateUnreadable(f"hedging's state of {symbol}: {name} is a {kind}, not a map")
    return snapshots


async def load_gateway(redis: Redis, namespace: str, symbol: str) -> GatewayState | None:
    gw = ApplyOnceStore(redis, namespace=f"{namespace}gw")
    pattern = gw.state_key(symbol, "pos") + ":*"
    position_keys = [k async for k in redis.scan_iter(match=pattern, count=500)]
    ledger, _ = await gw.read(symbol, "ledger")
    outbox = await redis.hvals(gw.state_key(symbol, "outbox"))
    if not position_keys and not ledger:
        return None
    positions = [
        {_text(k): _text(v) for k, v in (await redis.hgetall(k)).items()} for k in position_keys
    ]
    return GatewayState(positions, ledger, len(outbox), stuck_orders(outbox, time.time_ns()))


def stuck_orders(outbox: Iterable[str | bytes], now_ns: int) -> int:
    """The outbox's entries (base64 OrderEvents) settled over OUTBOX_STUCK_S before
    `now_ns`; one that does not decode counts (the relay cannot publish it either)."""
    stuck = 0
    for entry in outbox:
        try:
            event = codec.decode(orders_pb2.OrderEvent, base64.b64decode(entry, validate=True))
            settled_ns = codec.order_of(event).ts_init_ns
        except (codec.DecodeError, ValueError):  # (base64's binascii.Error; non-ASCII)
            settled_ns = 0
        stuck += now_ns - settled_ns > OUTBOX_STUCK_S * NS_PER_SECOND
    return stuck


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def restore(
    config: StrategyConfig, state: SymbolState
) -> tuple[Books, Decimal, PerpVenue, PerpVenue]:
    """(books, last price, venue account, hedging's mirror) through the core's restore."""
    engine = state.engine
    books_snapshot = engine["books"]
    if not isinstance(books_snapshot, dict):
        raise ValueError(f"the engine's books are a {type(books_snapshot).__name__}, not a map")
    books = Books.restore(config.accounting, books_snapshot)
    spec = config.instrument(state.symbol)
    account: dict[str, object] = dict(state.account)
    account["liquidations"] = int(state.account.get("liquidations", "0"))
    if "wallet" not in account:
        account.update({name: "0" for name in ACCOUNT})
    venue = PerpVenue.restore(spec, config.venue, account)
    mirror = PerpVenue.restore(spec, config.venue, state.mirror)
    return books, Decimal(str(engine["price"])), venue, mirror


# A read that moves no partition forward for this long is stuck (a topic whose leader
# is gone, say): an error, not a wait without end.
READ_STALL_S = 60.0


@contextlib.contextmanager
def topic_snapshot(bootstrap: str, topic: str) -> Iterator[Iterator[tuple[str | None, bytes]]]:
    """The messages of a topic up to its end offsets as of entering (taken then, so the
    order of two snapshots is the order of the two moments), each partition in order,
    read as they are iterated: a poll's worth held at a time, never the history. No
    consumer group; the consumer is closed on leaving."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        key_deserializer=codec.key_deserializer,
        client_id="smartlev-reconcile",
    )
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise StateMissing(f"topic {topic} does not exist")
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        ends: dict[TopicPartition, int] = consumer.end_offsets(assigned)
        yield _read_to(consumer, topic, ends)
    finally:
        consumer.close()


def _read_to(
    consumer: KafkaConsumer, topic: str, ends: Mapping[TopicPartition, int]
) -> Iterator[tuple[str | None, bytes]]:
    """A partition is paused once at its end (nothing after the snapshot is fetched, and
    live traffic there does not count as progress of a partition still short of it)."""
    moved_at = time.monotonic()
    while True:
        at = {tp: consumer.position(tp) for tp in ends}
        done = [tp for tp, end in ends.items() if at[tp] >= end]
        consumer.pause(*done)
        if len(done) == len(ends):
            return
        for tp, records in consumer.poll(timeout_ms=500).items():
            for record in records:
                if record.offset < ends[tp]:  # past it: written after the snapshot
                    yield record.key, record.value
        if any(consumer.position(tp) > at[tp] for tp in ends if tp not in done):
            moved_at = time.monotonic()
        elif time.monotonic() - moved_at > READ_STALL_S:
            raise KafkaTimeoutError(
                f"reading {topic}: no partition moved for {READ_STALL_S:.0f} s with "
                f"{len(ends) - len(done)} of them short of their end offsets"
            )


# --------------------------------------------------------------------------- the run


def reconcile_symbol(
    config: StrategyConfig,
    state: SymbolState,
    updates: Iterable[hedging_pb2.HedgeUpdate],
    order_events: Iterable[orders_pb2.OrderEvent],
) -> Report:
    """All four checks of one symbol, from values already read."""
    orders, repeats = unique_orders(order_events)
    replay = Replay(state.symbol, config, orders).apply_all(updates)
    return symbol_report(config, state, orders, repeats, replay)


def symbol_report(
    config: StrategyConfig,
    state: SymbolState,
    orders: Mapping[str, orders_pb2.OrderEvent],
    repeats: list[Row],
    replay: Replay,
) -> Report:
    """The four checks of one symbol, once its orders and hedge.fills were replayed."""
    symbol = state.symbol
    report = Report()
    books, price, venue, mirror = restore(config, state)
    report.rows += check_books(symbol, books, venue, price, mirror, state.positions)
    report.rows += repeats
    report.rows += replay.rows
    report.agreed += replay.agreed
    report.rows += replay.totals(books, venue)
    report.notes.append(
        f"{symbol}: {replay.updates} HedgeUpdates replayed, {len(orders)} orders, "
        f"venue position {venue.position}, wallet {venue.wallet}, last price {price}"
    )
    report.rows += check_orders(symbol, orders, state.applied, replay.applied)
    gateway = state.gateway
    if gateway is None and any(
        POSITION_ID.fullmatch(codec.order_of(e).position_id) for e in orders.values()
    ):
        gateway = GatewayState((), {}, 0)  # gone, though the gateway's orders are not
    if gateway is None:
        report.notes.append(f"{symbol}: no order-gateway state; user positions not checked")
    else:
        if gateway.pending:
            report.notes.append(
                f"{symbol}: {gateway.pending} order(s) in the gateway's outbox, not "
                "yet published: positions and units against the books not compared"
            )
        report.rows += check_gateway(symbol, gateway, orders, books, replay.order_units)
    for product in books.products:
        report.rows += check_nav(product, replay.marks.get(product), state.navs.get(product, {}))
    return report


def replay_one(replay: Replay, update: hedging_pb2.HedgeUpdate, rows: list[Row]) -> bool:
    """Apply `update`; one whose figures the core refuses (a price that is not a number,
    say: decoding checks the message's shape, not its decimals) is a row saying so, not
    the end of the whole run (the symbol may not even be reported, its state missing)."""
    try:
        replay.apply(update)
    except (ArithmeticError, ValueError, KeyError, BooksOutOfBalance) as exc:
        where = traceback.extract_tb(exc.__traceback__)[-1]  # a bug shows where it is
        raised = f"{exc!r} at {Path(where.filename).name}:{where.lineno}"
        rows.append(Row("fills.replay", update.event_id, "an update the core applies", raised))
        return False
    return True


def decoded(payload: bytes, symbol: str, value_type: type[M], rows: list[Row]) -> M | None:
    """A message of `symbol`'s, decoded; one that does not decode is listed in `rows`."""
    try:
        return codec.decode(value_type, payload)
    except codec.DecodeError as exc:
        rows.append(Row("kafka.decode", symbol, "a valid message", exc.reason))
        return None


@dataclass
class Replayed:
    """What Kafka says of the wanted symbols: their orders (by id, and the rows of an
    order published twice differently), hedge.fills replayed, and the messages that
    did not decode or apply."""

    orders: dict[str, tuple[dict[str, orders_pb2.OrderEvent], list[Row]]]
    replays: dict[str, Replay]
    bad_fills: dict[str, list[Row]]
    bad_orders: dict[str, list[Row]]


def replay_topics(
    bootstrap: str, config: StrategyConfig, namespace: str, wanted: Sequence[str]
) -> Replayed:
    """hedge.fills' snapshot first: hedging applies an order it read from orders.events,
    so every order an update read names is in the later snapshot of orders.events.
    orders.events is held (one entry per order, which the replay looks up); hedge.fills
    is replayed as it is read."""
    bad_fills: dict[str, list[Row]] = {symbol: [] for symbol in wanted}
    bad_orders: dict[str, list[Row]] = {symbol: [] for symbol in wanted}
    events: dict[str, list[orders_pb2.OrderEvent]] = {symbol: [] for symbol in wanted}
    with (
        topic_snapshot(bootstrap, HEDGE_FILLS.in_namespace(namespace).name) as fills,
        topic_snapshot(bootstrap, ORDERS_EVENTS.in_namespace(namespace).name) as order_log,
    ):
        for message_key, payload in order_log:
            if message_key in events:
                rows = bad_orders[message_key]
                event = decoded(payload, message_key, orders_pb2.OrderEvent, rows)
                if event is not None:
                    events[message_key].append(event)
        orders = {symbol: unique_orders(events.pop(symbol)) for symbol in wanted}
        replays = {symbol: Replay(symbol, config, orders[symbol][0]) for symbol in wanted}
        replaying = set(wanted)  # a symbol leaves at an update its replay cannot apply
        for message_key, payload in fills:
            if message_key not in replaying:
                continue
            assert message_key is not None
            rows = bad_fills[message_key]
            update = decoded(payload, message_key, hedging_pb2.HedgeUpdate, rows)
            if update is not None and not replay_one(replays[message_key], update, rows):
                replaying.discard(message_key)  # what follows builds on what it could not
    return Replayed(orders, replays, bad_fills, bad_orders)


async def reconcile(
    redis: Redis,
    bootstrap: str,
    config: StrategyConfig,
    namespace: str = "",
    symbols: Sequence[str] = (),
) -> Report:
    """Read and check every symbol (all configured symbols with hedging state by default).

    Kafka first, then Redis: hedging publishes an update before it commits the state it
    leads to. What a run holds is each replay's books, one digest per update and the
    orders, not hedge.fills' history (`replay_topics`)."""
    explicit = bool(symbols)
    wanted = list(dict.fromkeys(symbols or config.instruments))
    kafka = replay_topics(bootstrap, config, namespace, wanted)
    report = Report()
    for symbol in wanted:
        products = [s.product for s in smart_product_specs(symbol, config)]
        bad = kafka.bad_fills[symbol] + kafka.bad_orders[symbol]  # records it cannot read
        report.rows += bad
        try:
            state = await load_symbol(redis, namespace, symbol, products)
        except StateUnreadable as exc:
            report.rows.append(Row("books.state", symbol, "a readable state", str(exc)))
            continue
        except StateMissing as exc:
            history = kafka.replays[symbol].updates
            if history:  # hedging published updates: its state is lost, not yet to come
                # (orders alone may wait for a hedging that has not started)
                report.rows.append(
                    Row("books.state", symbol, f"hedging's state of {history:,} updates", str(exc))
                )
            elif exc.moved:  # money at the venue that no books account for
                report.rows.append(Row("books.state", symbol, "nothing moved", exc.moved))
            elif explicit and not bad:
                raise
            else:  # (an Inflight alone: a first event begun; run again)
                report.notes.append(f"{symbol}: {exc}; skipped")
            continue
        by_id, repeats = kafka.orders[symbol]
        try:
            part = symbol_report(config, state, by_id, repeats, kafka.replays[symbol])
        except (ValueError, ArithmeticError, KeyError, TypeError) as exc:
            # a stored figure unreadable ("NaN" in the venue's wallet, a field missing, a
            # list for a map): a difference, not a traceback
            report.rows.append(Row("books.state", symbol, "a readable state", repr(exc)))
            continue
        report.rows += part.rows
        report.agreed += part.agreed
        report.notes += part.notes
        if state.in_progress:
            report.notes.append(
                f"{symbol}: hedging was in the middle of an event (its Inflight): the "
                "venue may be ahead of the books until it commits; run again"
            )
    if not report.rows:
        raise StateMissing(f"no hedging state under namespace {namespace!r}")
    return report


# --------------------------------------------------------------------------- continuous


BALANCED = Gauge(
    "smartlev_books_balanced",
    "1 when the symbol's books balance against the venue account (DESIGN section 5), else "
    "0, as of the last check that could read them (smartlev_books_check_failed)",
    ["symbol"],
)
DIFFERENCE = Gauge(
    "smartlev_books_difference",
    "Largest absolute difference (USDT or contracts) the last books check found",
    ["symbol"],
)


CHECK_FAILED = Gauge(
    "smartlev_books_check_failed",
    "1 when the last books check of the symbol could not read or restore its state "
    "(smartlev_books_balanced then keeps the last verdict), else 0",
    ["symbol"],
)
BOOKS_CHECK_FAILED = "books.check"  # the row of a symbol whose books could not be checked
STUCK_S = 10.0  # an event in progress this long, nothing moving, is not in progress


class BooksMonitor:
    """Check 1 on a timer, for a service's /metrics. Between the venue's write and
    hedging's commit of one event the two legitimately differ for a moment, so a
    difference counts only when it holds: in two reads at the same state versions, or in
    every one of `reads` reads `pause_s` apart while hedging commits on (a live pipeline
    moves the versions between any two reads; one read that balances clears it). A read
    taken mid-event (hedging's Inflight set: the venue may be ahead of the books, while
    Kafka acks the event's output) is no evidence, unless that same state stood still
    for `stuck_s` (an event that never commits), which later rounds see."""

    def __init__(
        self,
        redis: Redis,
        config: StrategyConfig,
        namespace: str,
        symbols: Sequence[str],
        *,
        reads: int = 5,
        pause_s: float = 0.1,
        stuck_s: float = STUCK_S,
    ) -> None:
        self.redis = redis
        self.config = config
        self.namespace = namespace
        self.symbols = list(symbols)
        self.reads = reads
        self.pause_s = pause_s
        self.stuck_s = stuck_s
        # per symbol: the versions of a mid-event read with a difference, first seen when
        self._mid_event: dict[str, tuple[tuple[Version, Version], float]] = {}
        self._had_state: set[str] = set()  # symbols whose state a read found

    async def check(self) -> dict[str, list[Row]]:
        """Run once; returns the confirmed differences per symbol checked. A symbol whose
        state cannot be read or restored gets a `books.check` row saying why and
        `smartlev_books_check_failed` 1 (its verdict stays as it was); the symbols after
        it are checked all the same."""
        found = {}
        for symbol in self.symbols:
            try:
                bad = await self._held_differences(symbol)
                amounts = [abs(d) for r in bad or () if (d := r.difference) is not None]
                biggest = float(max(amounts, default=ZERO))
            except Exception as exc:  # whatever it is, this symbol's books are unknown
                CHECK_FAILED.labels(symbol).set(1)
                found[symbol] = [Row(BOOKS_CHECK_FAILED, symbol, "a state to check", repr(exc))]
                continue
            CHECK_FAILED.labels(symbol).set(0)
            if bad is None:
                continue
            BALANCED.labels(symbol).set(0 if bad else 1)
            DIFFERENCE.labels(symbol).set(biggest)
            found[symbol] = bad
        return found

    async def _held_differences(self, symbol: str) -> list[Row] | None:
        """The differences the reads that count show ([] once one balances); None: no
        state yet, or no read that counts (hedging mid-event in every one). A state gone
        after a read found it raises StateMissing: lost, the books are unknown (the
        verdict of the last read stood, "balanced", until hedging's next commit)."""
        versions = None
        evidence: list[Row] | None = None
        for read in range(self.reads):
            if read:
                await asyncio.sleep(self.pause_s)
            try:
                state = await load_symbol(self.redis, self.namespace, symbol, ())
            except StateMissing:
                if symbol in self._had_state:
                    raise
                return None
            self._had_state.add(symbol)
            books, price, venue, mirror = restore(self.config, state)
            bad = [r for r in check_books(symbol, books, venue, price, mirror) if not r.ok]
            if not bad:
                self._mid_event.pop(symbol, None)
                return bad
            if state.in_progress and not self._stuck(symbol, state.versions):
                continue  # the venue may be ahead of the books for now
            if state.versions == versions:
                return bad
            versions, evidence = state.versions, bad
        return evidence

    def _stuck(self, symbol: str, versions: tuple[Version, Version]) -> bool:
        """Whether the event in progress at `versions` has stood still for `stuck_s`."""
        seen = self._mid_event.get(symbol)
        now = time.monotonic()
        if seen is None or seen[0] != versions:
            self._mid_event[symbol] = (versions, now)
            return False
        return now - seen[1] >= self.stuck_s


# --------------------------------------------------------------------------- CLI


def render(report: Report) -> str:
    """Plain lines: every difference, then a one-line summary per check."""
    lines = []
    for row in report.rows:
        if row.ok and row.check.startswith("books."):
            lines.append(f"ok    {row.check:<24} {row.subject:<44} {row.actual}")
    for row in report.differences:
        diff = row.difference
        lines.append(
            f"DIFF  {row.check:<24} {row.subject:<44} expected {row.expected}  actual "
            f"{row.actual}" + ("" if diff is None else f"  difference {diff:f}")
        )
    by_check: Counter[str] = Counter(r.check for r in report.rows) + report.agreed
    failed: Counter[str] = Counter(r.check for r in report.differences)
    for check in sorted(by_check):
        status = "ok" if not failed[check] else f"{failed[check]} DIFFERENT"
        lines.append(f"{check:<30} {by_check[check]:>6} compared  {status}")
    lines += [f"note: {note}" for note in report.notes]
    verdict = (
        "books balance: every figure agrees to the minor unit"
        if report.balanced
        else f"books DO NOT balance: {len(report.differences)} difference(s)"
    )
    lines.append(verdict)
    return "\n".join(lines)


def run(
    namespace: str,
    symbols: Sequence[str],
    bootstrap: str,
    redis_url: str,
    config: StrategyConfig,
) -> int:
    """The command: print the report; 0 balanced, 1 differences, 2 cannot check."""
    for symbol in symbols:
        if symbol not in config.instruments:
            print(
                f"error: unknown symbol {symbol!r}; configured: {sorted(config.instruments)}",
                file=sys.stderr,
            )
            return 2

    try:
        Redis.from_url(redis_url)  # a URL it cannot read: a usage error, not an imbalance
    except ValueError as exc:
        print(f"error: --redis-url {redacted(redis_url)!r}: {exc}", file=sys.stderr)
        return 2
    try:
        bootstrap = KafkaSettings(bootstrap=bootstrap).bootstrap  # the services' own rule
    except ValidationError as exc:
        print(f"error: --bootstrap: {exc.errors()[0]['msg']}", file=sys.stderr)
        return 2

    async def go() -> Report:
        redis = Redis.from_url(redis_url, decode_responses=True)
        try:
            return await reconcile(redis, bootstrap, config, namespace, symbols)
        finally:
            await redis.aclose()

    try:
        report = asyncio.run(go())
    except StateMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"error: cannot read Kafka at {bootstrap}: {exc!r}", file=sys.stderr)
        return 2
    except (RedisError, OSError) as exc:
        print(f"error: cannot read Redis at {redacted(redis_url)}: {exc}", file=sys.stderr)
        return 2
    print(render(report))
    return 0 if report.balanced else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.reconcile", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--namespace", default="", help="topic/key prefix, e.g. 't1234abcd.'")
    parser.add_argument("--symbol", action="append", default=[], help="repeatable; default all")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--config",
        default=os.environ.get("SMARTLEV_STRATEGY_CONFIG", ""),
        help="the policy file the pipeline runs with (default: $SMARTLEV_STRATEGY_CONFIG)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_strategy(args.config)
    except ValueError as exc:
        print(f"error: --config: {exc}", file=sys.stderr)
        return 2
    return run(args.namespace, args.symbol, args.bootstrap, args.redis_url, config)


if __name__ == "__main__":
    sys.exit(main())
