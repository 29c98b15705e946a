"""Reconciliation on hand-built states: a small history run through the core engine and
hedging's own wire builder, so every check sees what the services would have written;
then one figure is spoiled at a time and the check must name it."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import NamedTuple

import pytest
from kafka import TopicPartition
from kafka.errors import KafkaTimeoutError
from smartlev.v1 import hedging_pb2, orders_pb2

from services.hedging.messages import hedge_update
from services.nav.marking import mark, parse_update, state_fields
from services.venue.ledger import account_fields
from shared import codec
from shared import reconcile as reconcile_module
from shared.core.config import StrategyConfig
from shared.core.engine import Engine
from shared.core.market import NS_PER_DAY, NS_PER_HOUR, FundingRate, Tick
from shared.core.products import smart_engine
from shared.core.venue import PerpVenue
from shared.reconcile import (
    OUTBOX_STUCK_S,
    REFUSED_MARKER,
    GatewayState,
    Replay,
    Report,
    Row,
    SymbolState,
    reconcile_symbol,
    render,
    replay_one,
    stuck_orders,
)
from shared.redis_store import Version

SYMBOL = "BTC-USDT"
LONG, SHORT = f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"
T0 = 1_600_000_000 * 1_000_000_000 // NS_PER_DAY * NS_PER_DAY
CONFIG = StrategyConfig()


@dataclass
class History:
    """What the services leave behind after a few events."""

    engine: Engine
    updates: list[hedging_pb2.HedgeUpdate]
    orders: list[orders_pb2.OrderEvent]
    navs: dict[str, dict[str, str]]

    def state(self, **changes: object) -> SymbolState:
        venue = self.engine.venue
        assert isinstance(venue, PerpVenue)
        account = {k: str(v) for k, v in venue.snapshot().items()}
        books = self.engine.books.products.values()
        state = SymbolState(
            symbol=SYMBOL,
            engine=json.loads(json.dumps(self.engine.snapshot())),
            mirror=venue.snapshot(),
            positions={b.product: str(b.qty) for b in books} | {"venue": str(venue.position)},
            account=account,
            applied={order_id(o): "1" for o in self.orders},
            navs=self.navs,
            gateway=None,
            versions=(Version(1), Version(1)),
        )
        return replace(state, **changes)  # type: ignore[arg-type]


def order_id(event: orders_pb2.OrderEvent) -> str:
    which = event.WhichOneof("event")
    return str(getattr(event, str(which)).event_id)


def nav_fields(navs: dict[str, dict[str, str]], update: hedging_pb2.HedgeUpdate) -> None:
    """The NAV service's rule (services/nav/main.py) with its own pure functions."""
    event = parse_update(update)
    for book in event.books:
        last = navs.get(book.product, {})
        if event.kind == "tick":
            assert event.price is not None
            marked, seq = mark(book, event.price, Decimal(100)), event.seq
        elif event.kind == "order" and Decimal(last.get("units", "0")) != book.units:
            seq = int(last.get("seq", "0"))
            marked = mark(book, Decimal(last.get("price", "0")), Decimal(100))
        else:
            continue
        fields = state_fields(marked, event, seq, 0)
        navs[book.product] = {k: str(v) for k, v in fields.items()}


