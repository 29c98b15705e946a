"""The core's decisions on the wire, shared by the stage that writes each message and the
stage that reads it back: RegimeState <-> RegimeDetected (regime -> leverage) and
LeverageTargetChanged (leverage -> hedging). Every field travels exactly (doubles as
doubles, decimals as exact strings), so what a stage acts on is bit for bit what the
previous one computed."""

from __future__ import annotations

import math

from smartlev.v1 import common_pb2, leverage_pb2, market_pb2

from shared.codec import decimal_from_wire, decimal_to_wire
from shared.core.events import LeverageTargetChanged
from shared.core.features import Features
from shared.core.market import Side
from shared.core.regime import Regime, RegimeState


def regime_to_wire(regime: Regime | str) -> common_pb2.Regime:
    return common_pb2.Regime.Value(str(regime))


def known_regime_name(name: str) -> bool:
    """Whether this build's Regime enum has `name` (a hash another build wrote may not)."""
    return name in common_pb2.Regime.DESCRIPTOR.values_by_name


def regime_from_wire(value: int) -> Regime:
    """ValueError for REGIME_UNSPECIFIED or an unknown number (-> DLQ)."""
    if value == common_pb2.REGIME_UNSPECIFIED:
        raise ValueError("regime is unspecified")
    try:
        return Regime(common_pb2.Regime.Name(value))
    except ValueError:
        raise ValueError(f"unknown regime {value}") from None


def regime_detected(
    symbol: str, seq: int, state: RegimeState, previous: Regime, ts_init_ns: int
) -> market_pb2.RegimeDetected:
    """The regime decided on the bar closed by event `seq` of `symbol`."""
    f = state.features
    return market_pb2.RegimeDetected(
        event_id=f"{symbol}:{seq}",
        symbol=symbol,
        ts_event_ns=f.ts_ns,
        ts_init_ns=ts_init_ns,
        regime=regime_to_wire(state.regime),
        confidence=state.confidence,
        changed=state.changed,
        previous_regime=regime_to_wire(previous),
        since_ts_ns=state.since_ts_ns,
        features=market_pb2.RegimeFeatures(
            sigma_ann=f.sigma_ann,
            trend_score=f.trend_score,
            drawdown=f.drawdown,
            efficiency=f.efficiency,
            momentum=f.momentum_t,
            warm=f.warm,
            rally=f.rally,
            close=f.close,
            bars_seen=f.bars_seen,
        ),
    )


def regime_state(message: market_pb2.RegimeDetected) -> RegimeState:
    """The RegimeState a RegimeDetected was made from (exact: doubles are doubles)."""
    f = message.features
    features = Features(
        ts_ns=message.ts_event_ns,
        close=f.close,
        bars_seen=f.bars_seen,
        sigma_ann=f.sigma_ann,
        efficiency=tuple(f.efficiency),
        momentum_t=tuple(f.momentum),
        trend_score=f.trend_score,
        drawdown=f.drawdown,
        rally=f.rally,
        warm=f.warm,
    )
    return RegimeState(
        regime=regime_from_wire(message.regime),
        confidence=message.confidence,
        since_ts_ns=message.since_ts_ns,
        changed=message.changed,
        features=features,
    )


def side_to_wire(side: Side) -> common_pb2.Side:
    return common_pb2.LONG if side is Side.LONG else common_pb2.SHORT


def side_from_wire(value: int) -> Side:
    if value == common_pb2.LONG:
        return Side.LONG
    if value == common_pb2.SHORT:
        return Side.SHORT
    raise ValueError(f"side must be LONG or SHORT, got {value}")


def target_changed(
    symbol: str, seq: int, decision: LeverageTargetChanged, ts_init_ns: int
) -> leverage_pb2.LeverageTargetChanged:
    """A decision taken on event `seq` of `symbol`; its id is `<symbol>:<seq>:<product>`."""
    return leverage_pb2.LeverageTargetChanged(
        event_id=f"{symbol}:{seq}:{decision.product}",
        product=decision.product,
        symbol=symbol,
        side=side_to_wire(decision.side),
        ts_event_ns=decision.ts_ns,
        ts_init_ns=ts_init_ns,
        target_leverage=decimal_to_wire(decision.target, name="target"),
        previous_target=decimal_to_wire(decision.previous_target, name="previous_target"),
        rebalance=decision.rebalance,
        emergency=decision.emergency,
        reasons=decision.reasons,
        price=decimal_to_wire(decision.price, name="price"),
        regime=regime_to_wire(decision.regime),
        anchor=decision.anchor or 0.0,
    )


def decision(message: leverage_pb2.LeverageTargetChanged) -> LeverageTargetChanged:
    """The core decision a LeverageTargetChanged carries (ValueError on bad fields)."""
    return LeverageTargetChanged(
        product=message.product,
        side=side_from_wire(message.side),
        ts_ns=message.ts_event_ns,
        price=decimal_from_wire(message.price, name="price"),
        target=decimal_from_wire(message.target_leverage, name="target_leverage"),
        previous_target=decimal_from_wire(message.previous_target, name="previous_target"),
        rebalance=message.rebalance,
        emergency=message.emergency,
        reasons=tuple(message.reasons),
        regime=str(regime_from_wire(message.regime)),
        anchor=anchor(message.anchor),
    )


def anchor(value: float) -> float | None:
    """A decision's anchor from the wire: 0 (the field's default) is none; one that is not
    a positive finite price is refused."""
    if value == 0.0:
        return None
    if not 0.0 < value < math.inf:
        raise ValueError(f"anchor: {value!r} is not a positive finite price")
    return value


def targets_update(
    market: market_pb2.MarketEvent,
    symbol: str,
    seq: int,
    bar_closed: bool,
    regime: str,
    decisions: list[LeverageTargetChanged],
    ts_init_ns: int,
) -> leverage_pb2.TargetsUpdate:
    """What leverage.targets carries for one market event (funding: no decisions)."""
    return leverage_pb2.TargetsUpdate(
        market=market,
        bar_closed=bar_closed,
        regime=regime_to_wire(regime),
        targets=[target_changed(symbol, seq, d, ts_init_ns) for d in decisions],
    )
