"""The NAV service's pure part: a `HedgeUpdate` -> each product's books marked to market.

Hedging sends every product's books after each event (`ProductBookState`), so marking
needs no history: equity, NAV and leverage come from the core's `ProductBook` at the
event's price. Only the last mark is remembered per product (Redis, see main.py): its
price marks the books after an order (no tick), and its NAV stands in for the books'
`last_nav` (a product's worth while it has no units) if hedging did not send one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Literal

from smartlev.v1 import common_pb2, hedging_pb2, nav_pb2

from shared.codec import (
    EncodeError,
    decimal_from_wire,
    decimal_to_wire,
    optional_decimal_from_wire,
)
from shared.core.accounting import ProductBook
from shared.core.market import (
    MAX_SEQ,
    Side,
    market_figure_problem,
    market_price_problem,
    symbol_problem,
)
from shared.core.money import ZERO
from shared.wire import known_regime_name

Kind = Literal["tick", "funding", "order"]
# Leverage is a ratio of exact decimals with 60 significant digits; 1e-8 is plenty for a
# figure users read, and keeps it within the wire's 40.40 digits.
LEVERAGE_QUANTUM = Decimal("0.00000001")


@dataclass(frozen=True, slots=True)
class BookState:
    """What marking needs of one product's books (exact decimals off the wire)."""

    product: str
    side: Side
    units: Decimal
    cash: Decimal
    qty: Decimal
    target: Decimal
    last_nav: Decimal | None  # a product with no units is worth this (None: not sent)
    advanced: Decimal = ZERO  # the insurance fund's advance at a print, not yet repaid


@dataclass(frozen=True, slots=True)
class FillsEvent:
    """One validated `HedgeUpdate`: a market event (tick or funding) or a user order."""

    kind: Kind
    event_id: str
    symbol: str
    seq: int  # the market event's seq; 0 for an order (orders carry no market seq)
    ts_event_ns: int
    ts_init_ns: int
    price: Decimal | None  # the tick's traded price; None for funding and orders
    regime: int
    books: tuple[BookState, ...]
    # Reason codes of the leverage changes this event carries, per product (comma-joined).
    reasons: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Marked:
    """A product's books at a price: what `nav:{product}` and `NavUpdated` hold."""

    product: str
    price: Decimal
    equity: Decimal
    units: Decimal
    nav: Decimal
    leverage: Decimal
    target: Decimal
    qty: Decimal
    advanced: Decimal  # held up by the insurance fund at a print the mark ignores


def side_of(product: str) -> Side:
    """`BTC-USDT:LONG` -> Side.LONG (shared/core/products.product_id's format); a
    product of any other shape, or of a symbol Redis keys cannot carry, is refused."""
    parts = product.split(":")
    if len(parts) != 2 or parts[1] not in Side.__members__:
        raise ValueError(f"product {product!r} is not <symbol>:LONG or <symbol>:SHORT")
    bad_symbol = symbol_problem(parts[0])
    if bad_symbol:
        raise ValueError(f"product {product!r}: {bad_symbol}")
    return Side[parts[1]]


def _book(state: hedging_pb2.ProductBookState) -> BookState:
    name = state.product
    units = decimal_from_wire(state.units, name=f"{name}.units")
    if units < 0:  # a NAV of negative units would be published as it is
        raise ValueError(f"{name}.units must be >= 0, got {units}")
    # published as they are (the target to users): a negative one is a broken producer's
    target = decimal_from_wire(state.target_leverage, name=f"{name}.target_leverage")
    if target < 0:
        raise ValueError(f"{name}.target_leverage must be >= 0, got {target}")
    advanced = optional_decimal_from_wire(state.insurance_owed, name=f"{name}.insurance_owed")
    if advanced is not None and advanced < 0:
        raise ValueError(f"{name}.insurance_owed must be >= 0, got {advanced}")
    return BookState(
        product=name,
        side=side_of(name),
        units=units,
        cash=decimal_from_wire(state.cash, name=f"{name}.cash"),
        qty=decimal_from_wire(state.qty, name=f"{name}.qty"),
        target=target,
        last_nav=_positive_or_none(
            optional_decimal_from_wire(state.last_nav, name=f"{name}.last_nav"),
            f"{name}.last_nav",
        ),
        advanced=advanced or ZERO,
    )


