"""Every policy parameter in one frozen model; a TOML or JSON file overrides any of them."""

from __future__ import annotations

from collections.abc import Collection
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.core.accounting import AccountingConfig
from shared.core.features import FeatureConfig
from shared.core.hedging import HedgingConfig
from shared.core.leverage import LeverageConfig
from shared.core.regime import RegimeConfig
from shared.core.venue import InstrumentSpec, VenueConfig


class InstrumentConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    price_tick: Decimal = Field(gt=0, description="Smallest price increment.")
    lot_step: Decimal = Field(gt=0, description="Smallest quantity increment.")


DEFAULT_INSTRUMENTS = {
    # Binance USDT-M perpetuals' filters.
    "BTC-USDT": InstrumentConfig(price_tick=Decimal("0.1"), lot_step=Decimal("0.001")),
    "ETH-USDT": InstrumentConfig(price_tick=Decimal("0.01"), lot_step=Decimal("0.001")),
}


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
    def _never_liquidated(self) -> StrategyConfig:
        """DESIGN section 5: the venue account is never liquidated under the configured
        margin rules. It liquidates at leverage 1 / maintenance_margin; the ceiling
        rebalances at `leverage_ceiling`, and a gap between two ticks can carry leverage
        past it, so liquidation must lie at least twice the ceiling away (a 9% gap from
        5.5x doubles it). A margin of 0.25 with the default 5.5x ceiling liquidated the
        account on the first tick."""
        ceiling, margin = self.leverage.leverage_ceiling, float(self.venue.maintenance_margin)
        if 2 * ceiling * margin > 1:
            raise ValueError(
                f"venue.maintenance_margin {margin:g} liquidates at {1 / margin:g}x: it must "
                f"be at least twice leverage.leverage_ceiling {ceiling:g}x, or a gap past "
                "the ceiling liquidates the account"
            )
        return self

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
    return f"unknown symbol {symbol!r}; configured: {', '.join(sorted(instruments))}"
