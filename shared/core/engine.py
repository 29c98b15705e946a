"""The core's one code path: ticks -> bars -> features -> regime -> targets -> hedge -> NAV.

Three stages, each a service in production and one call each in the backtester:
- `SignalPipeline`: a symbol's ticks -> a regime state on every closed bar (regime);
- `decide`: the products' leverage controllers -> target decisions (leverage targeting);
- `Engine`: decisions -> netted venue orders and the products' books (hedging and NAV).
`Strategy` chains the last two for the backtester, so both run the very same functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from shared.core.accounting import AccountingConfig, Books, ProductBook
from shared.core.bars import BarBuilder
from shared.core.events import (
    FundMove,
    HedgeAllocation,
    HedgeExecuted,
    LeverageTargetChanged,
    into_product,
)
from shared.core.features import FeatureConfig, FeatureTracker, SnapshotIncompatible
from shared.core.hedging import (
    HedgingConfig,
    PositionChange,
    execute_netted,
    netted_cost,
    plan_slices,
)
from shared.core.leverage import Controller, funding_drawn, model_leverage
from shared.core.market import NS_PER_DAY, NS_PER_SECOND, FundingRate, Side, Tick
from shared.core.money import ZERO, allocate, to_step
from shared.core.regime import RegimeClassifier, RegimeConfig, RegimeState
from shared.core.venue import InstrumentSpec, Venue


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
        # SnapshotIncompatible if the configuration moved (the features keep theirs) ...
        pipeline.features = FeatureTracker.restore(features, _dict(snapshot["features"]))
        pipeline.classifier = RegimeClassifier.restore(regime, _dict(snapshot["classifier"]))
        # ... so bars of another length under the same one are corruption
        pipeline.bars = restore_bars(features, _dict(snapshot["bars"]), corrupt=True)
        return pipeline


def restore_bars(
    features: FeatureConfig, snapshot: dict[str, object], *, corrupt: bool
) -> BarBuilder:
    """A bar builder from its snapshot (which keeps its own interval); bars of another
    length are SnapshotIncompatible, or a plain ValueError when the caller knows the
    configuration did not move (`corrupt`)."""
    bars = BarBuilder.restore(snapshot)
    if bars.interval_ns != features.bar_seconds * NS_PER_SECOND:
        error = ValueError if corrupt else SnapshotIncompatible
        raise error(f"snapshot bars of {bars.interval_ns} ns, not {features.bar_seconds} s")
    return bars


def _dict(value: object) -> dict[str, object]:
    assert isinstance(value, dict)
    return value


ENGINE_SNAPSHOT_VERSION = 2  # 2: anchors carry what funding drew (reliability 154)


def _anchor_entry(value: object) -> tuple[float, float, float]:
    """(leverage, price, drawn); a version 1 snapshot's anchors have no drawn (0)."""
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise ValueError(f"an anchor is [leverage, price, drawn], not {value!r}")
    return float(value[0]), float(value[1]), float(value[2]) if len(value) == 3 else 0.0


def decide(
    controllers: Sequence[Controller],
    ts_ns: int,
    price: Decimal,
    risk_price: float,
    regime: RegimeState | None,
) -> list[LeverageTargetChanged]:
    """A closed bar runs the policy; any other tick only checks the emergency rules."""
    if regime is None:
        return [d for c in controllers if (d := c.on_tick(ts_ns, price, risk_price)) is not None]
    return [d for c in controllers if (d := c.on_bar(ts_ns, price, risk_price, regime)) is not None]


def funding_paid(controllers: Sequence[Controller], funding: FundingRate, mark: float) -> None:
    """Each controller models the settlement at the last mark, as the books charge it
    (`Engine.on_funding`): the next tick's rules see the leverage it moved."""
    rate = float(funding.rate)
    for controller in controllers:
        controller.on_funding(rate, mark)


def risk_price(tick: Tick) -> float:
    """The price the risk rules watch: the venue's mark when the tick carries it."""
    return float(tick.price if tick.mark_price is None else tick.mark_price)