def _positive_or_none(value: Decimal | None, name: str) -> Decimal | None:
    """An empty product's NAV is its last one: published as it is, it must be > 0."""
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _without_regime(update: hedging_pb2.HedgeUpdate) -> hedging_pb2.HedgeUpdate:
    known = hedging_pb2.HedgeUpdate()
    known.CopyFrom(update)
    known.regime = common_pb2.REGIME_UNSPECIFIED
    return known


def parse_update(update: hedging_pb2.HedgeUpdate) -> FillsEvent:
    """Validate a HedgeUpdate (ValueError -> dead letter): books must parse exactly."""
    books = tuple(_book(p) for p in update.products)
    reasons = tuple((t.product, ",".join(t.reasons)) for t in update.targets)
    if not books:
        raise ValueError("HedgeUpdate carries no product books")
    named = [b.product for b in books]
    if len(set(named)) != len(named):  # marked twice under one event id: Redis kept one
        raise ValueError(f"a product's books come more than once: {sorted(named)}")
    if update.regime not in common_pb2.Regime.values():
        # a regime a newer build added (a rolling deploy: regime and leverage ahead, NAV
        # behind): the books are marked all the same, the regime shown as unspecified,
        # as the gateway shows it; dead-lettered, every tick left the NAV frozen
        update = _without_regime(update)
    which = update.market.WhichOneof("event")
    symbol = books[0].product.split(":")[0]
    if which is not None:
        market = getattr(update.market, which)
        if market.seq <= 0:
            raise ValueError(f"{which} seq is missing (must be >= 1)")
        if market.seq > MAX_SEQ:  # Redis's Lua compares seqs as doubles: not past 2^53
            raise ValueError(f"{which} seq must be below 2^53, got {market.seq}")
        symbol = market.symbol
    strangers = [b.product for b in books if b.product.split(":")[0] != symbol]
    if strangers:  # marked at another symbol's price, then skipped as redeliveries
        raise ValueError(f"books of {strangers} on a {symbol!r} {which or 'order'}")
    if which == "tick":
        tick = update.market.tick
        price = decimal_from_wire(tick.price, name="tick.price")
        if price <= 0:
            raise ValueError(f"tick price must be > 0, got {price}")
        beyond = market_figure_problem(price, "tick.price") or market_price_problem(
            price, "tick.price"
        )
        if beyond is not None:
            raise ValueError(beyond)
        return FillsEvent(
            "tick",
            update.event_id,
            tick.symbol,
            tick.seq,
            tick.ts_event_ns,
            tick.ts_init_ns,
            price,
            update.regime,
            books,
            reasons,
        )
    if which == "funding":
        funding = update.market.funding
        return FillsEvent(
            "funding",
            update.event_id,
            funding.symbol,
            funding.seq,
            funding.ts_event_ns,
            funding.ts_init_ns,
            None,
            update.regime,
            books,
            reasons,
        )
    ts = update.filled.ts_event_ns if update.HasField("filled") else 0
    return FillsEvent("order", update.event_id, symbol, 0, ts, 0, None, update.regime, books)


def as_last_marked(order: FillsEvent, fields: dict[str, str]) -> FillsEvent:
    """An order's event as its re-mark publishes it: in the regime the product was last
    marked in (`fields`: its `nav:{product}` hash), since an order's update carries none,
    and, if it traded nothing (no fill, no time), at the market time of that mark: time
    0 dated the NAV 1970, a step back in its series. A regime name this build does not
    know (a hash another build wrote) is left out: an error here would stop the stage
    on the same record at every restart."""
    last, ts = fields.get("regime"), fields.get("ts", "")
    if not order.ts_event_ns and ts.isdigit():
        order = replace(order, ts_event_ns=int(ts))
    if order.regime or not last or not known_regime_name(last):
        return order
    return replace(order, regime=common_pb2.Regime.Value(last))


