"""The product line-up: which products exist per underlying and how each is built.

Every stage builds its part from here (the leverage service the controllers, the hedging
service the engine's product specs, the backtester both), so they cannot disagree.
"""

from __future__ import annotations

from decimal import Decimal

from shared.core.config import StrategyConfig
from shared.core.engine import Engine, ProductSpec, Strategy
from shared.core.leverage import FixedLeverageController, SmartLeverageController
from shared.core.market import Side
from shared.core.money import ZERO
from shared.core.venue import PerpVenue, Venue

SIDES = (Side.LONG, Side.SHORT)


def product_id(symbol: str, side: Side, fixed: Decimal | None = None) -> str:
    """`BTC-USDT:LONG`; a fixed-leverage benchmark is `BTC-USDT:LONG:3X-FIXED`."""
    name = f"{symbol}:{side.name}"
    return name if fixed is None else f"{name}:{fixed}X-FIXED"


def smart_controllers(symbol: str, config: StrategyConfig) -> list[SmartLeverageController]:
    return [SmartLeverageController(product_id(symbol, s), s, config.leverage) for s in SIDES]


def smart_product_specs(symbol: str, config: StrategyConfig) -> list[ProductSpec]:
    initial = config.leverage.warmup_target
    return [
        ProductSpec(product_id(symbol, s), s, initial, config.leverage.gap_floor) for s in SIDES
    ]


def smart_engine(symbol: str, config: StrategyConfig, venue: Venue | None = None) -> Engine:
    """Both smart products of `symbol` on one netted venue account (simulated by default)."""
    account = venue or PerpVenue(config.instrument(symbol), config.venue)
    return Engine(account, config.hedging, config.accounting, smart_product_specs(symbol, config))


def smart_strategy(symbol: str, config: StrategyConfig) -> Strategy:
    return Strategy(smart_controllers(symbol, config), smart_engine(symbol, config))


def fixed_strategy(
    symbol: str, side: Side, leverage: Decimal, config: StrategyConfig, venue: Venue | None = None
) -> Strategy:
    """A benchmark token on its own (uninsured) account, rebalanced daily."""
    product = product_id(symbol, side, leverage)
    account = venue or PerpVenue(config.instrument(symbol), config.venue)
    engine = Engine(
        account, config.hedging, config.accounting, [ProductSpec(product, side, leverage, ZERO)]
    )
    return Strategy([FixedLeverageController(product, side, leverage)], engine)
