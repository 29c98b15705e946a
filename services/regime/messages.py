"""RegimeState <-> RegimeDetected: the regime service writes it, the leverage service reads
it back. Every field of `RegimeState` and `Features` travels, doubles as doubles, so the
state the leverage controllers see is bit for bit the one the pipeline computed."""

from __future__ import annotations

from smartlev.v1 import common_pb2, market_pb2

from shared.core.features import Features
from shared.core.regime import Regime, RegimeState


def regime_to_wire(regime: Regime | str) -> common_pb2.Regime:
    return common_pb2.Regime.Value(str(regime))


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