def mark(book: BookState, price: Decimal, last_nav: Decimal) -> Marked:
    """The core's own marking (`ProductBook.nav` / `.leverage`), so the pipeline's NAV is
    the backtester's to the last unit."""
    core = ProductBook(
        book.product,
        "",
        book.side,
        units=book.units,
        cash=book.cash,
        qty=book.qty,
        last_nav=last_nav if book.last_nav is None else book.last_nav,
    )
    return Marked(
        product=book.product,
        price=price,
        equity=core.equity(price),
        units=book.units,
        nav=core.nav(price),
        leverage=core.leverage(price).quantize(LEVERAGE_QUANTUM),
        target=book.target,
        qty=book.qty,
        advanced=book.advanced,
    )


class Unmarkable(ValueError):
    """Books the core cannot mark at the price: figures past its 60 digits or the wire's
    40.40, or no NAV above 0 for units held (only a broken producer sends them: hedging's
    insurance keeps a quantum a unit). Dead-lettered: retrying cannot help."""


def marked_update(
    book: BookState, price: Decimal, last_nav: Decimal, event: FillsEvent, seq: int, now: int
) -> tuple[Marked, nav_pb2.NavUpdated]:
    """`mark` and its NavUpdated, or Unmarkable."""
    try:
        marked = mark(book, price, last_nav)
        message = nav_updated(marked, event, seq, now)
    except (ArithmeticError, EncodeError) as exc:
        why = f"{book.product}: its books cannot be marked at {price}: {exc!r}"
        raise Unmarkable(why) from None
    if marked.units > 0 and marked.nav <= 0:
        raise Unmarkable(
            f"{book.product}: its books mark {marked.units} units at a NAV of {marked.nav} "
            f"(equity {marked.equity}) at {price}: a NAV is > 0"
        )
    return marked, message


def nav_event_id(product: str, event: FillsEvent) -> str:
    """`<product>:<seq>` for a tick; an order has no seq: `<product>:<order event_id>`."""
    return f"{product}:{event.seq}" if event.kind == "tick" else f"{product}:{event.event_id}"


def nav_updated(marked: Marked, event: FillsEvent, seq: int, ts_init_ns: int) -> nav_pb2.NavUpdated:
    """`seq` is the market seq the NAV reflects (the last applied, for an order)."""
    return nav_pb2.NavUpdated(
        event_id=nav_event_id(marked.product, event),
        product=marked.product,
        ts_event_ns=event.ts_event_ns,
        ts_init_ns=ts_init_ns,
        nav=decimal_to_wire(marked.nav, name="nav"),
        equity=decimal_to_wire(marked.equity, name="equity"),
        units=decimal_to_wire(marked.units, name="units"),
        target_leverage=decimal_to_wire(marked.target, name="target_leverage"),
        actual_leverage=decimal_to_wire(marked.leverage, name="actual_leverage"),
        regime=common_pb2.Regime.Name(event.regime),
        price=decimal_to_wire(marked.price, name="price"),
        position_qty=decimal_to_wire(marked.qty, name="position_qty"),
        seq=seq,
    )


def state_fields(
    marked: Marked, event: FillsEvent, seq: int, priced_ns: int
) -> dict[str, str | int | Decimal]:
    """The `nav:{product}` hash after this update. Its `written_ns` (the field's name
    from before session 18, so that every gateway build reads it) is `priced_ns`: the
    wall-clock time the price the NAV is marked at entered the system (the tick's
    `ts_init_ns`), which tells the order gateway how fresh the NAV is. An order's
    re-mark keeps it, so orders cannot keep an old price tradable, nor can a backlog
    of old ticks marked late. `reasons` (the last leverage change's codes) is only
    written when this event changed the product's target."""
    reasons = dict(event.reasons)
    extra: dict[str, str | int | Decimal] = (
        {"reasons": reasons[marked.product]} if marked.product in reasons else {}
    )
    return {
        **extra,
        "written_ns": priced_ns,
        "equity": marked.equity,
        "units": marked.units,
        "nav": marked.nav,
        "leverage": marked.leverage,
        "target": marked.target,
        "regime": common_pb2.Regime.Name(event.regime),
        "price": marked.price,
        "qty": marked.qty,
        "ts": event.ts_event_ns,
        "seq": seq,
        "advanced": marked.advanced,
    }