def history(positions: bool = False, first: str = "o1", second: str = "o2") -> History:
    """`first` and `second`: the two opens' ids (the gateway's are 32 hex digits)."""
    engine = smart_engine(SYMBOL, CONFIG)
    updates: list[hedging_pb2.HedgeUpdate] = []
    orders: list[orders_pb2.OrderEvent] = []
    navs: dict[str, dict[str, str]] = {}
    seq = 0

    def send(update: hedging_pb2.HedgeUpdate) -> None:
        updates.append(update)
        nav_fields(navs, update)

    def tick(ts: int, price: str, bar_closed: bool = False) -> None:
        nonlocal seq
        seq += 1
        event = Tick(SYMBOL, ts, Decimal(price))
        events = engine.on_tick(event, [], bar_closed)
        market = codec.market_event_from_tick(event, seq=seq, source="t", ts_init_ns=1)
        send(hedge_update(engine, f"{SYMBOL}:{seq}", events, ts_init_ns=1, market=market))

    def order(event: orders_pb2.OrderEvent) -> None:
        orders.append(event)
        if event.WhichOneof("event") == "opened":
            o = event.opened
            events = engine.deposit(o.product, Decimal(o.amount), o.ts_event_ns)
        else:
            c = event.closed
            events = engine.redeem(c.product, Decimal(c.units), c.ts_event_ns)
        send(hedge_update(engine, f"{SYMBOL}:order:{order_id(event)}", events, ts_init_ns=1))

    def opened(oid: str, product: str, amount: str) -> orders_pb2.OrderEvent:
        return orders_pb2.OrderEvent(
            opened=orders_pb2.PositionOpened(
                event_id=oid, position_id=oid, product=product, amount=amount, ts_event_ns=T0
            )
        )

    tick(T0, "40000", bar_closed=True)
    order(opened(first, LONG, "1000000"))
    order(opened(second, SHORT, "500000"))
    tick(T0 + NS_PER_HOUR, "41000.5")
    nonlocal_seq = seq + 1
    funding = FundingRate(SYMBOL, T0 + 8 * NS_PER_HOUR, Decimal("0.0001"))
    events = engine.on_funding(funding)
    market = codec.market_event_from_funding(funding, seq=nonlocal_seq, source="t", ts_init_ns=1)
    seq = nonlocal_seq
    send(hedge_update(engine, f"{SYMBOL}:{seq}", events, ts_init_ns=1, market=market))
    tick(T0 + NS_PER_DAY, "39000", bar_closed=True)  # the day's management fee
    units = engine.books.products[LONG].units / 4
    closed = orders_pb2.PositionClosed(
        event_id="c1", position_id=first, product=LONG, units=str(units), ts_event_ns=T0
    )
    order(orders_pb2.OrderEvent(closed=closed))
    tick(T0 + NS_PER_DAY + NS_PER_HOUR, "39500")
    return History(engine, updates, orders, navs)


def differences(report: Report) -> list[Row]:
    return report.differences


def test_a_consistent_history_balances() -> None:
    h = history()
    assert any(u.management_fees for u in h.updates) and any(
        u.funding.allocations for u in h.updates
    )
    report = reconcile_symbol(CONFIG, h.state(), h.updates, h.orders)
    assert report.balanced, render(report)
    checks = {r.check for r in report.rows}
    assert {
        "books.identity",
        "replay.cash",
        "venue.wallet",
        "orders.applied_once",
        "nav.nav",
    } <= checks
    assert any("no order-gateway state" in n for n in report.notes)
    assert render(report).endswith("every figure agrees to the minor unit")


def test_fills_that_agree_are_counted_not_kept() -> None:
    """Two rows a fill were held for the summary's counts alone (768 B an update of an
    order-heavy history); the counts stay, the rows go, and a fill that differs is
    still kept and named."""
    h = history()
    report = reconcile_symbol(CONFIG, h.state(), h.updates, h.orders)
    fills = report.agreed["fills.qty"]
    assert fills > 0 and report.agreed["fills.fee"] == fills
    assert not [r for r in report.rows if r.check.startswith("fills.")]
    assert re.search(rf"fills\.qty\s+{fills}\s+compared\s+ok", render(report))
    updates = list(h.updates)
    index = next(i for i, u in enumerate(updates) if u.HasField("filled"))
    tampered = hedging_pb2.HedgeUpdate()
    tampered.CopyFrom(updates[index])
    tampered.filled.venue_fee = str(Decimal(tampered.filled.venue_fee) + Decimal("0.00000001"))
    updates[index] = tampered
    report = reconcile_symbol(CONFIG, h.state(), updates, h.orders)
    assert [r.check for r in report.differences if r.check.startswith("fills.")] == ["fills.fee"]
    assert report.agreed["fills.fee"] == fills - 1


