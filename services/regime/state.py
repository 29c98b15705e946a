"""A symbol's signal state and how it is kept in the faust table, per tick cheaply.

A full `SignalPipeline.snapshot()` serialised to JSON costs ~150 us and ~7 KB (the
feature windows), too much for every tick. So each symbol has two table rows, written
once per batch after the batch's outputs are acked, in this order, to one changelog
partition (`rows`):

- `<symbol>|signal` if a bar closed in the batch: the full snapshot at the batch's last
  seq;
- `<symbol>` always: last seq, the bar builder (~200 bytes, ~10 us) and the seq of the
  full snapshot it continues.

`restore` rebuilds exactly the state after the last event whose rows are both in.
Rows written under another configuration or snapshot format (a release that changed
them) cannot go on under this one: the symbol's signals start afresh from the next
event, warming up again, logged, instead of stopping the stage at every restart
(corrupt rows still stop it). The live pipeline stays in
memory between events (see services/regime/main.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smartlev.v1 import market_pb2

from shared.core.config import StrategyConfig
from shared.core.engine import SignalPipeline, restore_bars
from shared.core.features import SnapshotIncompatible
from shared.core.market import OrderKey, Tick, order_key, order_kind
from shared.core.regime import Regime
from shared.logging import get_logger
from shared.stream import MarketInput
from shared.wire import regime_detected

log = get_logger("regime", "state")

Row = dict[str, Any]


def signal_key(symbol: str) -> str:
    return f"{symbol}|signal"


@dataclass(slots=True)
class SymbolSignals:
    pipeline: SignalPipeline
    last_seq: int | None = None
    signal_seq: int | None = None  # seq of the last full snapshot written
    regime: Regime = Regime.RANGE  # regime on the last closed bar
    reset: bool = False  # started afresh: the next write replaces the stored snapshot
    last_key: OrderKey | None = None  # where the last event stood (`order_key`)

    def step(self, market: MarketInput, ts_init_ns: int) -> tuple[market_pb2.RegimeUpdate, bool]:
        """Apply one event: the RegimeUpdate to publish, and whether a bar closed.
        ValueError (an event that does not move past the last one, as ingestion refuses
        it: a tick back in time, a funding settled again or late, which every stage
        after this one would pay again) leaves the state unchanged."""
        key = order_key(market.value)
        if self.last_key is not None and key <= self.last_key:
            raise ValueError(
                f"{order_kind(key)} at ts {key[0]} does not move past the last "
                f"{order_kind(self.last_key)} at {self.last_key[0]}"
            )
        update = market_pb2.RegimeUpdate(market=market.message)
        closed = False
        tick = market.value
        if isinstance(tick, Tick):
            state = self.pipeline.on_tick(tick.ts_ns, tick.price)
            if state is not None:
                detected = regime_detected(
                    market.symbol, market.seq, state, self.regime, ts_init_ns
                )
                update.regime.CopyFrom(detected)
                self.regime = state.regime
                closed = True
        self.last_seq, self.last_key = market.seq, key
        return update, closed

    def rows(self, symbol: str, bar_closed: bool) -> list[tuple[str, Row]]:
        """The table rows (key, value) to write, in order, once the outputs up to
        `last_seq` are acked; `bar_closed`: a bar closed since the last write, so the
        full snapshot goes first (taken now, at `last_seq`)."""
        rows = []
        if bar_closed or self.reset:
            self.reset = False
            self.signal_seq = self.last_seq
            rows.append((signal_key(symbol), self.signal_row()))
        rows.append((symbol, self.tick_row()))
        return rows

    def tick_row(self) -> Row:
        return {
            "seq": self.last_seq,
            "signal_seq": self.signal_seq,
            "bars": self.pipeline.bars.snapshot(),
            "key": self.last_key,
        }

    def signal_row(self) -> Row:
        return {"seq": self.signal_seq, "pipeline": self.pipeline.snapshot(), "key": self.last_key}


def _key(row: Row) -> OrderKey | None:
    """A row's last event key (None: a row from before rows kept it)."""
    found = row.get("key")
    return None if found is None else (int(found[0]), int(found[1]))


def restore(
    symbol: str, config: StrategyConfig, tick_row: Row | None, signal_row: Row | None
) -> SymbolSignals:
    """The state the rows describe; no rows: a fresh pipeline; rows of another
    configuration: a fresh pipeline that goes on after their last seq."""
    try:
        return _restore(symbol, config, tick_row, signal_row)
    except SnapshotIncompatible as exc:
        rows = [row for row in (tick_row, signal_row) if row is not None]
        seqs = [int(row["seq"]) for row in rows]
        keys = [key for key in map(_key, rows) if key is not None]
        log.warning("signals_reset", symbol=symbol, reason=str(exc), after_seq=max(seqs))
        pipeline = SignalPipeline(symbol, config.features, config.regime)
        return SymbolSignals(pipeline, max(seqs), reset=True, last_key=max(keys, default=None))


def _restore(
    symbol: str, config: StrategyConfig, tick_row: Row | None, signal_row: Row | None
) -> SymbolSignals:
    features, regime = config.features, config.regime
    if signal_row is None:
        pipeline = SignalPipeline(symbol, features, regime)
        signals = SymbolSignals(pipeline)
    else:
        snapshot = signal_row["pipeline"]
        pipeline = SignalPipeline.restore(symbol, features, regime, snapshot)
        seq = int(signal_row["seq"])
        regime_then = Regime(snapshot["classifier"]["regime"])
        signals = SymbolSignals(pipeline, seq, seq, regime_then, last_key=_key(signal_row))
    last = signals.last_seq
    if tick_row is None or (
        last is not None
        and (
            tick_row["seq"] < last
            or (tick_row["seq"] == last and tick_row["signal_seq"] != signals.signal_seq)
        )
    ):
        # No tick row yet, or the process stopped between the two writes of a bar close
        # (or of the first write after a reset, at the seq the old rows stopped at): the
        # full snapshot, written first, is the newer state.
        return signals
    if tick_row["signal_seq"] != signals.signal_seq:
        raise ValueError(
            f"{symbol}: tick row continues snapshot {tick_row['signal_seq']}, "
            f"table has {signals.signal_seq}"
        )
    pipeline.bars = restore_bars(features, tick_row["bars"], corrupt=signal_row is not None)
    signals.last_seq, signals.last_key = int(tick_row["seq"]), _key(tick_row)
    return signals
