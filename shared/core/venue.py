"""A deterministic perpetual-futures venue: fills, fees, slippage, funding, margin.

It keeps one cross-margin account per underlying: a wallet of USDT and a net position.
Cash accounting (the wallet pays qty x price on every fill) makes the account's PnL
exact: equity = wallet + position x mark. The live system swaps this for an exchange
adapter behind the same gRPC API.

A taker walks the book, and the book does not refill within an instant: the orders of
one timestamp on one side pay together what one order of their summed notional would
(square-root impact), each its own share of it: ~60M of BTC at 30,000 in 31 slices pays
~68,800 USDT of slippage (half spread and impact), as one order does, where each slice
priced alone paid ~15,000 between them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.core.events import AccountLiquidated, OrderFilled
from shared.core.money import ZERO, MoneyError, price_against

BPS = Decimal("0.0001")
# The fewest call ids the venue service remembers per symbol (its `applied_ids_kept`,
# when not 0: all). A caller re-running a step a crash cut short repeats its calls with
# the same ids, and the venue answers them from its records only if it still has them,
# so a step makes fewer calls than this (hedging's market batches are cut at a quarter
# of it; an order's step, a transfer and a slice per 2M of notional, is at most 2,751
# calls: MAX_DEPOSIT at the default 5.5x ceiling; 2,354 measured at 5x).
MIN_CALL_IDS_KEPT = 10_000


class Liquidity(StrEnum):
    TAKER = "TAKER"
    MAKER = "MAKER"


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    symbol: str
    price_tick: Decimal
    lot_step: Decimal


class VenueConfig(BaseModel):
    """Fee, slippage and margin rules; defaults are Binance USDT-M's base tier."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Upper bounds no real venue comes near (fees of 1%, a half spread of 100 bps): past
    # them a value is a typo, and a half spread of 20,000 bps took a backtest's NAV < 0.
    taker_fee: Decimal = Field(
        Decimal("0.0004"), ge=0, lt=Decimal("0.01"), description="Taker fee rate (4 bps)."
    )
    maker_fee: Decimal = Field(
        Decimal("0.0002"), ge=0, lt=Decimal("0.01"), description="Maker fee rate (2 bps)."
    )
    half_spread_bps: Decimal = Field(
        Decimal("0.5"),
        ge=0,
        le=100,
        description="Half the bid-ask spread paid by a taker, in bps.",
    )
    impact_bps: Decimal = Field(
        Decimal("10"),
        ge=0,
        le=1000,
        description="Square-root impact: impact_bps x sqrt(notional / depth_notional).",
    )
    depth_notional: Decimal = Field(
        Decimal("50000000"), gt=0, description="Notional that moves the price by impact_bps."
    )
    maintenance_margin: Decimal = Field(
        Decimal("0.005"), gt=0, lt=1, description="Maintenance margin rate of position notional."
    )
    initial_margin: Decimal = Field(
        Decimal("0.05"),
        gt=0,
        lt=1,
        description="Initial margin rate: an order that adds to the position must leave the "
        "account's equity at least this share of the position's notional (0.05: 20x).",
    )
    liquidation_fee: Decimal = Field(
        Decimal("0.0125"),
        ge=0,
        lt=Decimal("0.1"),
        description="Share of notional taken into the insurance fund.",
    )

    @model_validator(mode="after")
    def _initial_above_maintenance(self) -> VenueConfig:
        if self.initial_margin <= self.maintenance_margin:
            raise ValueError(
                f"initial_margin {self.initial_margin} must be above maintenance_margin "
                f"{self.maintenance_margin}: an order the venue takes must not be one it "
                "liquidates"
            )
        return self


class InsufficientMargin(MoneyError):
    """An order that adds to the position past what the account's equity margins: a
    real exchange refuses it, and the engine never sends one (its leverage stays below
    1 / initial_margin), so one is a bug upstream."""


class Venue(Protocol):
    """What the engine needs of a venue account: this simulator in the backtester, a gRPC
    client of the venue service in production, an exchange adapter live."""

    spec: InstrumentSpec

    @property
    def position(self) -> Decimal: ...

    @property
    def wallet(self) -> Decimal: ...

    def transfer(self, amount: Decimal) -> None: ...

    def execute(
        self,
        ts_ns: int,
        qty: Decimal,
        reference: Decimal,
        liquidity: Liquidity = ...,
        mark: Decimal | None = ...,
    ) -> OrderFilled: ...

    def quote(
        self, qty: Decimal, reference: Decimal, liquidity: Liquidity = ..., taken: Decimal = ...
    ) -> tuple[Decimal, Decimal]: ...

    def walked(self, ts_ns: int, buying: bool) -> Decimal: ...

    def settle_funding(self, rate: Decimal, mark: Decimal) -> Decimal: ...

    def pnl(self, mark: Decimal) -> Decimal: ...

    def at_risk(self, mark_f: float) -> bool: ...

    def check_liquidation(self, ts_ns: int, mark: Decimal) -> AccountLiquidated | None: ...