def test_a_minor_unit_of_cash_is_named() -> None:
    h = history()
    state = h.state()
    books = state.engine["books"]
    assert isinstance(books, dict)
    cash = Decimal(books["products"][0]["cash"])
    books["products"][0]["cash"] = str(cash + Decimal("0.00000001"))
    report = reconcile_symbol(CONFIG, state, h.updates, h.orders)
    found = {(r.check, r.difference) for r in report.differences}
    assert ("books.cash", Decimal("0.00000001")) in found
    assert ("books.identity", Decimal("0.00000001")) in found
    assert ("replay.cash", Decimal("0.00000001")) in found
    assert "books DO NOT balance" in render(report)


def test_venue_position_off_is_named() -> None:
    h = history()
    state = h.state()
    state.account["position"] = str(Decimal(state.account["position"]) + Decimal("0.001"))
    report = reconcile_symbol(CONFIG, state, h.updates, h.orders)
    found = {(r.check, r.difference) for r in report.differences}
    assert ("books.qty", Decimal("-0.001")) in found  # products hold 0.001 less
    assert ("venue.position", Decimal("0.001")) in found
    assert ("hedging.mirror.position", Decimal("-0.001")) in found


def test_an_order_applied_twice_is_named() -> None:
    h = history()
    again = hedging_pb2.HedgeUpdate()
    again.CopyFrom(h.updates[1])  # o1's update, re-applied on other books
    again.products[0].units = str(Decimal(again.products[0].units) * 2)
    report = reconcile_symbol(CONFIG, h.state(), [*h.updates, again], h.orders)
    found = {(r.check, r.subject) for r in report.differences}
    assert ("orders.updates", "o1") in found
    assert ("fills.repeat", f"{SYMBOL}:order:o1") in found


def test_an_identical_redelivery_is_not_a_difference() -> None:
    h = history()
    doubled = [u for u in h.updates for _ in (0, 1)]
    report = reconcile_symbol(CONFIG, h.state(), doubled, [*h.orders, h.orders[0]])
    assert report.balanced, render(report)


def test_an_order_hedging_never_applied_is_named() -> None:
    h = history()
    lost = orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(event_id="o9", product=LONG, amount="10")
    )
    report = reconcile_symbol(CONFIG, h.state(), h.updates, [*h.orders, lost])
    found = {(r.check, r.subject) for r in report.differences}
    assert {("orders.applied", "o9"), ("orders.updates", "o9")} <= found


def test_an_order_hedging_refused_is_named_with_its_reason() -> None:
    h = history()
    refused = orders_pb2.OrderEvent(
        closed=orders_pb2.PositionClosed(event_id="o9", product=LONG, units="1000000")
    )
    reason = "BTC-USDT:LONG: cannot redeem 1000000 of 7 units"
    state = h.state()
    applied = {**state.applied, "o9": REFUSED_MARKER + reason}
    orders = [*h.orders, refused]
    report = reconcile_symbol(CONFIG, replace(state, applied=applied), h.updates, orders)
    assert [(r.check, r.subject, r.actual) for r in report.differences] == [
        ("orders.refused", "o9", f"refused: {reason}")
    ]


def test_a_stale_nav_is_named() -> None:
    h = history()
    navs = {p: dict(f) for p, f in h.navs.items()}
    navs[LONG]["nav"] = str(Decimal(navs[LONG]["nav"]) - Decimal("0.00000001"))
    report = reconcile_symbol(CONFIG, h.state(navs=navs), h.updates, h.orders)
    assert [(r.check, r.subject) for r in report.differences] == [("nav.nav", LONG)]


