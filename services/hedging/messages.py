"""Hedging's wire <-> core conversions, exact: decimals go through the codec's plain
decimal strings both ways, so a round trip gives the identical Decimal.

Inputs are validated here (a ValueError names what is wrong, and the runtime
dead-letters the message); a leverage decision is read back by the leverage service's own
`decision()`, the inverse of what it wrote. Outputs are built from the engine's own events
and books.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from smartlev.v1 import common_pb2, hedging_pb2, leverage_pb2, market_pb2, orders_pb2

from shared.adapters.venue_client import liquidation_to_wire
from shared.codec import (
    decimal_from_wire,
    decimal_to_wire,
    optional_decimal_from_wire,
)
from shared.core.accounting import MAX_DEPOSIT
from shared.core.config import StrategyConfig
from shared.core.engine import Engine
from shared.core.events import (
    AccountLiquidated,
    FundingSettled,
    FundMove,
    HedgeExecuted,
    LeverageTargetChanged,
    ManagementFeeAccrued,
    into_product,
)
from shared.core.leverage import LeverageConfig
from shared.core.market import FundingRate, Tick
from shared.core.money import NAV_QUANTUM, UNIT_QUANTUM, USDT_QUANTUM, ZERO
from shared.core.products import SIDES, product_id
from shared.stream import is_new, parse_market
from shared.wire import decision


def products_by_symbol(config: StrategyConfig) -> dict[str, str]:
    """product -> symbol for every smart product of every configured instrument."""
    return {product_id(symbol, side): symbol for symbol in config.instruments for side in SIDES}


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class MarketStep:
    """A TargetsUpdate as the engine takes it."""

    symbol: str
    seq: int
    ts_init_ns: int
    event: Tick | FundingRate
    decisions: tuple[LeverageTargetChanged, ...]
    message: leverage_pb2.TargetsUpdate

    @property
    def event_id(self) -> str:
        return f"{self.symbol}:{self.seq}"


@dataclass(frozen=True, slots=True)
class OrderStep:
    """A user's open (`amount` paid in) or close (`units` redeemed) of one product, at
    the `nav` the gateway quoted; `units` of an open and `payout` of a close are what the
    gateway promised (None: not sent, nothing to check)."""

    symbol: str
    product: str
    order_id: str
    ts_ns: int
    ts_init_ns: int
    amount: Decimal | None
    units: Decimal | None
    nav: Decimal | None = None
    payout: Decimal | None = None
    position_id: str = ""

    @property
    def event_id(self) -> str:
        return f"{self.symbol}:order:{self.order_id}"


def fresh_steps(last_seq: int | None, steps: Sequence[MarketStep]) -> list[MarketStep]:
    """The steps to run, in order: each above the last one applied before it. A stage
    that re-sent seqs 5-7 after a crash leaves 5, 6, 7, 5, 6, 7 on the topic; when both
    copies come in one batch, the second is a redelivery as surely as in a later one."""
    fresh = []
    for step in steps:
        if is_new(last_seq, step.seq):
            fresh.append(step)
            last_seq = step.seq
    return fresh


def market_step(
    message: leverage_pb2.TargetsUpdate, products: Mapping[str, str], leverage: LeverageConfig
) -> MarketStep:
    """A TargetsUpdate the books can act on: a valid market event (parse_market) and at
    most one target per product of its symbol, on the product's side, within
    [l_min, l_max] (the books would trade whatever they are given)."""
    if not message.HasField("market"):
        raise ValueError("TargetsUpdate carries no market event")
    market = parse_market(message.market)
    symbol = market.symbol
    if symbol not in products.values():
        raise ValueError(f"unknown symbol {symbol!r}")
    if isinstance(market.value, FundingRate) and message.targets:
        raise ValueError("a funding event carries no leverage targets")
    decisions = tuple(decision(d) for d in message.targets)
    targeted: set[str] = set()
    for taken in decisions:
        product = taken.product
        if products.get(product) != symbol:
            raise ValueError(f"target for {product!r} is not a product of {symbol}")
        if product != product_id(symbol, taken.side):
            raise ValueError(f"target for {product!r} is on the {taken.side.name} side")
        if product in targeted:
            raise ValueError(f"two targets for {product!r} in one update")
        targeted.add(product)
        if not leverage.l_min <= taken.target <= leverage.l_max:
            raise ValueError(
                f"target for {product!r} is {taken.target}, outside "
                f"[{leverage.l_min}, {leverage.l_max}]"
            )
    return MarketStep(symbol, market.seq, market.ts_init_ns, market.value, decisions, message)


def _whole_quanta(name: str, value: Decimal, quantum: Decimal) -> None:
    """The books keep units and money in whole quanta: a finer close took a user's units
    for a payout of 0, a finer deposit sent the venue a transfer it does not keep."""
    if value % quantum:
        raise ValueError(f"{name}: must be a multiple of {quantum}, got {value}")


def order_step(message: orders_pb2.OrderEvent, products: Mapping[str, str]) -> OrderStep:
    which = message.WhichOneof("event")
    order: orders_pb2.PositionOpened | orders_pb2.PositionClosed
    payout = None
    if which == "opened":
        order = message.opened
        amount = decimal_from_wire(order.amount, name="amount")
        units = optional_decimal_from_wire(order.units, name="units")
        if not 0 < amount <= MAX_DEPOSIT:
            raise ValueError(f"amount: must be > 0 and at most {MAX_DEPOSIT:,}, got {amount}")
        _whole_quanta("amount", amount, USDT_QUANTUM)
        if units is not None:
            _whole_quanta("units", units, UNIT_QUANTUM)
    else:  # the codec already refused an empty oneof
        order = message.closed
        amount, units = None, decimal_from_wire(message.closed.units, name="units")
        payout = optional_decimal_from_wire(message.closed.payout, name="payout")
        if units <= 0:
            raise ValueError(f"units: must be > 0, got {units}")
        _whole_quanta("units", units, UNIT_QUANTUM)
    nav = optional_decimal_from_wire(order.nav, name="nav")
    if nav is not None and not (nav >= NAV_QUANTUM and nav % NAV_QUANTUM == 0):
        # The books issue and redeem at it: a NAV finer than the books keep it issued
        # ~1e40 units for 10 USDT (an insured floor the fund paid, then a symbol halted)
        raise ValueError(f"nav: must be a positive multiple of {NAV_QUANTUM}, got {nav}")
    symbol = products.get(order.product)
    if symbol is None:
        raise ValueError(f"unknown product {order.product!r}")
    if order.ts_event_ns <= 0:  # the venue refuses it: past the transfer, the symbol halted
        raise ValueError(f"ts_event_ns: must be > 0, got {order.ts_event_ns}")
    return OrderStep(
        symbol,
        order.product,
        order.event_id,
        order.ts_event_ns,
        order.ts_init_ns,
        amount,
        units,
        nav,
        payout,
        order.position_id,
    )


# --------------------------------------------------------------------------- outputs


def book_states(engine: Engine) -> list[hedging_pb2.ProductBookState]:
    """Every product's books, exact: what NAV accounting marks at the tick price."""
    out = []
    for book in engine.books.products.values():
        values = {
            "units": book.units,
            "cash": book.cash,
            "qty": book.qty,
            "target_leverage": engine.targets[book.product],
            "equity_floor": book.equity_floor,
            "trading_fees": book.trading_fees,
            "slippage": book.slippage,
            "funding": book.funding,
            "management_fees": book.management_fees,
            "insurance_received": book.insurance_received,
            "last_nav": book.last_nav,
            "insurance_owed": book.insurance_owed,
        }
        out.append(
            hedging_pb2.ProductBookState(
                product=book.product,
                **{name: decimal_to_wire(value, name=name) for name, value in values.items()},
            )
        )
    return out


