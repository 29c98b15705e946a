"""The regime service's pure parts: RegimeState <-> RegimeDetected (exact), and the
per-symbol state rows, which restore to the uninterrupted state at any event."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from smartlev.v1 import market_pb2

from services.regime.state import SymbolSignals, restore, signal_key
from shared import codec
from shared.core.engine import SignalPipeline
from shared.core.features import Features, SnapshotIncompatible
from shared.core.market import NS_PER_HOUR, FundingRate, Tick
from shared.core.regime import Regime, RegimeState
from shared.stream import MarketInput
from shared.wire import regime_detected, regime_state, regime_to_wire
from tests.unit.core_stubs import SYMBOL, T0, fast_config

finite = st.floats(allow_nan=False, allow_infinity=False)


@given(
    regime=st.sampled_from(list(Regime)),
    previous=st.sampled_from(list(Regime)),
    confidence=st.floats(0, 1),
    changed=st.booleans(),
    warm=st.booleans(),
    values=st.lists(finite, min_size=6, max_size=6),
    horizons=st.lists(st.tuples(finite, finite), min_size=1, max_size=4),
    bars=st.integers(0, 2**62),
    since=st.integers(0, 2**62),
)
def test_regime_round_trips_exactly_through_the_wire(
    regime: Regime,
    previous: Regime,
    confidence: float,
    changed: bool,
    warm: bool,
    values: list[float],
    horizons: list[tuple[float, float]],
    bars: int,
    since: int,
) -> None:
    close, sigma, trend, drawdown, rally, _ = values
    features = Features(
        T0,
        close,
        bars,
        sigma,
        tuple(e for e, _ in horizons),
        tuple(m for _, m in horizons),
        trend,
        drawdown,
        rally,
        warm,
    )
    state = RegimeState(regime, confidence, since, changed, features)
    message = regime_detected(SYMBOL, 42, state, previous, ts_init_ns=1)
    wire = codec.decode(market_pb2.RegimeDetected, codec.encode(message))
    assert regime_state(wire) == state
    assert wire.event_id == "BTC-USDT:42"
    assert wire.previous_regime == regime_to_wire(previous)


def market_inputs(prices: list[str]) -> list[MarketInput]:
    """Ticks every 20 minutes (a bar closes every third tick), a funding every 8th event."""
    out = []
    for seq, price in enumerate(prices, start=1):
        ts = T0 + seq * NS_PER_HOUR // 3
        if seq % 8 == 0:
            value: Tick | FundingRate = FundingRate(SYMBOL, ts, Decimal("0.0001"))
            message = codec.market_event_from_funding(value, seq=seq, source="t", ts_init_ns=0)
        else:
            value = Tick(SYMBOL, ts, Decimal(price))
            message = codec.market_event_from_tick(value, seq=seq, source="t", ts_init_ns=0)
        out.append(MarketInput(message, SYMBOL, seq, 0, value))
    return out


PRICES = [str(100 + (i * 37) % 23 - (i // 10) % 7) for i in range(300)]


def test_step_forwards_every_event_and_equals_the_pipeline() -> None:
    config = fast_config()
    signals = SymbolSignals(SignalPipeline(SYMBOL, config.features, config.regime))
    reference = SignalPipeline(SYMBOL, config.features, config.regime)
    closed_bars = 0
    for market in market_inputs(PRICES):
        update, closed = signals.step(market, ts_init_ns=5)
        assert update.market == market.message
        expected = None
        if isinstance(market.value, Tick):
            expected = reference.on_tick(market.value.ts_ns, market.value.price)
        assert closed == (expected is not None) == update.HasField("regime")
        if expected is not None:
            closed_bars += 1
            assert regime_state(update.regime) == expected
            assert update.regime.event_id == f"{SYMBOL}:{market.seq}"
        assert signals.last_seq == market.seq
    assert closed_bars > 50


def test_an_event_that_does_not_move_past_the_last_is_refused_across_restarts() -> None:
    """Ingestion refuses them; another producer's reached every stage after this one: a
    funding settled again (under a new seq), late or back in time was paid each time
    by hedging's books (long equity 999,000 -> 989,010 -> 979,020 -> 969,030)."""
    config = fast_config()
    signals = SymbolSignals(SignalPipeline(SYMBOL, config.features, config.regime))
    inputs = market_inputs(PRICES[:16])  # a funding at seq 8 and 16, ticks between
    for market in inputs:
        signals.step(market, 0)
    funding, tick = inputs[15], inputs[14]
    assert isinstance(funding.value, FundingRate) and isinstance(tick.value, Tick)

    def again(market: MarketInput, seq: int, ts_ns: int) -> MarketInput:
        value = market.value._replace(ts_ns=ts_ns)
        return MarketInput(market.message, SYMBOL, seq, 0, value)

    last_hour = funding.value.ts_ns
    refused = {
        "the same settlement again": again(funding, 17, last_hour),
        "a settlement back in time": again(funding, 17, last_hour - NS_PER_HOUR),
        "a tick back in time": again(tick, 17, last_hour - 1),
    }
    table = dict(json.loads(json.dumps(signals.rows(SYMBOL, True))))
    for state in (signals, restore(SYMBOL, config, table[SYMBOL], table[signal_key(SYMBOL)])):
        before = state.tick_row(), state.signal_row()
        for what, market in refused.items():
            with pytest.raises(ValueError, match="does not move past the last funding"):
                state.step(market, 0)
            assert (state.tick_row(), state.signal_row()) == before, what
        # a tick at the settlement's instant comes after it: taken
        state.step(again(tick, 17, last_hour), 0)
        assert state.last_seq == 17