def test_gateway_positions_against_orders_and_books() -> None:
    h = history()
    books = h.engine.books.products
    issued = {u.event_id: u for u in h.updates}
    # The units each open bought, as the gateway would have quoted them.
    bought = {
        oid: Decimal(
            next(p.units for p in issued[f"{SYMBOL}:order:{oid}"].products if p.product == product)
        )
        for oid, product in (("o2", SHORT),)
    }
    gateway = GatewayState(
        positions=[{"position_id": "o2", "product": SHORT, "units": str(bought["o2"])}],
        ledger={f"{SHORT}:units": str(bought["o2"])},
        pending=0,
    )
    opened = orders_pb2.OrderEvent()
    opened.CopyFrom(h.orders[1])
    opened.opened.units = str(bought["o2"])
    orders = [h.orders[0], opened, *h.orders[2:]]
    report = reconcile_symbol(CONFIG, h.state(gateway=gateway), h.updates, orders)
    assert report.balanced, render(report)
    assert books[SHORT].units == bought["o2"]

    short = replace(gateway, positions=[{**gateway.positions[0], "units": "1"}])
    report = reconcile_symbol(CONFIG, h.state(gateway=short), h.updates, orders)
    found = {r.check for r in report.differences}
    assert {"gateway.position", "gateway.units", "gateway.ledger"} <= found


def test_a_gateway_position_lost_with_its_ledger_entry_is_a_difference() -> None:
    """Redis can lose a settle's last writes (AOF fsyncs once a second) after the relay
    published its order: the position and its ledger entry go together, so units and
    ledger still matched, and the order counted as one from elsewhere (as a pipeline's
    seed deposit does). An order with a gateway id and no position is now a difference,
    also when the gateway's state is gone entirely."""
    long_id, short_id = "1" * 32, "2" * 32
    h = history(first=long_id, second=short_id)
    held = {p.product: Decimal(p.units) for p in h.updates[-1].products}
    orders = []
    for event in h.orders:  # the units each open bought, as the gateway quotes them
        copy = orders_pb2.OrderEvent()
        copy.CopyFrom(event)
        if copy.WhichOneof("event") == "opened":
            product = copy.opened.product
            copy.opened.units = str(
                held[product] + (Decimal(h.orders[2].closed.units) if product == LONG else 0)
            )
        orders.append(copy)
    positions = [
        {"position_id": pid, "product": product, "units": str(held[product])}
        for pid, product in ((long_id, LONG), (short_id, SHORT))
    ]
    full = GatewayState(positions, {f"{p}:units": str(held[p]) for p in (LONG, SHORT)}, 0)
    assert reconcile_symbol(CONFIG, h.state(gateway=full), h.updates, orders).balanced

    lost = GatewayState(positions[1:], {f"{SHORT}:units": str(held[SHORT])}, 0)
    report = reconcile_symbol(CONFIG, h.state(gateway=lost), h.updates, orders)
    assert [(r.check, r.subject, r.actual) for r in report.differences] == [
        ("gateway.position", long_id, "no position"),
        ("gateway.units", f"{SYMBOL} {LONG}", 0),  # the books hold units nobody does
    ]
    report = reconcile_symbol(CONFIG, h.state(gateway=None), h.updates, orders)
    missing = {r.subject for r in report.differences if r.actual == "no position"}
    assert missing == {long_id, short_id} and not report.balanced


def test_an_order_with_figures_that_do_not_parse_is_a_row_not_a_crash() -> None:
    """Hedging dead-letters such an order; reconcile ended in a traceback (exit 1, the
    code for "books differ")."""
    h = history()
    bad = orders_pb2.OrderEvent(
        closed=orders_pb2.PositionClosed(
            event_id="c9", position_id="o1", product=LONG, units="ten", ts_event_ns=T0
        )
    )
    gateway = GatewayState([], {}, 0)
    report = reconcile_symbol(CONFIG, h.state(gateway=gateway), h.updates, [*h.orders, bad])
    assert ("orders.figures", "c9") in {(r.check, r.subject) for r in report.differences}


