"""A symbol's leverage controllers: one RegimeUpdate in, one TargetsUpdate out.

Kept in Redis as one hash `<ns>lev:{<symbol>}:controllers` (fields `seq`, `regime`,
`mark` = the last tick's risk price and `mark_seq` = the seq it was written at,
`controllers` = JSON of every controller's snapshot), written by one atomic script
that also refuses a seq not above the stored one (shared/redis_store.ApplyOnceStore).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

from smartlev.v1 import leverage_pb2, market_pb2

from shared.core.config import StrategyConfig
from shared.core.engine import decide, funding_paid, risk_price
from shared.core.leverage import SmartLeverageController
from shared.core.market import Tick
from shared.core.products import smart_controllers
from shared.core.regime import Regime, RegimeState
from shared.stream import MarketInput, parse_market
from shared.wire import regime_state, targets_update


class RegimeInput(NamedTuple):
    """A validated RegimeUpdate: the market event, and the regime if a bar closed."""

    market: MarketInput
    regime: RegimeState | None

    @property
    def symbol(self) -> str:
        return self.market.symbol


def parse_regime_update(
    message: market_pb2.RegimeUpdate, instruments: Collection[str] | None = None
) -> RegimeInput:
    """ValueError when the update cannot be acted on (-> DLQ); `instruments` as in
    `parse_market`."""
    if not message.HasField("market"):
        raise ValueError("no market event in RegimeUpdate")
    market = parse_market(message.market, instruments)
    if not message.HasField("regime"):
        return RegimeInput(market, None)
    if not isinstance(market.value, Tick):
        raise ValueError("a regime can only come with a tick")
    if message.regime.symbol != market.symbol:
        raise ValueError(f"regime of {message.regime.symbol!r} on a {market.symbol!r} tick")
    regime = regime_state(message.regime)
    features = regime.features
    numbers = {
        "confidence": regime.confidence,
        "close": features.close,
        "sigma_ann": features.sigma_ann,
        "trend_score": features.trend_score,
        "drawdown": features.drawdown,
        "rally": features.rally,
        **{f"efficiency[{i}]": v for i, v in enumerate(features.efficiency)},
        **{f"momentum[{i}]": v for i, v in enumerate(features.momentum_t)},
    }
    for name, value in numbers.items():  # a NaN would reach the policy and stop the stage
        if not math.isfinite(value):
            raise ValueError(f"regime {name} is not finite: {value}")
    if not 0 <= regime.confidence <= 1:
        raise ValueError(f"regime confidence must be within [0, 1], got {regime.confidence}")
    if features.sigma_ann < 0:
        raise ValueError(f"regime sigma_ann must be >= 0, got {features.sigma_ann}")
    return RegimeInput(market, regime)


@dataclass(slots=True)
class SymbolControllers:
    controllers: list[SmartLeverageController]
    last_seq: int | None = None
    regime: str = str(Regime.RANGE)  # the symbol's current regime (last closed bar)
    mark: float = 0.0  # the last tick's risk price: what hedging's books charge funding at

    def step(self, update: RegimeInput, ts_init_ns: int) -> leverage_pb2.TargetsUpdate:
        """`decide` on a tick (the policy on a closed bar, else the emergency rules); a
        funding event is modelled by every controller (`funding_paid`), no decisions."""
        market, regime = update
        tick = market.value
        decisions = []
        if isinstance(tick, Tick):
            self.mark = risk_price(tick)
            decisions = decide(self.controllers, tick.ts_ns, tick.price, self.mark, regime)
        else:
            funding_paid(self.controllers, tick, self.mark)
        if regime is not None:
            self.regime = str(regime.regime)
        self.last_seq = market.seq
        return targets_update(
            market.message,
            market.symbol,
            market.seq,
            regime is not None,
            self.regime,
            decisions,
            ts_init_ns,
        )

    def fields(self) -> dict[str, str | int]:
        snapshots = {c.product: c.snapshot() for c in self.controllers}
        return {
            "seq": self.last_seq or 0,
            "regime": self.regime,
            "mark": repr(self.mark),
            "mark_seq": self.last_seq or 0,
            "controllers": json.dumps(snapshots, separators=(",", ":")),
        }


def restore(symbol: str, config: StrategyConfig, fields: dict[str, str]) -> SymbolControllers:
    """The state in a stored hash; an empty hash: fresh controllers."""
    controllers = smart_controllers(symbol, config)
    if not fields:
        return SymbolControllers(controllers)
    snapshots = json.loads(fields["controllers"])
    restored = [
        SmartLeverageController.restore(c.product, c.side, config.leverage, snapshots[c.product])
        for c in controllers
    ]
    # No mark in a state from before funding was modelled, and a stale one in a state a
    # rolled-back release wrote over (it kept the field, not its seq): the next tick
    # brings one.
    current = fields.get("mark_seq") == fields["seq"]
    mark = float(fields["mark"]) if current else 0.0
    return SymbolControllers(restored, int(fields["seq"]), fields["regime"], mark)
