"""Every policy parameter in one frozen model; a TOML or JSON file overrides any of them."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.core.accounting import AccountingConfig
from shared.core.features import FeatureConfig
from shared.core.hedging import HedgingConfig
from shared.core.leverage import LeverageConfig
from shared.core.market import MAX_FUNDING_RATE
from shared.core.regime import RegimeConfig
from shared.core.text import clipped
from shared.core.venue import InstrumentSpec, VenueConfig

# The fixed-leverage tokens the backtest compares the smart products with (daily
# rebalanced, on the same venue rules), and what an order's costs add to the leverage it
# leaves (fees and slippage: ~0.3% of the equity at 3x; 1% allowed).
BENCHMARK_LEVERAGES = (Decimal(1), Decimal(2), Decimal(3))
COSTS_HEADROOM = 1.01

# The finest price tick or lot step taken (real venues' finest are 1e-8): finer, a
# quantity times a price had more digits than the wire carries (a traceback at 1e-40).
MOST_INSTRUMENT_DECIMALS = 12


class InstrumentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    price_tick: Decimal = Field(gt=0, description="Smallest price increment.")
    lot_step: Decimal = Field(gt=0, description="Smallest quantity increment.")

    @field_validator("price_tick", "lot_step")
    @classmethod
    def _at_most_the_wire_decimals(cls, step: Decimal) -> Decimal:
        exponent = step.normalize().as_tuple().exponent
        assert isinstance(exponent, int)  # finite: allow_inf_nan
        if -exponent > MOST_INSTRUMENT_DECIMALS:
            raise ValueError(f"{step} has more than {MOST_INSTRUMENT_DECIMALS} decimals")
        return step


DEFAULT_INSTRUMENTS = {
    # Binance USDT-M perpetuals' filters.
    "BTC-USDT": InstrumentConfig(price_tick=Decimal("0.1"), lot_step=Decimal("0.001")),
    "ETH-USDT": InstrumentConfig(price_tick=Decimal("0.01"), lot_step=Decimal("0.001")),
}


# The step of the mark between two ticks the margin check allows for at the leverage
# ceiling. The real hours' largest are 17.2% up (BTC) and 21.2% down (ETH), both in
# March 2020, when the regime rules held the products near 1x; at the ceiling such a
# step takes a product to its floor whatever the margin (the insurance fund pays).
MARK_STEP = 0.15

# The finest slicing a policy may run: a trade goes to the venue in notional / slice
# orders, and 0.01 USDT asked a 1M backtest for 1e8 of them (it never ended). At this,
# a 1M trade is 100 orders. (HedgingConfig itself takes any: its tests slice finely.)
MIN_SLICE_NOTIONAL = Decimal(10_000)

# The most one instant's trades may sell (USDT): two products at the largest deposit at
# the leverage ceiling is ~1.1e10. The book must fill it within MOST_PRICE_MOVE of the
# price: past the price a fill is refused, and sizing a deposit's hedge (after its
# units were issued and its money sent) met that refusal on a book 1M deep at 200 bps.
LARGEST_INSTANT_NOTIONAL = 2 * 10**10
MOST_PRICE_MOVE = Decimal("0.5")


class StrategyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    features: FeatureConfig = FeatureConfig()
    regime: RegimeConfig = RegimeConfig()
    leverage: LeverageConfig = LeverageConfig()
    venue: VenueConfig = VenueConfig()
    hedging: HedgingConfig = HedgingConfig()
    accounting: AccountingConfig = AccountingConfig()
    instruments: dict[str, InstrumentConfig] = Field(default_factory=lambda: DEFAULT_INSTRUMENTS)

    @model_validator(mode="after")
    def _slices_bounded(self) -> StrategyConfig:
        if self.hedging.max_slice_notional < MIN_SLICE_NOTIONAL:
            raise ValueError(
                f"hedging.max_slice_notional {self.hedging.max_slice_notional}: at least "
                f"{MIN_SLICE_NOTIONAL:,} USDT a venue order (a trade is sent in "
                "notional / slice orders)"
            )
        return self

    @model_validator(mode="after")
    def _fills_exist(self) -> StrategyConfig:
        """The last lot of a sell of LARGEST_INSTANT_NOTIONAL at one instant moves the
        price by the half spread and 1.5 x impact_bps x sqrt(sold / depth): the walk of
        the book's marginal step (`PerpVenue._taker_price`)."""
        venue = self.venue  # in Decimal: a depth of 1e-400 is 0.0 as a float
        try:
            walk = (LARGEST_INSTANT_NOTIONAL / venue.depth_notional).sqrt()
            bps = venue.half_spread_bps + Decimal("1.5") * venue.impact_bps * walk
            move = f"{bps / 100:.3g}%" if bps / 10_000 > MOST_PRICE_MOVE else ""
        except ArithmeticError:  # past Decimal's exponents: a depth of 1e-999990
            move = "past every bound"
        if move:
            raise ValueError(
                f"venue: selling {LARGEST_INSTANT_NOTIONAL:.0e} USDT at once moves the price "
                f"{move} at a half spread of {venue.half_spread_bps} bps, impact "
                f"{venue.impact_bps} bps and depth_notional {venue.depth_notional}; at most "
                f"{MOST_PRICE_MOVE:.0%} (a deeper book or less impact)"
            )
        return self

    @model_validator(mode="after")
    def _never_liquidated(self) -> StrategyConfig:
        """DESIGN section 5: the venue account is never liquidated under the configured
        margin rules. It liquidates at leverage 1 / maintenance_margin; the ceiling
        rebalances at `leverage_ceiling`, and a step of the mark between two ticks
        carries leverage past it: a short at leverage C that the mark moves up by g is
        at C (1 + g) / (1 - C g). The margin must hold that at a step of MARK_STEP (a
        short is the side a step moves furthest). "Twice the ceiling", the rule before,
        took margins to 0.09 at 5.5x, and accepted policies got the account liquidated
        on the real hours of March 2020 (BTC's mark +13.7% in an hour at 5x: 18x)."""
        ceiling, margin = self.leverage.leverage_ceiling, float(self.venue.maintenance_margin)
        left = 1 - ceiling * MARK_STEP  # of a short's equity, after the step
        if left <= 0:
            raise ValueError(
                f"leverage.leverage_ceiling {ceiling:g}x: a {MARK_STEP:.0%} step of the "
                f"mark takes a short's whole equity at it; it must be below "
                f"{1 / MARK_STEP:.3g}x"
            )
        most = left / (ceiling * (1 + MARK_STEP))
        if margin >= most:
            raise ValueError(
                f"venue.maintenance_margin {margin:g} liquidates at {1 / margin:g}x: a "
                f"{MARK_STEP:.0%} step of the mark takes a short at the "
                f"{ceiling:g}x leverage_ceiling to {1 / most:.3g}x, so it must be below "
                f"{most:.4g}"
            )
        return self

    @model_validator(mode="after")
    def _orders_within_initial_margin(self) -> StrategyConfig:
        """The venue refuses an order that adds to a position past 1 / initial_margin of
        leverage at the mark. A product is held under `leverage_ceiling` at every tick,
        but a funding settlement between two ticks carries it past (an order hedged then
        keeps the product's leverage), and the backtest's benchmark tokens rebalance up
        to theirs (plus the order's costs): each must be below it, or an order the policy
        (or a benchmark) asks for is refused, and hedging halts the symbol on it."""
        initial = float(self.venue.initial_margin)
        most = 1 / initial
        ceiling = self.leverage.leverage_ceiling
        funded = ceiling / (1 - ceiling * float(MAX_FUNDING_RATE))  # validated < 1 there
        benchmark = float(max(BENCHMARK_LEVERAGES))
        for reached, where in (
            (
                funded,
                f"a product at the {ceiling:g}x leverage_ceiling is at {funded:.4g}x after a "
                f"funding settlement at the largest rate taken ({MAX_FUNDING_RATE}), where "
                "an order before the next tick is hedged",
            ),
            (benchmark, f"the backtest's {benchmark:g}x benchmark token rebalances up to it"),
        ):
            if reached * COSTS_HEADROOM >= most:
                raise ValueError(
                    f"venue.initial_margin {initial:g} takes orders up to {most:.4g}x: "
                    f"{where}, and its costs past it"
                )
        return self

    def digest(self) -> str:
        """Which configuration this is, in 12 hex digits: every stage logs it at start,
        so stages that apply different ones (a gateway quoting fees hedging does not
        charge) show at a glance."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    def instrument(self, symbol: str) -> InstrumentSpec:
        problem = unknown_symbol_problem(symbol, self.instruments)
        if problem is not None:
            raise ValueError(problem)
        spec = self.instruments[symbol]
        return InstrumentSpec(symbol, spec.price_tick, spec.lot_step)


def unknown_symbol_problem(symbol: str, instruments: Collection[str]) -> str | None:
    """Why `symbol` is none of `instruments` (the configured ones), or None."""
    if symbol in instruments:
        return None
    return f"unknown symbol {clipped(symbol)!r}; configured: {', '.join(sorted(instruments))}"