def test_an_outbox_that_does_not_drain_is_a_difference() -> None:
    """While orders wait in the gateway's outbox, positions and units are not compared
    (a note says so): a relay that could never publish again (a revoked ACL) left users
    holding units the books never issued, and reconcile said "books balance"."""
    now = T0 + NS_PER_DAY

    def entry(settled_ns: int) -> str:
        opened = orders_pb2.PositionOpened(event_id="e", ts_init_ns=settled_ns)
        return base64.b64encode(codec.encode(orders_pb2.OrderEvent(opened=opened))).decode()

    limit = OUTBOX_STUCK_S * 1_000_000_000
    outbox = [entry(now - limit + 1), entry(now - limit - 1), "not base64!", "Zm9v€"]
    assert stuck_orders(outbox, now) == 3  # what the relay cannot publish either counts
    h = history()
    report = reconcile_symbol(CONFIG, h.state(gateway=GatewayState([], {}, 1)), h.updates, h.orders)
    assert report.balanced and any("outbox" in note for note in report.notes)  # in flight
    stuck = GatewayState([], {}, 3, stuck=2)
    report = reconcile_symbol(CONFIG, h.state(gateway=stuck), h.updates, h.orders)
    assert [(r.check, r.expected, r.actual) for r in report.differences] == [
        ("gateway.outbox", 0, 2)
    ]


@pytest.mark.parametrize("field", ["fees_paid", "funding_paid", "transfers_in"])
def test_venue_sums_against_the_topic(field: str) -> None:
    h = history()
    state = h.state()
    state.account[field] = str(Decimal(state.account[field]) + 1)
    report = reconcile_symbol(CONFIG, state, h.updates, h.orders)
    assert ("venue." + field, Decimal(1)) in {(r.check, r.difference) for r in report.differences}


def test_an_update_whose_figures_the_core_refuses_is_a_row_not_a_crash() -> None:
    """Decoding checks a message's shape, not its decimals: an update with a price that
    is not a number stopped the whole run with a traceback (for a symbol whose state was
    missing too, which is not even reported). It is a row, and that symbol's replay
    stops there (what follows builds on it)."""
    h = history()
    spoiled = hedging_pb2.HedgeUpdate()
    spoiled.CopyFrom(next(u for u in h.updates if u.market.WhichOneof("event") == "tick"))
    spoiled.market.tick.price = "not-a-number"
    replay = Replay(SYMBOL, CONFIG, {})
    rows: list[Row] = []
    assert not replay_one(replay, spoiled, rows)
    [row] = rows
    assert (row.check, row.subject) == ("fills.replay", spoiled.event_id) and not row.ok
    assert "InvalidOperation" in str(row.actual)
    assert replay_one(Replay(SYMBOL, CONFIG, {}), h.updates[0], rows) and len(rows) == 1