@pytest.mark.parametrize("batch", [1, 2, 7, 50])
def test_rows_restore_the_uninterrupted_state_after_every_batch(batch: int) -> None:
    """Rows written once per batch (the service's way) restore, before every batch, the
    state an uninterrupted pipeline has there; a batch re-run from them gives the same
    outputs."""
    config = fast_config()
    inputs = market_inputs(PRICES)
    live = SymbolSignals(SignalPipeline(SYMBOL, config.features, config.regime))
    table: dict[str, Any] = {}
    outputs = []
    for start in range(0, len(inputs), batch):
        # A restart before every batch, from the rows as the table holds them (JSON).
        restored = restore(SYMBOL, config, table.get(SYMBOL), table.get(signal_key(SYMBOL)))
        assert restored.last_seq == live.last_seq and restored.regime == live.regime
        assert restored.last_key == live.last_key
        closed_any = False
        for market in inputs[start : start + batch]:
            out, closed = restored.step(market, 0)
            expected, _ = live.step(market, 0)
            assert out == expected
            outputs.append(out)
            closed_any = closed_any or closed
        table.update(json.loads(json.dumps(restored.rows(SYMBOL, closed_any))))
    assert sum(o.HasField("regime") for o in outputs) > 50


def test_a_stop_between_the_two_writes_of_a_bar_close_resumes_from_the_snapshot() -> None:
    config = fast_config()
    signals = SymbolSignals(SignalPipeline(SYMBOL, config.features, config.regime))
    tick_row = None
    for market in market_inputs(PRICES[:40]):
        _, closed = signals.step(market, 0)
        rows = dict(signals.rows(SYMBOL, closed))
        if closed:
            # Only the signal row made it: it is the newer state.
            resumed = restore(SYMBOL, config, tick_row, rows[signal_key(SYMBOL)])
            assert resumed.tick_row() == signals.tick_row()
            assert resumed.last_seq == market.seq
        tick_row = rows[SYMBOL]


def test_the_per_tick_row_stays_small_while_the_snapshot_grows() -> None:
    """Every tick writes the tick row to the table's changelog; the full snapshot only at
    a bar close. The row must not carry the snapshot, nor grow with the history."""
    config = fast_config()
    signals = SymbolSignals(SignalPipeline(SYMBOL, config.features, config.regime))
    sizes = []
    for i, market in enumerate(market_inputs(PRICES), start=1):
        signals.step(market, 0)
        if i in (100, len(PRICES)):
            rows = dict(signals.rows(SYMBOL, True))
            sizes.append((len(json.dumps(signals.tick_row())), len(json.dumps(rows))))
    (row_early, snapshot_early), (row_late, _) = sizes
    assert len(PRICES) >= 300
    assert row_late <= row_early + 64  # a few digits more, no history
    assert row_early * 5 < snapshot_early