def hedge_filled(hedge: HedgeExecuted, event_id: str, ts_init_ns: int) -> hedging_pb2.HedgeFilled:
    """`fill_price` is the volume-weighted average to 1e-8 (the reference when the
    products' changes crossed and nothing traded); the allocations are exact."""
    cost = sum((f.qty * f.price for f in hedge.fills), ZERO)
    average = (
        (cost / hedge.net_qty).quantize(USDT_QUANTUM, ROUND_HALF_EVEN)
        if hedge.net_qty
        else hedge.reference_price
    )
    return hedging_pb2.HedgeFilled(
        event_id=event_id,
        symbol=hedge.symbol,
        ts_event_ns=hedge.ts_ns,
        ts_init_ns=ts_init_ns,
        net_qty=decimal_to_wire(hedge.net_qty, name="net_qty"),
        fill_price=decimal_to_wire(average, name="fill_price"),
        venue_fee=decimal_to_wire(sum((f.fee for f in hedge.fills), ZERO), name="venue_fee"),
        slices=len(hedge.fills),
        allocations=[
            hedging_pb2.FillAllocation(
                product=a.product,
                qty=decimal_to_wire(a.qty, name="qty"),
                cost=decimal_to_wire(a.notional + a.slippage, name="cost"),
                fee=decimal_to_wire(a.fee, name="fee"),
                slippage=decimal_to_wire(a.slippage, name="slippage"),
            )
            for a in hedge.allocations
        ],
    )