def test_a_stuck_partition_is_an_error_though_others_see_traffic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A partition that never reaches its end offset ends the read with an error, even
    while records keep coming on another partition already at its end (live traffic
    after the snapshot reset the stall clock: the read never ended)."""

    class Record(NamedTuple):
        offset: int
        key: str
        value: bytes

    class Consumer:  # partition 0 stuck at 3 of 10; partition 1 at its end, still written
        def __init__(self) -> None:
            self.at = {stuck: 3, live: 5}

        def position(self, tp: TopicPartition) -> int:
            return self.at[tp]

        def pause(self, *partitions: TopicPartition) -> None:
            pass

        def poll(self, timeout_ms: int) -> dict[TopicPartition, list[Record]]:
            time.sleep(0.001)
            assert self.at[live] < 5_000, "the read never ended"
            self.at[live] += 1
            return {live: [Record(self.at[live] - 1, SYMBOL, b"after the snapshot")]}

    stuck, live = TopicPartition("t", 0), TopicPartition("t", 1)
    monkeypatch.setattr(reconcile_module, "READ_STALL_S", 0.2)
    read = reconcile_module._read_to(Consumer(), "t", {stuck: 10, live: 5})
    with pytest.raises(KafkaTimeoutError, match="1 of them short"):
        assert list(read) == []


def test_what_moved_at_the_venue_is_its_money_read_as_numbers() -> None:
    """A symbol without hedging state: an account with money at the venue is a
    difference; a stored account's schema field, counters and zeros are not; an amount
    in exponent notation counts; one that is not a number is said, not raised."""
    venue = PerpVenue(CONFIG.instrument("BTC-USDT"), CONFIG.venue)

    def stored() -> dict[str, str]:  # as Redis gives it back
        return {name: str(value) for name, value in account_fields(venue).items()}

    assert reconcile_module._moved(stored()) == ""
    venue.transfer(Decimal(1000))
    assert reconcile_module._moved(stored()) == (
        "venue account {'wallet': '1000', 'transfers_in': '1000'}"
    )
    venue.transfer(Decimal(-1000))
    assert reconcile_module._moved(stored()) == ""
    assert "'wallet': '1E+3'" in reconcile_module._moved({"v": "1", "wallet": "1E+3"})
    assert "'--5', not a number" in reconcile_module._moved({"wallet": "--5"})


def test_a_nav_hash_at_another_seq_is_named() -> None:
    h = history()
    navs = {p: dict(f) for p, f in h.navs.items()}
    navs[LONG]["seq"] = str(int(navs[LONG]["seq"]) - 1)
    report = reconcile_symbol(CONFIG, h.state(navs=navs), h.updates, h.orders)
    assert [(r.check, r.subject) for r in report.differences] == [("nav.seq", LONG)]


def test_hedgings_stored_venue_position_is_compared() -> None:
    h = history()
    positions = dict(h.state().positions, venue="0")
    report = reconcile_symbol(CONFIG, h.state(positions=positions), h.updates, h.orders)
    assert [r.check for r in report.differences] == ["hedging.positions"]


def test_positions_are_not_compared_while_the_gateways_orders_are_pending() -> None:
    """An order settled but not yet relayed: its position is ahead of the books for a
    moment, no difference."""
    h = history()
    gateway = GatewayState([{"position_id": "o1", "product": LONG, "units": "1"}], {}, pending=1)
    report = reconcile_symbol(CONFIG, h.state(gateway=gateway), h.updates, h.orders)
    assert [r for r in report.differences if r.check == "gateway.position"] == []


def test_an_event_begun_after_another_starts_the_stuck_clock_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new event mid-way at other versions is not the old one stuck: the books gauge
    read 0 for a pipeline that was moving."""
    monitor = reconcile_module.BooksMonitor(None, CONFIG, "", [SYMBOL], stuck_s=10.0)  # type: ignore[arg-type]
    now = [100.0]
    monkeypatch.setattr(reconcile_module.time, "monotonic", lambda: now[0])
    assert not monitor._stuck(SYMBOL, (Version(1), Version(1)))
    now[0] = 200.0
    assert not monitor._stuck(SYMBOL, (Version(2), Version(2)))
    now[0] = 211.0
    assert monitor._stuck(SYMBOL, (Version(2), Version(2)))  # that one, stood still