@dataclass(frozen=True, slots=True)
class ProductSpec:
    """A product as the books see it; `gap_floor` is the share of equity at the last
    rebalance that insurance guarantees after a gap (0: not insured, as a benchmark)."""

    product: str
    side: Side
    initial_target: Decimal
    gap_floor: Decimal


# A rebalance's costs as estimated, times this (`Engine._rebalance`): sized on them, the
# sizes move, and so do the costs and their shares (a product cutting back sells more,
# which costs more; ~0.5% of them at 5x): an estimate a little high leaves the books at
# or just under target (~1e-5 of it), never above.
COST_ALLOWANCE = Decimal("1.1")


class Engine:
    """The products of one venue account: netted hedging of decisions, and the books."""

    __slots__ = (
        "_fee_ts",
        "_insured",
        "anchors",
        "books",
        "check_books",
        "floors",
        "hedging",
        "mark",
        "price",
        "spec",
        "targets",
        "venue",
    )

    def __init__(
        self,
        venue: Venue,
        hedging: HedgingConfig,
        accounting: AccountingConfig,
        products: Sequence[ProductSpec],
        check_books: bool = True,
    ) -> None:
        self.spec: InstrumentSpec = venue.spec
        self.venue = venue
        self.hedging = hedging
        self.books = Books(
            accounting, [ProductBook(p.product, self.spec.symbol, p.side) for p in products]
        )
        self.targets = {p.product: p.initial_target for p in products}
        # product -> (leverage, risk price) of its controller's last rebalance, and the
        # funding its model drew since (`modelled`)
        self.anchors: dict[str, tuple[float, float, float]] = {}
        self.floors = {p.product: p.gap_floor for p in products}
        self._insured = [p.product for p in products if p.gap_floor > 0]
        self.check_books = check_books
        self.price = ZERO
        self.mark = ZERO
        self._fee_ts: int | None = None

    def on_tick(
        self, tick: Tick, decisions: Sequence[LeverageTargetChanged], bar_closed: bool
    ) -> list[object]:
        """Mark; liquidation rule; the insured products' floors at this price, before
        anything sizes on their equity (`Books.advance_floor`: ETH printed 323 on
        2020-03-13 against a mark of 96.6, and a short's NAV was -177.87 on that tick);
        on a closed bar the management fee; then execute."""
        ts_ns = tick.ts_ns
        price = self.price = tick.price
        self.mark = price if tick.mark_price is None else tick.mark_price
        events: list[object] = []
        if self.venue.at_risk(float(self.mark)):
            self._liquidate(ts_ns, events)
        emergencies = {d.product for d in decisions if d.emergency}
        for product in self._insured:  # before anything sizes on their equity
            # a gap the rules saw is no advance: the emergency's own cover pays it
            advanced = self.books.advance_floor(
                product, price, ts_ns, may_advance=product not in emergencies
            )
            self._with_fund(advanced, events)
        if bar_closed:
            self._accrue_management_fee(ts_ns, events)
        moved_money = bool(events)
        if decisions:
            events.extend(decisions)
            for decision in decisions:
                self.targets[decision.product] = decision.target
                if decision.rebalance:  # moves the rules' anchor, or (none given) voids it
                    self._move_anchor(decision)
            moved_money |= self._rebalance(
                ts_ns, [(d.product, d.emergency) for d in decisions if d.rebalance], events
            )
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
        """Every product pays or receives its own position's funding. Netted to zero at
        the venue, the long still pays the short (their amounts sum to the venue's 0).
        Each anchor's model draws it too, as its controller's does (`funding_paid`)."""
        if self.mark == 0:
            return []
        mark, rate = float(self.mark), float(funding.rate)
        for product, (leverage, price, drawn) in self.anchors.items():
            side = self.books.products[product].side
            drawn += funding_drawn(side, leverage, price, mark, rate)
            self.anchors[product] = (leverage, price, drawn)
        if not any(b.qty for b in self.books.products.values()):
            return []
        amount = self.venue.settle_funding(funding.rate, self.mark) if self.venue.position else ZERO
        events: list[object] = [
            self.books.funding(self.spec.symbol, funding.ts_ns, funding.rate, self.mark, amount)
        ]
        for product in self._insured:  # a product an advance holds on its floor pays too
            advanced = self.books.advance_floor(product, self.price, funding.ts_ns)
            self._with_fund(advanced, events)
        if self.check_books:
            self.books.check_balanced(self.venue, self.price)
        return events

    def deposit(
        self,
        product: str,
        amount: Decimal,
        ts_ns: int,
        nav: Decimal | None = None,
        quoted_units: Decimal | None = None,
    ) -> list[object]:
        """A user's money buys units at the current NAV (a product with no position has
        the same NAV at any price), or at the `nav` the gateway quoted, and is hedged at
        once (`_after_order`). An order the books would settle otherwise than `quoted_units`
        raises QuoteMismatch, one quoted outside the books' band QuoteOutOfBand, before
        the venue hears of it."""
        if nav is not None:
            self.books.check_quote(product, nav, self.price, self.mark)
        before = self._size(product)
        issued = self.books.issue(product, amount, self.price, ts_ns, nav, quoted_units)
        self.venue.transfer(amount - issued.fee)
        return self._after_order(product, ts_ns, issued, before)

    def redeem(
        self,
        product: str,
        units: Decimal,
        ts_ns: int,
        nav: Decimal | None = None,
        quoted_payout: Decimal | None = None,
    ) -> list[object]:
        if nav is not None:
            self.books.check_quote(product, nav, self.price, self.mark)
        before = self._size(product)
        redeemed = self.books.redeem(product, units, self.price, ts_ns, nav, quoted_payout)
        return self._after_order(product, ts_ns, redeemed, before, withdraw=redeemed.gross)

    def _size(self, product: str) -> tuple[Decimal, Decimal]:
        """(equity, units) of the product before an order."""
        book = self.books.products[product]
        return (book.equity(self.price) if self.price else ZERO), book.units

    def _after_order(
        self,
        product: str,
        ts_ns: int,
        event: object,
        before: tuple[Decimal, Decimal],
        withdraw: Decimal = ZERO,
    ) -> list[object]:
        """Hedge the order at once, at the product's own leverage: its position moves with
        its equity, its insurance floor with its units. Re-levering it to target instead
        would move the leverage its controller tracks from the last rebalance, unseen, and
        with it the emergency trigger (a deposit after a rally took a 5x product to 60x on
        the way back down, NAV below zero). A product with no position yet goes to the
        leverage its controller models (`modelled`: its target before any rebalance);
        before the first price, the first tick does it. A close paid at a quoted NAV the
        market has since left behind can take more than the product holds: the insurance
        fund then restores the remaining holders' floor (the one they held, moved with
        their units), as after a gap, and a position that left unwound is built again.
        One that left no units unwinds the whole position, and the fund squares what
        equity is left (kept, it was an unowned position and the next depositor's gain
        or loss). A close's payout (`withdraw`) leaves the account once the position is
        cut to what stays: taken first, it left the account under its maintenance margin
        through the whole unwind (a 99.9% close of a 5x product: ~5,000x, equity below
        zero between slices), a withdrawal a real exchange refuses."""
        events: list[object] = [event]
        if self.price:
            equity_before, units_before = before
            book = self.books.products[product]
            if book.units and units_before and book.insurance_owed:
                ratio = book.units / units_before
                self._while_advanced(product, ts_ns, ratio, equity_before, events)
            elif not book.units:
                self.books.forgive_advance(product)
                if book.qty:
                    self._execute_covered(
                        product,
                        -book.qty,
                        ts_ns,
                        events,
                        lambda: self._with_fund(
                            self.books.cover_loss(product, self.price, ts_ns), events
                        ),
                    )
                self._with_fund(self.books.square_empty(product, self.price, ts_ns), events)
            else:
                if not units_before:  # nobody held a floor; the rebuild sets one
                    self.books.scale_floor(product, ZERO)
                elif book.units < units_before:  # the floor of those who stay
                    self.books.scale_floor(product, book.units / units_before)
                else:  # new money, insured as a rebalance insures it
                    added = book.equity(self.price) - equity_before
                    self.books.insure_deposit(product, added, self.floors[product])
                kept = ZERO
                if book.qty and equity_before > 0 and units_before:
                    # its own leverage, on the equity the trade leaves, and at the mark
                    # the one it had there (the mark lags the last trade by seconds: capped
                    # at the last trade's, every order trimmed the position again)
                    per_equity = book.qty / equity_before
                    held_at_mark = 1 + per_equity * (self.mark - self.price)  # equity ratio
                    # (none at the mark, its other product holding the account up: the
                    # leverage at the last trade)
                    at_mark = abs(per_equity) * (
                        self.mark / held_at_mark if held_at_mark > 0 else self.price
                    )
                    kept = self._sized(product, ts_ns, per_equity, at_mark)
                if kept:  # moved with its equity
                    rescued = kept != book.qty and self._execute_covered(
                        product,
                        kept - book.qty,
                        ts_ns,
                        events,
                        lambda: self._cover_gaps([product], ts_ns, events),
                    )
                    if self._cover_gaps([product], ts_ns, events) or rescued:  # as by a gap
                        self._floor_anew(product, ts_ns, events)
                else:  # none, or none left (the close took all its equity): built anew
                    self._rebuild(product, ts_ns, events)
        if withdraw:
            self.venue.transfer(-withdraw)
        if self.check_books:
            self.books.check_balanced(self.venue, self.price)
        return events

    def _while_advanced(
        self,
        product: str,
        ts_ns: int,
        ratio: Decimal,
        equity_before: Decimal,
        events: list[object],
    ) -> None:
        """An order while the product is held up by an advance, at a print the mark
        ignores: sized at that print, it was rebuilt there, making the print's loss real,
        and the whole advance a claim (a 1e-8-unit close of a 3x short at a print 3.3x
        its mark cost the holders 97% and the fund 5.9M once the print reverted). The
        position moves with the units instead: a close sells its share, and only its
        share of the advance, paid out to it, becomes a claim; a deposit's money waits
        unhedged (lower leverage) for the rules, which watch the mark."""
        book = self.books.products[product]
        if ratio < 1:
            self.books.scale_advance(product, ratio)
            self.books.scale_floor(product, ratio)
            kept = to_step(book.qty * ratio, self.spec.lot_step)
            if kept != book.qty:
                self._execute_covered(
                    product,
                    kept - book.qty,
                    ts_ns,
                    events,
                    lambda: self._cover_gaps([product], ts_ns, events),
                )
            # a close quoted before the print paid out more than the product holds at it:
            # the fund restores the floor of those who stay
            self._cover_gaps([product], ts_ns, events)
        else:
            added = book.equity(self.price) - equity_before
            self.books.insure_deposit(product, added, self.floors[product])

    def _sized(self, product: str, ts_ns: int, per_equity: Decimal, at_mark: Decimal) -> Decimal:
        """`per_equity` (contracts per USDT) times the product's equity as the trade to
        that size leaves it: net of the trade's own fees and slippage, which are the
        product's (DESIGN section 1), and never below its floor, which the fund restores
        after the trade. Sized before those costs, a large holder's exit left the holders
        who stay far above their leverage, unseen by the rules, which model it from the
        price (99% of a 5x product's units closed: 3,163 USDT of cost against 10,000,
        7.3x; 99.9%: 497x). Where the mark is the worse price, also within `at_mark` at
        the mark: a 5x short built at a print 20% under the mark was insolvent at it, and
        the next tick liquidated the account. Zero when nothing is left to hold."""
        book, price, lot = self.books.products[product], self.price, self.spec.lot_step

        def affordable(qty: Decimal) -> Decimal:
            """The size the equity a trade to `qty` leaves can hold (zero: none)."""
            cost = (
                netted_cost(self.venue, ts_ns, qty - book.qty, price, self.hedging) if qty else ZERO
            )
            held = max(book.equity(price) - cost, book.equity_floor)
            if held <= 0:
                return ZERO
            return self._held_at_mark(to_step(per_equity * held, lot), held, at_mark)

        wanted = affordable(book.qty)
        wanted = affordable(wanted) if wanted != book.qty else wanted
        # a larger trade costs more (an exit unwinds more as less is kept): step down
        # to the largest size the equity it leaves still holds, by halving
        if abs(affordable(wanted)) < abs(wanted):
            low, high = ZERO, abs(wanted) / lot
            while high - low > 1:
                middle = ((low + high) / 2).to_integral_value()
                size = middle * lot * (1 if wanted > 0 else -1)
                low, high = (middle, high) if abs(affordable(size)) >= abs(size) else (low, middle)
            wanted = low * lot * (1 if wanted > 0 else -1)
        return wanted

    def _held_at_mark(self, qty: Decimal, equity: Decimal, leverage: Decimal) -> Decimal:
        """`qty`, cut where the mark is the worse price to what `equity` holds at
        `leverage` at the mark too: `equity + qty (mark - price)` must hold `|qty| mark`.
        Sized at the last trade alone, a 5x long rebuilt at a print twice the mark was
        insolvent at the mark, and the next tick liquidated the account."""
        against = self.mark - self.price if qty > 0 else self.price - self.mark
        if against >= 0 or not qty:
            return qty
        cap = to_step(leverage * equity / (self.mark - leverage * against), self.spec.lot_step)
        return min(abs(qty), cap) * (1 if qty > 0 else -1)

    def _rebuild(self, product: str, ts_ns: int, events: list[object]) -> None:
        """The product built anew at the leverage its controller models, as an emergency
        is: the fund restores the floor of the holders who stay before the trade and
        after it (what the trade cost a position too large for what is left), then the
        floor is set anew from the equity it holds."""
        book = self.books.products[product]
        self._cover_gaps([product], ts_ns, events)
        modelled = self.modelled(product)
        wanted = self._sized(product, ts_ns, book.side * modelled / self.price, modelled)
        if wanted != book.qty:
            self._execute(ts_ns, [PositionChange(product, wanted - book.qty)], events)
        self._cover_gaps([product], ts_ns, events)
        self._floor_anew(product, ts_ns, events)

    def _floor_anew(self, product: str, ts_ns: int, events: list[object]) -> bool:
        """The floor set from the equity the product holds after a rebalance, or an order
        that rescued or rebuilt it; covered if that is below one NAV quantum per unit (the
        floor's least), or the NAV stood at 0 until the next tick. True if the fund paid."""
        self.books.mark_rebalanced(product, self.price, self.floors[product])
        return self._cover_gaps([product], ts_ns, events)

    def _execute_covered(
        self,
        product: str,
        change: Decimal,
        ts_ns: int,
        events: list[object],
        cover: Callable[[], bool],
    ) -> bool:
        """An order's `change` to its product's position, as one netted order unless it
        turns the account's net position (the other product holds the other side): then
        the part that takes the account to zero (reducing: taken whatever the margin),
        `cover` (the fund makes the product whole at the price it traded at), and the
        rest, which the venue margins at the mark, one HedgeExecuted for both (an event's
        update carries one). At a print the mark ignores, a large product's buy-back
        there left the account's equity at the mark below zero until the fund's claim
        after the trade: the venue refused the turning slice, and hedging halted. True
        if `cover` paid."""
        net = self.venue.position
        if not net or (net + change) * net >= 0:
            self._execute(ts_ns, [PositionChange(product, change)], events)
            return False
        # The slices one order of the whole change plans, the one that reaches zero cut
        # there: those before it keep the venue call ids and requests an event begun by
        # a build before 251 recorded, so a symbol that build halted finishes its event
        # (sliced afresh, they differed from the first, refused as reused ids).
        slices = plan_slices(
            change, self.price, self.spec.lot_step, self.hedging.max_slice_notional
        )
        held, taken = net, 0
        while (held + slices[taken]) * net > 0:
            held += slices[taken]
            taken += 1
        before, after = [*slices[:taken], -held], [slices[taken] + held, *slices[taken + 1 :]]
        self._execute(ts_ns, [PositionChange(product, -net)], events, [q for q in before if q])
        first = len(events) - 1
        paid = cover()
        self._execute(
            ts_ns, [PositionChange(product, change + net)], events, [q for q in after if q]
        )
        second, earlier = events.pop(), events[first]
        assert isinstance(earlier, HedgeExecuted) and isinstance(second, HedgeExecuted)
        events[first] = _merged(earlier, second)
        return paid

    def _execute(
        self,
        ts_ns: int,
        changes: list[PositionChange],
        events: list[object],
        slices: list[Decimal] | None = None,
    ) -> None:
        """One netted order at the venue for `changes` (in `slices`, else as it plans
        them), allocated to the products' books."""
        mark = self.mark or None  # none before the first tick: the venue judges at the price
        hedge = execute_netted(self.venue, ts_ns, changes, self.price, self.hedging, mark, slices)
        self.books.apply_hedge(hedge)
        events.append(hedge)

    def _move_anchor(self, decision: LeverageTargetChanged) -> None:
        if decision.anchor is None:  # a fixed benchmark, or a decision from before anchors
            self.anchors.pop(decision.product, None)
        else:
            self.anchors[decision.product] = (float(decision.target), decision.anchor, 0.0)

    def modelled(self, product: str) -> Decimal:
        """The leverage a product with no position is built at: the one its controller
        models at the current mark, so the emergency rules, anchored at the controller's
        last rebalance, watch the position it holds, and never above its target. Built at
        its target instead, a deposit into an empty 3x long after a 50% rally stood at 3x
        while the rules modelled 1.8x, and fired ~40% lower instead of 10%. Below the
        model is safe (a smaller position's leverage stays below the modelled one at every
        later price: the rules fire early, never late). The target when there is no anchor
        (a fixed benchmark, or no rebalance yet) or no finite model."""
        target = self.targets[product]
        anchor = self.anchors.get(product)
        if anchor is None:
            return target
        side = self.books.products[product].side
        leverage = model_leverage(side, anchor[0], anchor[1], float(self.mark), anchor[2])
        return min(Decimal(repr(leverage)), target) if 0 < leverage < math.inf else target

    def _rebalance(
        self,
        ts_ns: int,
        requests: list[tuple[str, bool]],
        events: list[object],
        leverage: Decimal | None = None,
    ) -> bool:
        """Bring (product, emergency) requests to target (or to `leverage`) in one netted
        order, each sized on the equity its share of the order's costs leaves: the rules
        model a rebalance as reaching its target, and sized before its costs one left
        the books above it, where funding then took them past the ceiling unseen. The
        costs are estimated once, for the sizes before them, with COST_ALLOWANCE, and
        shared as `execute_netted` shares them (by size); True if money moved."""
        if not requests:
            return False
        price = self.price
        emergencies = [product for product, emergency in requests if emergency]
        moved = self._cover_gaps(emergencies, ts_ns, events)
        sized = {product: self._at_target(product, leverage, ZERO) for product, _ in requests}
        moving = {p: q - self.books.products[p].qty for p, q in sized.items()}
        moving = {p: change for p, change in moving.items() if change}
        net = sum(moving.values(), ZERO)
        if net:
            cost = netted_cost(self.venue, ts_ns, net, price, self.hedging) * COST_ALLOWANCE
            shares = allocate(cost, [abs(change) for change in moving.values()])
            for product, share in zip(moving, shares, strict=True):
                sized[product] = self._at_target(product, leverage, share)
        changes = [
            PositionChange(product, qty - self.books.products[product].qty)
            for product, qty in sized.items()
            if qty != self.books.products[product].qty
        ]
        if changes:
            self._execute(ts_ns, changes, events)
            moved = True
            # The emergency trade's own costs must not take a gapped product below its floor.
            self._cover_gaps(emergencies, ts_ns, events)
        for product, _ in requests:
            self.books.forgive_advance(product)
            moved |= self._floor_anew(product, ts_ns, events)
        return moved

    def _at_target(self, product: str, leverage: Decimal | None, cost: Decimal) -> Decimal:
        """The product's position at its target (or `leverage`) on its equity less `cost`
        (whole lots toward zero; within it at the mark too); none without equity."""
        book = self.books.products[product]
        equity = book.equity(self.price) - cost
        if equity <= 0:
            return ZERO
        at = self.targets[product] if leverage is None else leverage
        wanted = to_step(book.side * at * equity / self.price, self.spec.lot_step)
        return self._held_at_mark(wanted, equity, at)

    def _cover_gaps(self, products: list[str], ts_ns: int, events: list[object]) -> bool:
        paid = False
        for product in products:
            paid |= self._with_fund(self.books.cover_gap(product, self.price, ts_ns), events)
        return paid

    def _with_fund(self, moved: FundMove | None, events: list[object]) -> bool:
        """Move what the insurance fund paid into (a claim, an advance) or took out of
        (a repayment, unheld equity) a product's books through the venue account; True
        if it moved anything."""
        if moved is None:
            return False
        self.venue.transfer(into_product(moved))
        events.append(moved)
        return True

    def nav(self, product: str) -> Decimal:
        return self.books.products[product].nav(self.price)

    def snapshot(self) -> dict[str, object]:
        """The books and this engine's marks; the venue keeps its own state."""
        return {
            "v": ENGINE_SNAPSHOT_VERSION,
            "price": str(self.price),
            "mark": str(self.mark),
            "fee_ts": self._fee_ts,
            "targets": {p: str(t) for p, t in self.targets.items()},
            "anchors": {p: list(a) for p, a in self.anchors.items()},
            "books": self.books.snapshot(),
        }

    def restore_state(self, snapshot: dict[str, object]) -> None:
        """A snapshot of this version or an older one; a newer one (written by a later
        release: a rollback) is SnapshotIncompatible, not read as far as it goes."""
        version = snapshot.get("v")
        if not isinstance(version, int) or not 1 <= version <= ENGINE_SNAPSHOT_VERSION:
            raise SnapshotIncompatible(
                f"engine snapshot version {version!r}: this release reads 1 to "
                f"{ENGINE_SNAPSHOT_VERSION}; run the release that wrote it"
            )
        self.price = Decimal(str(snapshot["price"]))
        self.mark = Decimal(str(snapshot["mark"]))
        fee_ts = snapshot["fee_ts"]
        self._fee_ts = fee_ts if isinstance(fee_ts, int) else None
        targets = _dict(snapshot["targets"])
        self.targets = {p: Decimal(str(t)) for p, t in targets.items()}
        anchors = _dict(snapshot.get("anchors", {}))  # none in a snapshot from before them
        self.anchors = {p: _anchor_entry(a) for p, a in anchors.items()}
        self.books = Books.restore(self.books.config, _dict(snapshot["books"]))


