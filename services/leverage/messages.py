"""LeverageTargetChanged core <-> wire: the leverage service writes it, hedging reads it
back. Decimals travel as exact strings, so the decision hedging executes is the one
`decide` took, to the last digit."""

from __future__ import annotations

from smartlev.v1 import common_pb2, leverage_pb2, market_pb2

from services.regime.messages import regime_from_wire, regime_to_wire
from shared.codec import decimal_from_wire, decimal_to_wire
from shared.core.events import LeverageTargetChanged
from shared.core.market import Side


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
    )


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