def test_money_at_the_venue_with_no_hedging_state_is_a_difference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only noted as skipped, a run over every symbol said the books balance while the
    venue held money no books account for."""
    symbols = list(CONFIG.instruments)
    replayed = reconcile_module.Replayed(
        {s: ({}, []) for s in symbols},
        {s: Replay(s, CONFIG, {}) for s in symbols},
        {s: [] for s in symbols},
        {s: [] for s in symbols},
    )
    monkeypatch.setattr(reconcile_module, "replay_topics", lambda *args: replayed)

    async def missing(*args: object) -> None:
        raise reconcile_module.StateMissing("no hedging state", "venue account {'wallet': '9'}")

    monkeypatch.setattr(reconcile_module, "load_symbol", missing)
    report = asyncio.run(reconcile_module.reconcile(None, "x", CONFIG, "", ()))  # type: ignore[arg-type]
    assert {r.check for r in report.differences} == {"books.state"}


def _replayed(h: History) -> Callable[..., reconcile_module.Replayed]:
    """`replay_topics` as it reads `h`'s updates and orders (of SYMBOL; none of the
    others)."""

    def topics(*args: object) -> reconcile_module.Replayed:
        wanted = list(CONFIG.instruments)
        orders = {
            s: reconcile_module.unique_orders(h.orders if s == SYMBOL else []) for s in wanted
        }
        replays = {s: Replay(s, CONFIG, orders[s][0]) for s in wanted}
        replays[SYMBOL].apply_all(h.updates)
        return reconcile_module.Replayed(
            orders, replays, {s: [] for s in wanted}, {s: [] for s in wanted}
        )

    return topics


@pytest.mark.parametrize("wallet", ["NaN", "abc"])
def test_a_stored_figure_that_cannot_be_read_is_a_difference_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, wallet: str
) -> None:
    """A "NaN" in the venue's stored wallet (unreadable since reliability 210), or text
    that is no number, ended `reconcile` in a traceback, exit 1, read as
    "differences"; it is one, named."""
    h = history()

    async def load(*args: object) -> SymbolState:
        state = h.state()
        state.account["wallet"] = wallet
        return state

    monkeypatch.setattr(reconcile_module, "replay_topics", _replayed(h))
    monkeypatch.setattr(reconcile_module, "load_symbol", load)
    report = asyncio.run(reconcile_module.reconcile(None, "x", CONFIG, "", [SYMBOL]))  # type: ignore[arg-type]
    assert [(r.check, r.subject) for r in report.differences] == [("books.state", SYMBOL)]


def _spoiled_books(state: SymbolState) -> None:
    state.engine["books"] = []


def _spoiled_products(state: SymbolState) -> None:
    state.engine["books"]["products"] = {}


def _spoiled_product(state: SymbolState) -> None:
    state.engine["books"]["products"] = [1]


def _spoiled_liquidations(state: SymbolState) -> None:
    state.mirror["liquidations"] = "many"  # hedging's mirror of the venue account


@pytest.mark.parametrize(
    "spoil", [_spoiled_books, _spoiled_products, _spoiled_product, _spoiled_liquidations]
)
def test_a_stored_snapshot_of_the_wrong_shape_is_a_difference_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, spoil: Callable[[SymbolState], None]
) -> None:
    """Snapshots of the wrong shape ended `reconcile` in an AssertionError or TypeError
    traceback (exit 1, the other symbols unreported); each is one named difference."""
    h = history()

    async def load(*args: object) -> SymbolState:
        state = h.state()
        spoil(state)
        return state

    monkeypatch.setattr(reconcile_module, "replay_topics", _replayed(h))
    monkeypatch.setattr(reconcile_module, "load_symbol", load)
    report = asyncio.run(reconcile_module.reconcile(None, "x", CONFIG, "", [SYMBOL]))  # type: ignore[arg-type]
    assert [(r.check, r.subject) for r in report.differences] == [("books.state", SYMBOL)]


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"engine": '{"price": "1", ', "venue": "{}"}, "JSONDecodeError"),
        ({"venue": "{}"}, "KeyError('engine')"),
        ({"engine": "[]", "venue": "{}"}, "engine is a list, not a map"),
        ({"engine": "{}", "venue": '"text"'}, "venue is a str, not a map"),
    ],
)
def test_hedging_state_that_is_not_its_snapshots_is_a_difference_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, fields: dict[str, str], says: str
) -> None:
    """Hedging's state hash read as JSON unguarded: a field that is not JSON, or missing,
    or JSON of another shape, ended `reconcile` in a traceback read as "differences",
    and a run over every symbol left the others unreported."""
    h = history()

    async def load(redis: object, namespace: str, symbol: str, *args: object) -> SymbolState:
        if symbol == SYMBOL:
            reconcile_module._snapshots(symbol, fields)
        return h.state()

    monkeypatch.setattr(reconcile_module, "replay_topics", _replayed(h))
    monkeypatch.setattr(reconcile_module, "load_symbol", load)
    report = asyncio.run(reconcile_module.reconcile(None, "x", CONFIG, "", ()))  # type: ignore[arg-type]
    [row] = [r for r in report.differences if r.subject == SYMBOL]
    assert row.check == "books.state" and says in str(row.actual), row
    assert {r.subject for r in report.rows} > {SYMBOL}  # the other symbol is reported


def test_a_difference_of_a_stored_nan_has_no_amount() -> None:
    """The books monitor takes the largest amount of a symbol's differences: a "NaN" in
    the books made that raise, and the symbols after it went unchecked."""
    assert Row("books.cash", SYMBOL, Decimal(1), Decimal("NaN")).difference is None
    assert Row("books.cash", SYMBOL, Decimal(1), Decimal(3)).difference == 2