def funding_settled(
    funding: FundingSettled, event_id: str, ts_init_ns: int
) -> hedging_pb2.FundingSettled:
    return hedging_pb2.FundingSettled(
        event_id=event_id,
        symbol=funding.symbol,
        ts_event_ns=funding.ts_ns,
        ts_init_ns=ts_init_ns,
        rate=decimal_to_wire(funding.rate, name="rate"),
        mark_price=decimal_to_wire(funding.mark_price, name="mark_price"),
        allocations=[
            hedging_pb2.FundingAllocation(
                product=product, amount=decimal_to_wire(amount, name="amount")
            )
            for product, amount in funding.allocations
        ],
    )


def hedge_update(
    engine: Engine,
    event_id: str,
    events: Iterable[object],
    *,
    ts_init_ns: int,
    market: market_pb2.MarketEvent | None = None,
    targets: Sequence[leverage_pb2.LeverageTargetChanged] = (),
    regime: common_pb2.Regime = common_pb2.REGIME_UNSPECIFIED,
) -> hedging_pb2.HedgeUpdate:
    """One HedgeUpdate for one engine call: its events, and every product's books after."""
    update = hedging_pb2.HedgeUpdate(
        event_id=event_id, targets=targets, regime=regime, products=book_states(engine)
    )
    if market is not None:
        update.market.CopyFrom(market)
    for event in events:
        if isinstance(event, HedgeExecuted):
            if update.HasField("filled"):
                raise ValueError(f"{event_id}: the engine executed two hedges in one event")
            update.filled.CopyFrom(hedge_filled(event, event_id, ts_init_ns))
        elif isinstance(event, FundingSettled):
            update.funding.CopyFrom(funding_settled(event, event_id, ts_init_ns))
        elif isinstance(event, ManagementFeeAccrued):
            update.management_fees.add(
                product=event.product, amount=decimal_to_wire(event.amount, name="amount")
            )
        elif isinstance(event, FundMove):  # signed as the books count it: - taken back
            update.insurance_claims.add(
                product=event.product,
                amount=decimal_to_wire(into_product(event), name="amount"),
                equity_before=decimal_to_wire(event.equity_before, name="equity_before"),
            )
        elif isinstance(event, AccountLiquidated):
            update.liquidated.CopyFrom(liquidation_to_wire(event))
    return update
