"""What happened in the core, one immutable type per event, named in the past tense.

Services turn these into protobuf messages on Kafka; the backtester records them. Ids and
timestamps are values passed in, so replaying the same input gives the same events.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from shared.core.market import Side


class Reason:
    """Reason codes carried by every leverage target, so a user can see why it moved."""

    WARMUP = "WARMUP"
    REGIME_TREND_ALIGNED = "REGIME_TREND_ALIGNED"
    REGIME_TREND_AGAINST = "REGIME_TREND_AGAINST"
    REGIME_RANGE = "REGIME_RANGE"
    REGIME_HIGH_VOL = "REGIME_HIGH_VOL"
    VOL_SCALED_DOWN = "VOL_SCALED_DOWN"
    VOL_SCALED_UP = "VOL_SCALED_UP"
    CLAMPED_MIN = "CLAMPED_MIN"
    CLAMPED_MAX = "CLAMPED_MAX"
    RATE_LIMITED = "RATE_LIMITED"
    OUTSIDE_BAND = "OUTSIDE_BAND"
    EMERGENCY_ADVERSE_MOVE = "EMERGENCY_ADVERSE_MOVE"
    EMERGENCY_LEVERAGE_CEILING = "EMERGENCY_LEVERAGE_CEILING"
    FIXED_SCHEDULE = "FIXED_SCHEDULE"
    FIRST_PRICE = "FIRST_PRICE"


@dataclass(frozen=True, slots=True)
class LeverageTargetChanged:
    product: str
    side: Side
    ts_ns: int
    price: Decimal
    target: Decimal
    previous_target: Decimal
    rebalance: bool
    emergency: bool
    reasons: tuple[str, ...]
    regime: str
    # The risk price a smart controller's emergency rules are anchored at from this
    # decision on (a rebalance); None: no anchor (not a rebalance, or a fixed benchmark).
    anchor: float | None = None


@dataclass(frozen=True, slots=True)
class OrderFilled:
    """One fill of one slice at the venue; qty is signed (+ buy, - sell)."""

    symbol: str
    ts_ns: int
    qty: Decimal
    price: Decimal
    fee: Decimal
    liquidity: str


@dataclass(frozen=True, slots=True)
class HedgeAllocation:
    """A product's share of a netted hedge: its own requested change and its costs."""

    product: str
    qty: Decimal
    notional: Decimal
    slippage: Decimal
    fee: Decimal


@dataclass(frozen=True, slots=True)
class HedgeExecuted:
    symbol: str
    ts_ns: int
    reference_price: Decimal
    net_qty: Decimal
    fills: tuple[OrderFilled, ...]
    allocations: tuple[HedgeAllocation, ...]


@dataclass(frozen=True, slots=True)
class FundingSettled:
    """Funding paid (+) or received (-) by each product, summing to the venue's payment."""

    symbol: str
    ts_ns: int
    rate: Decimal
    mark_price: Decimal
    venue_amount: Decimal
    allocations: tuple[tuple[str, Decimal], ...]


@dataclass(frozen=True, slots=True)
class ManagementFeeAccrued:
    product: str
    ts_ns: int
    amount: Decimal


@dataclass(frozen=True, slots=True)
class InsuranceClaimPaid:
    """A gap took a product's equity below its floor; the insurance fund topped it up."""

    product: str
    ts_ns: int
    amount: Decimal
    equity_before: Decimal


@dataclass(frozen=True, slots=True)
class InsuranceAdvanced:
    """A price the mark ignored took an insured product's equity below its floor: the
    fund advanced the difference (repaid from what the equity recovers above it)."""

    product: str
    ts_ns: int
    amount: Decimal
    equity_before: Decimal


@dataclass(frozen=True, slots=True)
class InsuranceRepaid:
    """An insured product's equity recovered above its floor: it paid back (part of)
    what the fund had advanced it."""

    product: str
    ts_ns: int
    amount: Decimal
    equity_before: Decimal


@dataclass(frozen=True, slots=True)
class UnheldEquityTaken:
    """The last holder left at a quoted NAV below the product's worth: the equity no unit
    holds went to the insurance fund (the fund pays when it is short, InsuranceClaimPaid),
    so the next depositor buys into a product worth nothing but what it pays in."""

    product: str
    ts_ns: int
    amount: Decimal
    equity_before: Decimal  # all of it went: the amount


# What the insurance fund pays into or takes out of a product's books.
FundMove = InsuranceClaimPaid | InsuranceAdvanced | InsuranceRepaid | UnheldEquityTaken


def into_product(move: FundMove) -> Decimal:
    """What a fund move put into the product's books; negative, what the fund took back
    (the books count it so in `insurance_received`, the wire as a signed claim)."""
    paid = isinstance(move, InsuranceClaimPaid | InsuranceAdvanced)
    return move.amount if paid else -move.amount


@dataclass(frozen=True, slots=True)
class ProductUnitsIssued:
    product: str
    ts_ns: int
    amount: Decimal
    fee: Decimal
    units: Decimal
    nav: Decimal


@dataclass(frozen=True, slots=True)
class ProductUnitsRedeemed:
    product: str
    ts_ns: int
    units: Decimal
    nav: Decimal
    gross: Decimal
    fee: Decimal
    payout: Decimal


@dataclass(frozen=True, slots=True)
class AccountLiquidated:
    """The venue closed the account's position at the mark: the smart products are built
    never to see this; fixed-leverage benchmarks may. A bankrupt account's deficit is
    covered by the venue's insurance fund, as an exchange's would be."""

    symbol: str
    ts_ns: int
    mark_price: Decimal
    equity: Decimal
    maintenance_margin: Decimal
    closed_qty: Decimal
    penalty: Decimal
    deficit_covered: Decimal
