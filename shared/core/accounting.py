"""NAV accounting: product units, equity and NAV, and the books-balance identity.

A product's equity is `cash + qty x price`: cash takes every flow (deposits, payouts,
trades at the reference price, slippage, fees, funding, management fee, insurance), so
mark-to-market needs no bookkeeping at all and stays exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from decimal import ROUND_CEILING, Decimal

from pydantic import BaseModel, ConfigDict, Field

from shared.core.events import (
    AccountLiquidated,
    FundingSettled,
    HedgeExecuted,
    InsuranceAdvanced,
    InsuranceClaimPaid,
    InsuranceRepaid,
    ManagementFeeAccrued,
    ProductUnitsIssued,
    ProductUnitsRedeemed,
    UnheldEquityTaken,
)
from shared.core.market import NS_PER_YEAR, Side
from shared.core.money import (
    NAV_QUANTUM,
    USDT_QUANTUM,
    ZERO,
    MoneyError,
    allocate,
    nav_of,
    units_down,
    usdt_down,
)
from shared.core.venue import Venue

# The largest deposit one order may make (USDT): hedging builds its position in slices
# of at most `max_slice_notional`, and 1e30 asked for ~1e24 of them (the symbol halted
# on a MemoryError, and again after every restart). The gateway's max_order stays below.
MAX_DEPOSIT = Decimal(10**9)


class AccountingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # A whole number of NAV quanta: the gateway settles the first orders at it, and the
    # books refuse a quoted NAV finer than they keep one (services/hedging/messages.py).
    # At least 1: a NAV of a few quanta cannot move by less than a whole quantum's share
    # of itself, and at one quantum a deposit's hedge was sized on the floor (251).
    initial_nav: Decimal = Field(
        Decimal("100"), ge=1, decimal_places=8, description="NAV of a product's first unit."
    )
    open_fee: Decimal = Field(Decimal("0.001"), ge=0, lt=1, description="Fee rate on deposits.")
    close_fee: Decimal = Field(Decimal("0.001"), ge=0, lt=1, description="Fee rate on payouts.")
    management_fee: Decimal = Field(
        Decimal("0.02"), ge=0, lt=1, description="Annual management fee on equity, accrued per bar."
    )
    insurance_share: Decimal = Field(
        Decimal("0.2"), ge=0, le=1, description="Share of every platform fee paid into insurance."
    )
    # A circuit breaker against NAVs no honest quote could be (a corrupted or foreign
    # NAV hash: 1e30, 1e-8), not a fairness tolerance: a refused order was confirmed to
    # its user already (a dead letter: an operator's case), so honest quotes must pass
    # with room. They are up to the gateway's max_nav_age_s old and hedging may lag the
    # market: a 5x product's NAV halves in a 10% move, and a large close at a quote a
    # little stale moves the NAV of the units left far more (`check_quote`).
    quote_band: Decimal = Field(
        Decimal("10"),
        gt=1,
        le=1000,
        description="A quoted NAV more than this factor from every NAV the books allow is refused.",
    )


def issue_terms(
    amount: Decimal, nav: Decimal, fee_rate: Decimal
) -> tuple[Decimal, Decimal, Decimal]:
    """(fee, net, units) of a deposit of `amount` at `nav`: the one formula the gateway
    quotes and the books apply."""
    if amount <= 0:
        raise MoneyError(f"deposit must be > 0, got {amount}")
    if nav <= 0:
        raise MoneyError(f"NAV is {nav}, the product cannot take deposits")
    fee = usdt_down(amount * fee_rate)
    net = amount - fee
    units = units_down(net / nav)
    if units <= 0:
        raise MoneyError(f"deposit {amount} buys no units at NAV {nav}")
    return fee, net, units


def redeem_terms(units: Decimal, nav: Decimal, fee_rate: Decimal) -> tuple[Decimal, Decimal]:
    """(gross, fee) of redeeming `units` at `nav`; the user is paid gross - fee."""
    if units <= 0:
        raise MoneyError(f"units to redeem must be > 0, got {units}")
    if nav <= 0:
        raise MoneyError(f"NAV is {nav}, nothing can be paid out")
    gross = usdt_down(units * nav)
    return gross, usdt_down(gross * fee_rate)


class QuoteMismatch(MoneyError):
    """The books would settle an order otherwise than the gateway quoted it: a bug in one
    of them, so the order is refused whole (a dead letter), never half applied."""


class QuoteOutOfBand(MoneyError):
    """The gateway quoted a NAV the books' own rules out (outside `quote_band` of it):
    settled, it would hand the product's holders' or the insurance fund's money to one
    order. Refused whole (a dead letter, an operator's case)."""


class BooksOutOfBalance(AssertionError):
    """The books-balance identity broke: a bug, never to be papered over."""


@dataclass(slots=True)
class ProductBook:
    product: str
    symbol: str
    side: Side
    equity_floor: Decimal = ZERO
    units: Decimal = ZERO
    cash: Decimal = ZERO
    qty: Decimal = ZERO
    last_nav: Decimal = ZERO
    trading_fees: Decimal = ZERO
    slippage: Decimal = ZERO
    funding: Decimal = ZERO
    management_fees: Decimal = ZERO
    insurance_received: Decimal = ZERO
    insurance_owed: Decimal = ZERO  # advanced at a wick, taken back as equity recovers

    def equity(self, price: Decimal) -> Decimal:
        return self.cash + self.qty * price

    def nav(self, price: Decimal) -> Decimal:
        if self.units == 0:
            return self.last_nav
        return nav_of(self.equity(price), self.units)

    def leverage(self, price: Decimal) -> Decimal:
        equity = self.equity(price)
        if equity <= 0:
            return ZERO
        return abs(self.qty) * price / equity

    def to_dict(self) -> dict[str, object]:
        return {
            f.name: (str(v) if isinstance(v, Decimal) else v)
            for f in fields(self)
            if (v := getattr(self, f.name)) is not None
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ProductBook:
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = data.get(f.name, "0") if f.name == "insurance_owed" else data[f.name]
            if f.name == "side":
                values[f.name] = Side(int(str(raw)))
            elif f.name in ("product", "symbol"):
                values[f.name] = raw
            else:
                values[f.name] = Decimal(str(raw))
        return cls(**values)  # type: ignore[arg-type]


class Books:
    """All products of one venue account, plus the platform's fee and insurance balances."""

    __slots__ = ("config", "deposits", "insurance_fund", "payouts", "platform_fees", "products")

    def __init__(self, config: AccountingConfig, products: Iterable[ProductBook]) -> None:
        self.config = config
        self.products = {p.product: p for p in products}
        for book in self.products.values():
            if book.last_nav == 0:
                book.last_nav = config.initial_nav
        self.deposits = ZERO
        self.payouts = ZERO
        self.platform_fees = ZERO
        self.insurance_fund = ZERO

    def _collect_fee(self, fee: Decimal) -> None:
        to_insurance = usdt_down(fee * self.config.insurance_share)
        self.insurance_fund += to_insurance
        self.platform_fees += fee - to_insurance

    def issue(
        self,
        product: str,
        amount: Decimal,
        price: Decimal,
        ts_ns: int,
        nav: Decimal | None = None,
        quoted_units: Decimal | None = None,
    ) -> ProductUnitsIssued:
        """A deposit buys units at NAV: the product's own at `price`, or the `nav` an order
        gateway quoted the user (it settles at the NAV it showed; the books stay exact).
        `quoted_units`: what the gateway promised; the books issue exactly that or
        nothing (QuoteMismatch, before anything changes)."""
        book = self.products[product]
        nav = book.nav(price) if nav is None else nav
        fee, net, units = issue_terms(amount, nav, self.config.open_fee)
        if quoted_units is not None and units != quoted_units:
            raise QuoteMismatch(
                f"{product}: the books issue {units} units, the gateway quoted {quoted_units}"
            )
        book.units += units
        book.cash += net
        book.last_nav = nav
        self.deposits += amount
        self._collect_fee(fee)
        return ProductUnitsIssued(product, ts_ns, amount, fee, units, nav)

    def redeem(
        self,
        product: str,
        units: Decimal,
        price: Decimal,
        ts_ns: int,
        nav: Decimal | None = None,
        quoted_payout: Decimal | None = None,
    ) -> ProductUnitsRedeemed:
        """Pays `units x NAV - fee` (NAV and the quote as in `issue`); the gross leaves
        the equity."""
        book = self.products[product]
        if units > book.units:
            raise MoneyError(f"{product}: cannot redeem {units} of {book.units} units")
        nav = book.nav(price) if nav is None else nav
        gross, fee = redeem_terms(units, nav, self.config.close_fee)
        if quoted_payout is not None and gross - fee != quoted_payout:
            raise QuoteMismatch(
                f"{product}: the books pay out {gross - fee}, the gateway quoted {quoted_payout}"
            )
        book.units -= units
        book.cash -= gross
        book.last_nav = nav
        self.payouts += gross - fee
        self._collect_fee(fee)
        return ProductUnitsRedeemed(product, ts_ns, units, nav, gross, fee, gross - fee)

    def check_quote(self, product: str, quoted: Decimal, *prices: Decimal) -> None:
        """QuoteOutOfBand unless `quoted` lies within `quote_band` of one of the product's
        NAVs: at one of `prices` (the last trade, and the mark: at a print the mark
        ignores, the books' NAV there is held up by the fund, and a quote from before it
        is honest), as shown or without the fund's advance (`advance_floor`: repaid if
        the print reverts); or the NAV its last order settled at (orders in flight at one
        published NAV: a large close at it, a little stale, moved the NAV of the units
        left 7x in a review's case). A product without units (the order's are all there
        are: any NAV is fair) or without a price yet is not checked."""
        book = self.products[product]
        priced = [price for price in prices if price]
        if not book.units or not priced:
            return
        navs = {("last settled", book.last_nav)}
        for price in priced:
            navs.add((f"at {price}", book.nav(price)))
            navs.add((f"at {price}", nav_of(book.equity(price) - book.insurance_owed, book.units)))
        band = self.config.quote_band
        if not any(0 < nav / band <= quoted <= nav * band for _, nav in navs):
            shown = ", ".join(f"{nav} {where}" for where, nav in sorted(navs))
            raise QuoteOutOfBand(
                f"{product}: the gateway quoted NAV {quoted}, the books' is {shown}; a quote "
                f"must lie within a factor of {band} of one of them"
            )

    def apply_hedge(self, hedge: HedgeExecuted) -> None:
        for allocation in hedge.allocations:
            book = self.products[allocation.product]
            book.qty += allocation.qty
            book.cash -= allocation.notional + allocation.slippage + allocation.fee
            book.trading_fees += allocation.fee
            book.slippage += allocation.slippage

    def funding(
        self, symbol: str, ts_ns: int, rate: Decimal, mark: Decimal, venue_amount: Decimal
    ) -> FundingSettled:
        """Each product pays its own qty x mark x rate; they sum to the venue's amount."""
        allocations = []
        for book in self.products.values():
            if book.qty:
                amount = book.qty * mark * rate
                book.cash -= amount
                book.funding += amount
                allocations.append((book.product, amount))
        return FundingSettled(symbol, ts_ns, rate, mark, venue_amount, tuple(allocations))

    def accrue_management_fee(
        self, ts_ns: int, price: Decimal, elapsed_ns: int
    ) -> list[ManagementFeeAccrued]:
        if self.config.management_fee == 0 or elapsed_ns <= 0:
            return []
        fraction = self.config.management_fee * elapsed_ns / NS_PER_YEAR
        events = []
        for book in self.products.values():
            if book.units == 0:
                continue
            equity = book.equity(price)
            # never below the insured floor: a product held on its least floor (one NAV
            # quantum a unit) showed NAV 0 after the day's fee
            fee = usdt_down(min(equity * fraction, equity - book.equity_floor))
            if fee > 0:
                book.cash -= fee
                book.management_fees += fee
                self._collect_fee(fee)
                events.append(ManagementFeeAccrued(book.product, ts_ns, fee))
        return events

    def cover_gap(self, product: str, price: Decimal, ts_ns: int) -> InsuranceClaimPaid | None:
        """A gap jumped past the emergency trigger and took the product's equity below its
        floor (`gap_floor` of its equity at the last rebalance): the insurance fund brings
        it back to the floor, so its NAV stays above zero (DESIGN section 4). The holders
        bear the gap down to the floor; the fund, the rest."""
        book = self.products[product]
        equity = book.equity(price)
        if book.units == 0 or equity >= book.equity_floor:
            return None
        return self._pay_claim(book, book.equity_floor - equity, ts_ns, equity)

    def advance_floor(
        self, product: str, price: Decimal, ts_ns: int, may_advance: bool = True
    ) -> InsuranceAdvanced | InsuranceRepaid | None:
        """The rules watch the mark, so a wick it ignores forces no sale; the books value
        at the last trade, and the NAV must stay above zero at every price it is shown
        at. An insured product whose equity at `price` is below its floor gets the
        difference advanced by the fund; what it recovers above the floor later repays
        it first (a wick that reverts costs the fund nothing and gives the holders
        nothing; one the product rebalances at is paid for, as a gap is:
        `forgive_advance`)."""
        book = self.products[product]
        if not book.units:
            return None
        equity = book.equity(price)
        if equity < book.equity_floor:
            if not may_advance:
                return None
            amount = book.equity_floor - equity
            book.insurance_owed += amount
            self._pay_claim(book, amount, ts_ns, equity)
            return InsuranceAdvanced(product, ts_ns, amount, equity)
        if book.insurance_owed and equity > book.equity_floor:
            amount = min(book.insurance_owed, equity - book.equity_floor)
            book.insurance_owed -= amount
            self._pay_claim(book, -amount, ts_ns, equity)
            return InsuranceRepaid(product, ts_ns, amount, equity)
        return None

    def scale_advance(self, product: str, ratio: Decimal) -> None:
        """A close while an advance is owed: the closer was paid its share of the money
        advanced, which becomes a claim (as in `forgive_advance`); those left owe the rest."""
        book = self.products[product]
        book.insurance_owed = usdt_down(book.insurance_owed * ratio)

    def forgive_advance(self, product: str) -> None:
        """The product was sized (a rebalance) or emptied (its last holder left) on its
        equity as it is, advance included: what the fund advanced is now paid, as a claim
        is (`insurance_received` counted it when it was advanced)."""
        self.products[product].insurance_owed = ZERO

    def cover_loss(self, product: str, price: Decimal, ts_ns: int) -> InsuranceClaimPaid | None:
        """The last holder left and part of the position is unwound: the fund pays what
        the product's equity at `price` fell below zero before the rest goes (which the
        venue margins on the account), and `square_empty` settles the rest after it."""
        book = self.products[product]
        equity = book.equity(price)
        if book.units or equity >= 0:
            return None
        return self._pay_claim(book, -equity, ts_ns, equity)

    def square_empty(
        self, product: str, price: Decimal, ts_ns: int
    ) -> InsuranceClaimPaid | UnheldEquityTaken | None:
        """The last holder left (its position unwound): the insurance fund takes the
        product's equity to zero, paying what unwinding and a quote below the market cost
        it, or taking what a quote above the market left, so a later depositor neither
        pays for nor gains from what happened before it."""
        book = self.products[product]
        equity = book.equity(price)
        if book.units or book.qty or not equity:
            return None
        claim = self._pay_claim(book, -equity, ts_ns, equity)  # either way, net
        return claim if equity < 0 else UnheldEquityTaken(product, ts_ns, equity, equity)

    def apply_liquidation(self, event: AccountLiquidated) -> list[InsuranceClaimPaid]:
        """Mirror a venue liquidation: products are closed at the mark, share the penalty
        by size and the venue's deficit cover by their losses; insurance then restores
        each product's floor, so a NAV never reaches zero unless its floor is zero."""
        books = list(self.products.values())
        penalties = allocate(event.penalty, [abs(b.qty) for b in books])
        for book, penalty in zip(books, penalties, strict=True):
            book.cash += book.qty * event.mark_price - penalty
            book.qty = ZERO
        if event.deficit_covered:
            covers = allocate(event.deficit_covered, [max(-b.cash, ZERO) for b in books])
            for book, cover in zip(books, covers, strict=True):
                book.cash += cover
        claims = []
        for book in books:
            floor = book.equity_floor if book.units else ZERO
            if book.cash < floor:
                claims.append(self._pay_claim(book, floor - book.cash, event.ts_ns, book.cash))
        return claims

    def _pay_claim(
        self, book: ProductBook, amount: Decimal, ts_ns: int, equity_before: Decimal
    ) -> InsuranceClaimPaid:
        book.cash += amount
        book.insurance_received += amount
        self.insurance_fund -= amount
        return InsuranceClaimPaid(book.product, ts_ns, amount, equity_before)

    def scale_floor(self, product: str, ratio: Decimal) -> None:
        """An order changed the product's units: its floor (what insurance guarantees the
        holders) moves with them."""
        book = self.products[product]
        if book.equity_floor:
            book.equity_floor = _insured(book, usdt_down(book.equity_floor * ratio))

    def insure_deposit(self, product: str, net: Decimal, floor_fraction: Decimal) -> None:
        """A deposit's money is insured at the share a rebalance gives (not by its units:
        bought at a quote below the floor per unit, they were insured at more than they
        paid, and the fund paid the depositor the difference)."""
        book = self.products[product]
        if floor_fraction:  # (a benchmark is not insured)
            book.equity_floor = _insured(book, book.equity_floor + usdt_down(net * floor_fraction))

    def mark_rebalanced(self, product: str, price: Decimal, floor_fraction: Decimal) -> None:
        """Set the equity the insurance fund guarantees until the next rebalance."""
        book = self.products[product]
        floor = usdt_down(book.equity(price) * floor_fraction)
        book.equity_floor = _insured(book, floor) if floor_fraction else floor

    def check_balanced(self, venue: Venue, price: Decimal) -> None:
        """DESIGN section 5, exactly: raise if any side differs by even one minor unit."""
        books = self.products.values()
        qty = sum((b.qty for b in books), ZERO)
        cash = sum((b.cash for b in books), ZERO)
        if qty != venue.position or cash != venue.wallet:
            raise BooksOutOfBalance(
                f"products hold qty {qty} cash {cash}; venue {venue.position} {venue.wallet}"
            )
        left = (
            sum((b.equity(price) for b in books), ZERO) + self.platform_fees + self.insurance_fund
        )
        right = self.deposits - self.payouts + venue.pnl(price)
        if left != right:
            raise BooksOutOfBalance(
                f"equity + fees + insurance {left} != deposits - payouts + venue PnL {right}"
            )

    def snapshot(self) -> dict[str, object]:
        return {
            "v": 1,
            "deposits": str(self.deposits),
            "payouts": str(self.payouts),
            "platform_fees": str(self.platform_fees),
            "insurance_fund": str(self.insurance_fund),
            "products": [b.to_dict() for b in self.products.values()],
        }

    @classmethod
    def restore(cls, config: AccountingConfig, snapshot: dict[str, object]) -> Books:
        raw_products = snapshot["products"]
        if not isinstance(raw_products, list):
            raise ValueError(f"the books' products are a {type(raw_products).__name__}, not a list")
        books = cls(config, [ProductBook.from_dict(p) for p in raw_products])
        for name in ("deposits", "payouts", "platform_fees", "insurance_fund"):
            setattr(books, name, Decimal(str(snapshot[name])))
        return books


def _insured(book: ProductBook, floor: Decimal) -> Decimal:
    """An insured product's floor, at least a NAV of one quantum for its units. Rounded
    down to 0 (1e-8 units left of a product at NAV 100 floored at 1%), the fund restored
    nothing, the NAV stood at 0 for good, and every open and close of the product was
    refused: the dust could not be closed, nor anyone deposit again."""
    least = (book.units * NAV_QUANTUM).quantize(USDT_QUANTUM, rounding=ROUND_CEILING)
    return max(floor, least) if book.units else floor