class PerpVenue:
    """One account on one perpetual; every amount exact."""

    __slots__ = (
        "_liq_long_below",
        "_liq_short_above",
        "config",
        "fees_paid",
        "funding_paid",
        "insurance_fund",
        "liquidations",
        "position",
        "spec",
        "transfers_in",
        "walk_bought",
        "walk_sold",
        "walk_ts",
        "wallet",
    )

    def __init__(self, spec: InstrumentSpec, config: VenueConfig) -> None:
        self.spec = spec
        self.config = config
        self.wallet = ZERO
        self.position = ZERO
        self.transfers_in = ZERO
        self.fees_paid = ZERO
        self.funding_paid = ZERO
        self.insurance_fund = ZERO
        self.liquidations = 0
        # the notional taker orders took from each side of the book at instant walk_ts
        self.walk_ts = 0
        self.walk_bought = ZERO
        self.walk_sold = ZERO
        self._liq_long_below = -math.inf
        self._liq_short_above = math.inf

    def transfer(self, amount: Decimal) -> None:
        """Collateral in (+) or out (-); not PnL."""
        self.wallet += amount
        self.transfers_in += amount
        self._update_liquidation_price()

    def walked(self, ts_ns: int, buying: bool) -> Decimal:
        """The notional taker orders already took from the side a buy (or a sell) takes,
        at the instant `ts_ns`: where the next order at that instant starts its walk."""
        if ts_ns != self.walk_ts:
            return ZERO
        return self.walk_bought if buying else self.walk_sold

    def fill_price(
        self, qty: Decimal, reference: Decimal, liquidity: Liquidity, taken: Decimal = ZERO
    ) -> Decimal:
        """Taker: half spread plus square-root impact, against us. The impact is the
        order's share of walking the book from `taken` (`walked`) to `taken` plus its
        notional: impact_bps x (after^1.5 - taken^1.5) / (notional x depth^0.5), which is
        impact_bps x sqrt(notional / depth) for an order that walks it first. Maker: the
        reference, on the tick grid, against us (a reference between ticks filled there)."""
        buying = qty > 0
        maker = liquidity is Liquidity.MAKER
        raw = reference if maker else self._taker_price(qty, reference, taken)
        price = price_against(raw, self.spec.price_tick, buying)
        if price <= 0:  # a sell so large its impact passes the price, or under one tick
            raise MoneyError(
                f"selling {-qty} at {reference} would fill at {price} (tick "
                f"{self.spec.price_tick}): no such fill"
            )
        return price

    def _taker_price(self, qty: Decimal, reference: Decimal, taken: Decimal) -> Decimal:
        """`reference` moved against the taker by the spread and its walk of the book,
        before rounding to the tick (`fill_price`)."""
        notional = abs(qty) * reference
        depth = self.config.depth_notional
        if taken:
            after = taken + notional
            walk = (after * (after / depth).sqrt() - taken * (taken / depth).sqrt()) / notional
        else:
            walk = (notional / depth).sqrt()
        shift = reference * (self.config.half_spread_bps + self.config.impact_bps * walk) * BPS
        return reference + shift if qty > 0 else reference - shift

    def quote(
        self,
        qty: Decimal,
        reference: Decimal,
        liquidity: Liquidity = Liquidity.TAKER,
        taken: Decimal = ZERO,
    ) -> tuple[Decimal, Decimal]:
        """The fill price and fee `execute` would give an order of `qty` that walks the
        book on from `taken` (`walked`)."""
        price = self.fill_price(qty, reference, liquidity, taken)
        rate = self.config.taker_fee if liquidity is Liquidity.TAKER else self.config.maker_fee
        return price, abs(qty) * price * rate

    def execute(
        self,
        ts_ns: int,
        qty: Decimal,
        reference: Decimal,
        liquidity: Liquidity = Liquidity.TAKER,
        mark: Decimal | None = None,
    ) -> OrderFilled:
        """Fill `qty` against `reference`; the initial margin is judged at `mark` (the
        reference if None), as an exchange judges it: at a last trade the mark ignores,
        a 5x long read 27.7x and its deposits were refused."""
        if qty == 0:
            raise MoneyError("order quantity is zero")
        if qty % self.spec.lot_step != 0:
            raise MoneyError(f"quantity {qty} is not a multiple of lot {self.spec.lot_step}")
        buying = qty > 0
        taken = self.walked(ts_ns, buying)
        price, fee = self.quote(qty, reference, liquidity, taken)
        position = self.position + qty
        wallet = self.wallet - (qty * price + fee)
        if abs(position) > abs(self.position) or position * self.position < 0:
            at = reference if mark is None else mark
            self._margined(qty, price, at, wallet + position * at, position)
        self.wallet = wallet
        self.position = position
        self.fees_paid += fee
        if liquidity is Liquidity.TAKER:
            if ts_ns != self.walk_ts:
                self.walk_ts, self.walk_bought, self.walk_sold = ts_ns, ZERO, ZERO
            if buying:
                self.walk_bought = taken + qty * reference
            else:
                self.walk_sold = taken - qty * reference
        self._update_liquidation_price()
        return OrderFilled(self.spec.symbol, ts_ns, qty, price, fee, liquidity.value)

    def _margined(
        self, qty: Decimal, price: Decimal, mark: Decimal, equity: Decimal, position: Decimal
    ) -> None:
        """`InsufficientMargin` unless the account's equity after an order that adds to
        (or turns) its position, at `mark`, is at least the initial margin of the
        position after it."""
        required = abs(position) * mark * self.config.initial_margin
        if equity >= required:
            return
        at = f"leverage {abs(position) * mark / equity:.4g}x" if equity > 0 else "none"
        raise InsufficientMargin(
            f"{self.spec.symbol}: an order of {qty} at {price} leaves equity {equity} "
            f"against a position of {position} at a mark of {mark}, below its initial "
            f"margin of {required} ({self.config.initial_margin}; {at})"
        )

    def settle_funding(self, rate: Decimal, mark: Decimal) -> Decimal:
        """Pays position x mark x rate (longs pay when the rate is positive); returns it."""
        amount = self.position * mark * rate
        self.wallet -= amount
        self.funding_paid += amount
        self._update_liquidation_price()
        return amount

    def equity(self, mark: Decimal) -> Decimal:
        return self.wallet + self.position * mark

    def pnl(self, mark: Decimal) -> Decimal:
        return self.equity(mark) - self.transfers_in

    def maintenance_margin(self, mark: Decimal) -> Decimal:
        return abs(self.position) * mark * self.config.maintenance_margin

    def at_risk(self, mark_f: float) -> bool:
        """Cheap float pre-check; only when it says yes is the exact rule evaluated."""
        return mark_f <= self._liq_long_below or mark_f >= self._liq_short_above

    def check_liquidation(self, ts_ns: int, mark: Decimal) -> AccountLiquidated | None:
        """The exchange's rule: equity at or below maintenance margin closes the position."""
        equity = self.equity(mark)
        margin = self.maintenance_margin(mark)
        if self.position == 0 or equity > margin:
            return None
        notional = abs(self.position) * mark
        penalty = min(max(equity, ZERO), notional * self.config.liquidation_fee)
        closed = self.position
        self.wallet += closed * mark - penalty
        self.insurance_fund += penalty
        # A bankrupt account is written up to zero by the venue's insurance fund.
        deficit = -self.wallet if self.wallet < 0 else ZERO
        self.wallet += deficit
        self.insurance_fund -= deficit
        self.position = ZERO
        self.liquidations += 1
        self._update_liquidation_price()
        return AccountLiquidated(
            self.spec.symbol, ts_ns, mark, equity, margin, closed, penalty, deficit
        )

    def _update_liquidation_price(self) -> None:
        mmr = float(self.config.maintenance_margin)
        q = float(self.position)
        w = float(self.wallet)
        # 1% safety margin on the float estimate: the exact check runs inside it.
        if q > 0:
            self._liq_long_below = -w / (q * (1.0 - mmr)) * 1.01
            self._liq_short_above = math.inf
        elif q < 0:
            self._liq_long_below = -math.inf
            self._liq_short_above = w / (-q * (1.0 + mmr)) * 0.99
        else:
            self._liq_long_below, self._liq_short_above = -math.inf, math.inf

    def snapshot(self) -> dict[str, object]:
        return {
            "v": 1,
            "wallet": str(self.wallet),
            "position": str(self.position),
            "transfers_in": str(self.transfers_in),
            "fees_paid": str(self.fees_paid),
            "funding_paid": str(self.funding_paid),
            "insurance_fund": str(self.insurance_fund),
            "liquidations": self.liquidations,
            "walk_ts": self.walk_ts,
            "walk_bought": str(self.walk_bought),
            "walk_sold": str(self.walk_sold),
        }

    @classmethod
    def restore(
        cls, spec: InstrumentSpec, config: VenueConfig, snapshot: dict[str, object]
    ) -> PerpVenue:
        venue = cls(spec, config)
        for name in (
            "wallet",
            "position",
            "transfers_in",
            "fees_paid",
            "funding_paid",
            "insurance_fund",
        ):
            setattr(venue, name, _finite(snapshot[name], name))
        liquidations = snapshot["liquidations"]
        if not isinstance(liquidations, int):
            raise ValueError(f"liquidations is {liquidations!r}, not a count")
        venue.liquidations = liquidations
        # none in a snapshot from before the walk; a Redis hash's text, or a JSON int
        venue.walk_ts = int(str(snapshot.get("walk_ts", 0)))
        venue.walk_bought = _finite(snapshot.get("walk_bought", "0"), "walk_bought")
        venue.walk_sold = _finite(snapshot.get("walk_sold", "0"), "walk_sold")
        venue._update_liquidation_price()
        return venue


def _finite(value: object, name: str) -> Decimal:
    """A stored figure, or ValueError: "NaN" and "Infinity" parse as Decimals, and an
    account holding one failed only when a reply carried it, as the caller's error."""
    figure = Decimal(str(value))
    if not figure.is_finite():
        raise ValueError(f"{name} is {value!r}, not a finite number")
    return figure
