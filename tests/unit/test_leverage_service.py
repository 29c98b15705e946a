"""The leverage service's pure parts: the wire round trip of regimes and decisions, and
a leverage stage fed through the wire deciding exactly as `decide` does in-process."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from smartlev.v1 import leverage_pb2, market_pb2

from services.leverage.state import SymbolControllers, parse_regime_update, restore
from services.regime.state import SymbolSignals
from shared import codec
from shared.core.engine import SignalPipeline, decide, funding_paid, risk_price
from shared.core.events import LeverageTargetChanged, Reason
from shared.core.market import NS_PER_HOUR, FundingRate, Side, Tick
from shared.core.products import smart_controllers
from shared.core.regime import Regime
from shared.stream import MarketInput
from shared.wire import decision, regime_to_wire, target_changed
from tests.unit.core_stubs import SYMBOL, T0, fast_config


def market_inputs(
    moves: list[int], funding_every: int = 9, rate: str = "0.0001"
) -> list[MarketInput]:
    """A random walk in basis points, ticks every 20 minutes, with funding now and then."""
    out = []
    price = Decimal(20000)
    for seq, move in enumerate(moves, start=1):
        ts = T0 + seq * NS_PER_HOUR // 3
        if seq % funding_every == 0:
            funding = FundingRate(SYMBOL, ts, Decimal(rate))
            message = codec.market_event_from_funding(funding, seq=seq, source="t", ts_init_ns=0)
            out.append(MarketInput(message, SYMBOL, seq, 0, funding))
            continue
        price = max(Decimal(1), (price * (10000 + move) / 10000).quantize(Decimal("0.1")))
        mark = price + Decimal("0.5") if seq % 2 else None
        tick = Tick(SYMBOL, ts, price, mark)
        message = codec.market_event_from_tick(tick, seq=seq, source="t", ts_init_ns=0)
        out.append(MarketInput(message, SYMBOL, seq, 0, tick))
    return out


@settings(max_examples=25, deadline=None)
@given(
    moves=st.lists(st.integers(-900, 900), min_size=30, max_size=250),
    rate=st.sampled_from(["0.0001", "-0.02", "0.03"]),
)
def test_decisions_through_the_wire_equal_in_process_decide(moves: list[int], rate: str) -> None:
    """regime stage -> bytes -> leverage stage (restored from its stored JSON before every
    event) == SignalPipeline + decide (and funding_paid at the last mark) in one process."""
    config = fast_config()
    signals = SymbolSignals(SignalPipeline(SYMBOL, config.features, config.regime))
    pipeline = SignalPipeline(SYMBOL, config.features, config.regime)
    controllers = smart_controllers(SYMBOL, config)
    fields: dict[str, str] = {}
    mark, shown = 0.0, Regime.RANGE  # the regime users see: the last closed bar's
    for market in market_inputs(moves, funding_every=4, rate=rate):
        regime_update, _ = signals.step(market, 0)
        wire = codec.decode(market_pb2.RegimeUpdate, codec.encode(regime_update))
        stage = restore(SYMBOL, config, fields)
        out = stage.step(parse_regime_update(wire), ts_init_ns=0)
        fields = {k: str(v) for k, v in stage.fields().items()}

        tick = market.value
        expected: list[LeverageTargetChanged] = []
        regime = None
        if isinstance(tick, Tick):
            regime = pipeline.on_tick(tick.ts_ns, tick.price)
            shown = shown if regime is None else regime.regime
            mark = risk_price(tick)
            expected = decide(controllers, tick.ts_ns, tick.price, mark, regime)
        else:
            funding_paid(controllers, tick, mark)
        # the models too, not only what they decided (a mark other than the books' for
        # funding decides alike for a while)
        assert [c.snapshot() for c in stage.controllers] == [c.snapshot() for c in controllers]
        out = codec.decode(leverage_pb2.TargetsUpdate, codec.encode(out))
        assert out.market == market.message
        assert out.bar_closed == (regime is not None)
        assert out.regime == regime_to_wire(shown)  # what nav.updates and the CLI show
        assert [decision(t) for t in out.targets] == expected
        for target, want in zip(out.targets, expected, strict=True):
            assert target.event_id == f"{SYMBOL}:{market.seq}:{want.product}"
            assert target.target_leverage == str(want.target)


def test_decision_round_trips_exactly() -> None:
    original = LeverageTargetChanged(
        product="BTC-USDT:SHORT",
        side=Side.SHORT,
        ts_ns=T0,
        price=Decimal("43210.10"),
        target=Decimal("2.35"),
        previous_target=Decimal("1.00"),
        rebalance=True,
        emergency=True,
        reasons=(Reason.EMERGENCY_ADVERSE_MOVE,),
        regime="HIGH_VOL",
        anchor=43198.123456789012,  # a mark, to the float's last bit
    )
    message = target_changed(SYMBOL, 7, original, ts_init_ns=1)
    assert message.event_id == "BTC-USDT:7:BTC-USDT:SHORT"
    assert (message.price, message.target_leverage) == ("43210.10", "2.35")
    wire = codec.decode(leverage_pb2.LeverageTargetChanged, codec.encode(message))
    assert decision(wire) == original
    unanchored = replace(original, rebalance=False, anchor=None)
    assert decision(target_changed(SYMBOL, 7, unanchored, ts_init_ns=1)) == unanchored


@pytest.mark.parametrize("anchor", [-1.0, float("nan"), float("inf")])
def test_a_decision_anchored_at_no_price_is_refused(anchor: float) -> None:
    """Hedging sizes a new position on it: one it could not size on is dead-lettered."""
    message = leverage_pb2.LeverageTargetChanged(
        product="BTC-USDT:LONG", side=1, price="1", target_leverage="2", previous_target="2",
        regime=1, anchor=anchor,
    )  # fmt: skip
    with pytest.raises(ValueError, match="anchor"):
        decision(message)


def test_funding_passes_with_no_decision_and_keeps_the_regime() -> None:
    config = fast_config()
    stage = SymbolControllers(smart_controllers(SYMBOL, config), regime="TREND_UP")
    [funding] = [m for m in market_inputs([0] * 9) if isinstance(m.value, FundingRate)]
    out = stage.step(parse_regime_update(market_pb2.RegimeUpdate(market=funding.message)), 0)
    assert not out.targets and not out.bar_closed
    assert out.regime == leverage_pb2.TargetsUpdate(regime="TREND_UP").regime
    assert stage.last_seq == 9


def test_invalid_regime_updates_are_refused() -> None:
    [tick, *_] = market_inputs([0] * 3)
    funding = next(m for m in market_inputs([0] * 9) if isinstance(m.value, FundingRate))
    regime = market_pb2.RegimeDetected(event_id="x", symbol=SYMBOL, regime="RANGE")
    with pytest.raises(ValueError, match="no market event"):
        parse_regime_update(market_pb2.RegimeUpdate(regime=regime))
    with pytest.raises(ValueError, match="only come with a tick"):
        parse_regime_update(market_pb2.RegimeUpdate(market=funding.message, regime=regime))
    other = market_pb2.RegimeDetected(event_id="x", symbol="ETH-USDT", regime="RANGE")
    with pytest.raises(ValueError, match="on a 'BTC-USDT' tick"):
        parse_regime_update(market_pb2.RegimeUpdate(market=tick.message, regime=other))
    unspecified = market_pb2.RegimeDetected(event_id="x", symbol=SYMBOL)
    with pytest.raises(ValueError, match="unspecified"):
        parse_regime_update(market_pb2.RegimeUpdate(market=tick.message, regime=unspecified))


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("confidence", float("nan"), "confidence is not finite"),
        ("confidence", 1.5, "confidence must be within"),
        ("features.sigma_ann", float("nan"), "sigma_ann is not finite"),
        ("features.sigma_ann", -0.1, "sigma_ann must be >= 0"),
        ("features.trend_score", float("inf"), "trend_score is not finite"),
        ("features.efficiency", [0.5, float("nan")], r"efficiency\[1\] is not finite"),
        ("features.momentum", [float("-inf")], r"momentum\[0\] is not finite"),
    ],
)
def test_a_regime_with_numbers_the_policy_cannot_use_is_refused(
    field: str, value: object, reason: str
) -> None:
    """A NaN confidence or volatility would reach the policy on a warm regime and raise
    there, outside the parse: the stage would stop on the record at every restart."""
    [tick, *_] = market_inputs([0] * 3)
    regime = market_pb2.RegimeDetected(
        event_id="x", symbol=SYMBOL, regime="TREND_UP", confidence=0.8
    )
    regime.features.warm = True
    regime.features.sigma_ann = 0.6
    target, _, name = field.rpartition(".")
    holder = regime.features if target else regime
    if isinstance(value, list):
        getattr(holder, name).extend(value)
    else:
        setattr(holder, name, value)
    update = market_pb2.RegimeUpdate(market=tick.message, regime=regime)
    with pytest.raises(ValueError, match=reason):
        parse_regime_update(update)


def test_stored_fields_are_json_and_restore() -> None:
    config = fast_config()
    stage = SymbolControllers(smart_controllers(SYMBOL, config))
    for market in market_inputs([50, -700, 20, -800, 30] * 4):
        stage.step(parse_regime_update(market_pb2.RegimeUpdate(market=market.message)), 0)
    fields = {k: str(v) for k, v in stage.fields().items()}
    assert json.loads(fields["controllers"]).keys() == {"BTC-USDT:LONG", "BTC-USDT:SHORT"}
    again = restore(SYMBOL, config, fields)
    assert again.fields() == stage.fields()
    assert again.last_seq == stage.last_seq == 20


def test_a_mark_written_at_another_seq_is_not_trusted() -> None:
    """A rolled-back release keeps the hash's `mark` but moves its `seq`: rolled forward
    again, a funding event before the next tick must not be drawn at that stale mark."""
    config = fast_config()
    stage = SymbolControllers(smart_controllers(SYMBOL, config))
    for market in market_inputs([50, -700, 20, -800, 30] * 4):
        stage.step(parse_regime_update(market_pb2.RegimeUpdate(market=market.message)), 0)
    fields = {k: str(v) for k, v in stage.fields().items()}
    assert restore(SYMBOL, config, fields).mark == stage.mark > 0
    assert restore(SYMBOL, config, {**fields, "seq": "99"}).mark == 0.0
    older = {k: v for k, v in fields.items() if k not in ("mark", "mark_seq")}
    assert restore(SYMBOL, config, older).mark == 0.0


def test_a_restore_keeps_the_symbols_regime_and_every_digit_of_the_mark() -> None:
    """Rows held only RANGE and marks on a 0.1 grid in every test: a restore that lost
    the regime (every TargetsUpdate said RANGE until the next bar: an hour of the wrong
    regime shown to users) or cut the mark (funding modelled at it) went unseen."""
    config = fast_config()
    stage = SymbolControllers(smart_controllers(SYMBOL, config), regime="TREND_UP")
    [tick, *_] = market_inputs([0] * 3)
    stage.step(parse_regime_update(market_pb2.RegimeUpdate(market=tick.message)), 0)
    stage.mark = 1834.123456789
    again = restore(SYMBOL, config, {k: str(v) for k, v in stage.fields().items()})
    assert (again.regime, again.mark) == ("TREND_UP", 1834.123456789)
