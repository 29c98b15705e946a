"""Factories for core values in tests (in the spirit of NautilusTrader's TestEventStubs)."""

from __future__ import annotations

from decimal import Decimal

from shared.core.accounting import AccountingConfig
from shared.core.config import StrategyConfig
from shared.core.engine import SignalPipeline, Strategy
from shared.core.features import FeatureConfig, Features
from shared.core.leverage import LeverageConfig
from shared.core.market import NS_PER_HOUR, Side, Tick
from shared.core.products import fixed_strategy, smart_strategy
from shared.core.regime import Regime, RegimeConfig, RegimeState
from shared.core.venue import InstrumentSpec, PerpVenue, VenueConfig

SYMBOL = "BTC-USDT"
LONG = f"{SYMBOL}:LONG"
SHORT = f"{SYMBOL}:SHORT"
T0 = 1_600_000_000 * 1_000_000_000 - (1_600_000_000 * 1_000_000_000) % (24 * NS_PER_HOUR)


def features(
    *, sigma: float = 0.6, trend: float = 0.0, warm: bool = True, ts_ns: int = T0
) -> Features:
    return Features(ts_ns, 100.0, 500, sigma, (0.5,), (trend,), trend, 0.0, 0.0, warm)


def regime_state(
    regime: Regime = Regime.RANGE, *, confidence: float = 1.0, sigma: float = 0.6, warm: bool = True
) -> RegimeState:
    return RegimeState(regime, confidence, T0, False, features(sigma=sigma, warm=warm))


def frictionless_strategy(side: Side, leverage: Decimal) -> Strategy:
    """A fixed-leverage token with no fees, no slippage and a fine lot: the FTX FAQ's
    arithmetic exactly."""
    spec = InstrumentSpec(SYMBOL, Decimal("0.00000001"), Decimal("0.000000000001"))
    venue = VenueConfig(taker_fee=Decimal(0), half_spread_bps=Decimal(0), impact_bps=Decimal(0))
    accounting = AccountingConfig(open_fee=Decimal(0), close_fee=Decimal(0), management_fee=0)
    config = StrategyConfig(venue=venue, accounting=accounting)
    return fixed_strategy(SYMBOL, side, leverage, config, PerpVenue(spec, venue))


def fast_config() -> StrategyConfig:
    """Short horizons so that random paths of a few hundred ticks go through every regime."""
    return StrategyConfig(
        features=FeatureConfig(
            vol_halflife_bars=4.0, trend_horizons=(3, 6, 12), drawdown_window=24
        ),
        regime=RegimeConfig(min_dwell_bars=2),
    )


def levered_config() -> StrategyConfig:
    """`fast_config` whose targets reach the top of the range on random paths (at the
    defaults, their volatility keeps every target at 1x): built at 5x, up to 5x in a
    trend, 3x in a range, volatility scaling neutral up to 2,000% a year."""
    return fast_config().model_copy(
        update={
            "leverage": LeverageConfig(
                warmup_leverage=5.0,
                base_trend_aligned=5.0,
                base_range=3.0,
                base_high_vol=2.0,
                base_trend_against=2.0,
                sigma_reference=20.0,
                max_raise_per_bar=1.0,
            )
        }
    )


def smart_run(config: StrategyConfig) -> tuple[SignalPipeline, Strategy]:
    return SignalPipeline(SYMBOL, config.features, config.regime), smart_strategy(SYMBOL, config)


def tick(ts_ns: int, price: Decimal | str | int) -> Tick:
    return Tick(SYMBOL, ts_ns, Decimal(price))
