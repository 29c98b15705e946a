"""The core's one code path: ticks -> bars -> features -> regime -> targets -> hedge -> NAV.

`SignalPipeline` turns a symbol's ticks into regime states (one per closed bar);
`Engine` runs the products of one venue account on those. The backtester drives them
directly; the stream services call the same pieces one stage at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from shared.core.accounting import AccountingConfig, Books, ProductBook
from shared.core.bars import BarBuilder
from shared.core.events import LeverageTargetChanged, Reason
from shared.core.features import FeatureConfig, FeatureTracker
from shared.core.hedging import HedgingConfig, PositionChange, execute_netted
from shared.core.leverage import Controller
from shared.core.market import NS_PER_DAY, FundingRate, Tick
from shared.core.money import ZERO, to_step
from shared.core.regime import RegimeClassifier, RegimeConfig, RegimeState
from shared.core.venue import InstrumentSpec, PerpVenue, VenueConfig


class SignalPipeline:
    """Per-symbol signal state; a regime comes out on the tick that closes a bar."""

    __slots__ = ("bars", "classifier", "features")

    def __init__(self, symbol: str, features: FeatureConfig, regime: RegimeConfig) -> None:
        self.bars = BarBuilder(symbol, features.bar_seconds * 1_000_000_000)
        self.features = FeatureTracker(features)
        self.classifier = RegimeClassifier(regime)

    def on_tick(self, ts_ns: int, price: Decimal) -> RegimeState | None:
        bar = self.bars.on_tick(ts_ns, price)
        if bar is None:
            return None
        interval = self.bars.interval_ns
        return self.classifier.update(
            self.features.update(bar.open_ts_ns + interval, float(bar.close))
        )

    def snapshot(self) -> dict[str, object]:
        return {
            "bars": self.bars.snapshot(),
            "features": self.features.snapshot(),
            "classifier": self.classifier.snapshot(),
        }

    @classmethod
    def restore(
        cls, symbol: str, features: FeatureConfig, regime: RegimeConfig, snapshot: dict[str, object]
    ) -> SignalPipeline:
        pipeline = cls(symbol, features, regime)
        pipeline.bars = BarBuilder.restore(_dict(snapshot["bars"]))
        pipeline.features = FeatureTracker.restore(features, _dict(snapshot["features"]))
        pipeline.classifier = RegimeClassifier.restore(regime, _dict(snapshot["classifier"]))
        return pipeline


def _dict(value: object) -> dict[str, object]:
    assert isinstance(value, dict)
    return value


class Engine:
    """The products of one venue account: policy decisions, netted hedging, books."""

    __slots__ = (
        "_fee_ts",
        "books",
        "check_books",
        "controllers",
        "hedging",
        "mark",
        "mark_f",
        "price",
        "spec",
        "venue",
    )

    def __init__(
        self,
        spec: InstrumentSpec,
        venue: VenueConfig,
        hedging: HedgingConfig,
        accounting: AccountingConfig,
        controllers: Sequence[Controller],
        check_books: bool = True,
    ) -> None:
        self.spec = spec
        self.venue = PerpVenue(spec, venue)
        self.hedging = hedging
        self.controllers = list(controllers)
        self.books = Books(
            accounting, [ProductBook(c.product, spec.symbol, c.side) for c in self.controllers]
        )
        self.check_books = check_books
        self.price = ZERO
        self.mark = ZERO
        self.mark_f = 0.0
        self._fee_ts: int | None = None

    def on_tick(self, tick: Tick, regime: RegimeState | None) -> list[object]:
        """Mark, then decide: a closed bar runs the policy, any tick may fire an emergency."""
        ts_ns = tick.ts_ns
        price = self.price = tick.price
        price_f = float(price)
        mark = tick.mark_price
        if mark is None:
            self.mark, mark_f = price, price_f
        else:
            self.mark, mark_f = mark, float(mark)
        self.mark_f = mark_f
        events: list[object] = []
        if self.venue.at_risk(mark_f):
            self._liquidate(ts_ns, events)
        if regime is None:
            decisions = [
                d for c in self.controllers if (d := c.on_tick(ts_ns, price, mark_f)) is not None
            ]
        else:
            self._accrue_management_fee(ts_ns, events)
            decisions = [
                d
                for c in self.controllers
                if (d := c.on_bar(ts_ns, price, mark_f, regime)) is not None
            ]
        moved_money = bool(events)
        if decisions:
            events.extend(decisions)
            moved_money |= self._rebalance(ts_ns, [d for d in decisions if d.rebalance], events)
        if moved_money and self.check_books:
            self.books.check_balanced(self.venue, price)
        return events

    def _liquidate(self, ts_ns: int, events: list[object]) -> None:
        liquidation = self.venue.check_liquidation(ts_ns, self.mark)
        if liquidation is not None:
            claims = self.books.apply_liquidation(liquidation)
            self.venue.transfer(sum((c.amount for c in claims), ZERO))
            events.append(liquidation)
            events.extend(claims)

    def _accrue_management_fee(self, ts_ns: int, events: list[object]) -> None:
        """Once per UTC day, on the first closed bar of the day."""
        if self._fee_ts is None:
            self._fee_ts = ts_ns
        elif ts_ns // NS_PER_DAY != self._fee_ts // NS_PER_DAY:
            fees = self.books.accrue_management_fee(ts_ns, self.price, ts_ns - self._fee_ts)
            if fees:
                self.venue.transfer(-sum((f.amount for f in fees), ZERO))
                events.extend(fees)
            self._fee_ts = ts_ns

    def on_funding(self, funding: FundingRate) -> list[object]:
        if self.venue.position == 0 or self.mark == 0:
            return []
        amount = self.venue.settle_funding(funding.rate, self.mark)
        event = self.books.funding(self.spec.symbol, funding.ts_ns, funding.rate, self.mark, amount)
        if self.check_books:
            self.books.check_balanced(self.venue, self.price)
        return [event]

    def deposit(self, product: str, amount: Decimal, ts_ns: int) -> list[object]:
        """A user's money buys units at the current NAV and is hedged at once."""
        issued = self.books.issue(product, amount, self.price, ts_ns)
        self.venue.transfer(amount - issued.fee)
        return self._after_order(product, ts_ns, issued)

    def redeem(self, product: str, units: Decimal, ts_ns: int) -> list[object]:
        redeemed = self.books.redeem(product, units, self.price, ts_ns)
        self.venue.transfer(-redeemed.gross)
        return self._after_order(product, ts_ns, redeemed)

    def _after_order(self, product: str, ts_ns: int, event: object) -> list[object]:
        decision = self._controller(product).rebalance_now(
            ts_ns, self.price, self.mark_f, Reason.ORDER_FLOW
        )
        events: list[object] = [event, decision]
        self._rebalance(ts_ns, [decision], events)
        if self.check_books:
            self.books.check_balanced(self.venue, self.price)
        return events

    def _rebalance(
        self, ts_ns: int, decisions: list[LeverageTargetChanged], events: list[object]
    ) -> bool:
        """Bring the decided products to target in one netted order; True if money moved."""
        if not decisions:
            return False
        price = self.price
        emergencies = [d.product for d in decisions if d.emergency]
        moved = self._cover_gaps(emergencies, ts_ns, events)
        changes = []
        for decision in decisions:
            book = self.books.products[decision.product]
            equity = book.equity(price)
            wanted = ZERO
            if equity > 0:
                wanted = to_step(
                    decision.side * decision.target * equity / price, self.spec.lot_step
                )
            if wanted != book.qty:
                changes.append(PositionChange(decision.product, wanted - book.qty))
        if changes:
            hedge = execute_netted(self.venue, ts_ns, changes, price, self.hedging)
            self.books.apply_hedge(hedge)
            events.append(hedge)
            moved = True
            # The emergency trade's own costs must not take a gapped product below its floor.
            self._cover_gaps(emergencies, ts_ns, events)
        for decision in decisions:
            controller = self._controller(decision.product)
            self.books.mark_rebalanced(decision.product, price, controller.floor_fraction())
        return moved

    def _cover_gaps(self, products: list[str], ts_ns: int, events: list[object]) -> bool:
        paid = False
        for product in products:
            claim = self.books.cover_gap(product, self.price, ts_ns)
            if claim is not None:
                self.venue.transfer(claim.amount)
                events.append(claim)
                paid = True
        return paid

    def _controller(self, product: str) -> Controller:
        return next(c for c in self.controllers if c.product == product)

    def nav(self, product: str) -> Decimal:
        return self.books.products[product].nav(self.price)

    def snapshot(self) -> dict[str, object]:
        return {
            "v": 1,
            "price": str(self.price),
            "mark": str(self.mark),
            "fee_ts": self._fee_ts,
            "venue": self.venue.snapshot(),
            "books": self.books.snapshot(),
            "controllers": [c.snapshot() for c in self.controllers],
        }

    def restore_state(self, snapshot: dict[str, object], controllers: Sequence[Controller]) -> None:
        """Load a snapshot into this engine; `controllers` are restored by the caller."""
        self.price = Decimal(str(snapshot["price"]))
        self.mark = Decimal(str(snapshot["mark"]))
        self.mark_f = float(self.mark)
        fee_ts = snapshot["fee_ts"]
        self._fee_ts = fee_ts if isinstance(fee_ts, int) else None
        self.venue = PerpVenue.restore(self.spec, self.venue.config, _dict(snapshot["venue"]))
        self.books = Books.restore(self.books.config, _dict(snapshot["books"]))
        self.controllers = list(controllers)