class Strategy:
    """Leverage decisions and their execution for one venue account, chained as the
    backtester runs them (the services run the same two halves in two processes)."""

    __slots__ = ("controllers", "engine")

    def __init__(self, controllers: Sequence[Controller], engine: Engine) -> None:
        self.controllers = list(controllers)
        self.engine = engine

    def on_tick(self, tick: Tick, regime: RegimeState | None) -> list[object]:
        decisions = decide(self.controllers, tick.ts_ns, tick.price, risk_price(tick), regime)
        return self.engine.on_tick(tick, decisions, regime is not None)

    def on_funding(self, funding: FundingRate) -> list[object]:
        funding_paid(self.controllers, funding, float(self.engine.mark))
        return self.engine.on_funding(funding)


def _merged(first: HedgeExecuted, second: HedgeExecuted) -> HedgeExecuted:
    """Two netted orders of one event as one hedge: their fills, and each product's
    share summed (the books took each part as it went)."""
    shares: dict[str, HedgeAllocation] = {}
    for a in first.allocations + second.allocations:
        held = shares.get(a.product)
        shares[a.product] = (
            a
            if held is None
            else HedgeAllocation(
                a.product,
                held.qty + a.qty,
                held.notional + a.notional,
                held.slippage + a.slippage,
                held.fee + a.fee,
            )
        )
    return replace(
        first,
        net_qty=first.net_qty + second.net_qty,
        fills=first.fills + second.fills,
        allocations=tuple(shares.values()),
    )