@pytest.mark.parametrize(
    "changed",
    [
        {"features": {"vol_halflife_bars": 6.0}},  # another threshold
        {"features": {"trend_horizons": (3, 6, 24)}},  # windows of another length
        {"regime": {"min_dwell_bars": 3}},
        {"features": {"bar_seconds": 1800}},  # bars of another length
    ],
)
def test_rows_of_another_configuration_start_the_signals_afresh(changed: dict[str, Any]) -> None:
    """A release that changes a default restores rows written under the old one: the
    signals start afresh after their last seq (they stopped the stage at every restart:
    ValueError, or bars kept silently at the old length), and the next write replaces
    the old snapshot, so the restart after it goes on from there."""
    old = fast_config()
    parts = {name: getattr(old, name).model_copy(update=f) for name, f in changed.items()}
    new = old.model_copy(update=parts)
    inputs = market_inputs(PRICES)
    signals = SymbolSignals(SignalPipeline(SYMBOL, old.features, old.regime))
    table: dict[str, Any] = {}
    for market in inputs[:100]:
        _, closed = signals.step(market, 0)
        table.update(json.loads(json.dumps(signals.rows(SYMBOL, closed))))
    assert table[signal_key(SYMBOL)]["seq"] < 100  # the snapshot is from an earlier bar
    old_signal_row = table[signal_key(SYMBOL)]
    snapshot = old_signal_row["pipeline"]
    with pytest.raises(ValueError):  # the old rows cannot go on under the new config
        SignalPipeline.restore(SYMBOL, new.features, new.regime, snapshot)
    resumed = restore(SYMBOL, new, table[SYMBOL], table[signal_key(SYMBOL)])
    assert (resumed.last_seq, resumed.pipeline.bars.snapshot()["last_ts_ns"]) == (100, None)
    # the old rows' order key kept: an event at or before where they stood (a funding
    # settled again under the next seq) is refused, as without a reset
    assert resumed.last_key is not None and resumed.last_key == signals.last_key
    reference = SymbolSignals(SignalPipeline(SYMBOL, new.features, new.regime), 100)
    for market in inputs[100:110]:
        assert resumed.step(market, 0) == reference.step(market, 0)
    old_tick_row = table[SYMBOL]
    table.update(json.loads(json.dumps(resumed.rows(SYMBOL, False))))
    assert table[signal_key(SYMBOL)]["seq"] == 110  # the old snapshot replaced
    again = restore(SYMBOL, new, table[SYMBOL], table[signal_key(SYMBOL)])
    assert again.tick_row() == resumed.tick_row() and not again.reset
    # Stopped between the two writes of the first batch after a reset, all of it
    # redeliveries (the fresh snapshot at the old rows' last seq, the old tick row left)
    reset = restore(SYMBOL, new, old_tick_row, old_signal_row)
    [(_, first_write), _] = reset.rows(SYMBOL, False)
    fresh_start = restore(SYMBOL, new, old_tick_row, json.loads(json.dumps(first_write)))
    assert (fresh_start.last_seq, fresh_start.reset) == (100, False)


def test_corrupt_rows_still_stop_the_stage_and_another_format_resets() -> None:
    """Rows that fit neither their own configuration nor their format are corruption: a
    plain ValueError (the stage stops on it), not a reset that would hide it; a snapshot
    of another format version (a release) starts afresh like another configuration."""
    config = fast_config()
    signals = SymbolSignals(SignalPipeline(SYMBOL, config.features, config.regime))
    table: dict[str, Any] = {}
    for market in market_inputs(PRICES[:60]):
        _, closed = signals.step(market, 0)
        table.update(json.loads(json.dumps(signals.rows(SYMBOL, closed))))
    tick_row, signal_row = table[SYMBOL], table[signal_key(SYMBOL)]
    short_ring = json.loads(json.dumps(signal_row))
    short_ring["pipeline"]["features"]["log_ring"].pop()
    with pytest.raises(ValueError, match="ring size") as caught:
        restore(SYMBOL, config, tick_row, short_ring)
    assert not isinstance(caught.value, SnapshotIncompatible)
    other_bars = json.loads(json.dumps(tick_row))
    other_bars["bars"]["interval_ns"] //= 2
    with pytest.raises(ValueError, match="snapshot bars of") as caught:
        restore(SYMBOL, config, other_bars, signal_row)
    assert not isinstance(caught.value, SnapshotIncompatible)
    newer_format = json.loads(json.dumps(signal_row))
    newer_format["pipeline"]["classifier"]["version"] = 99
    reset = restore(SYMBOL, config, tick_row, newer_format)
    assert reset.reset and reset.last_seq == tick_row["seq"]
