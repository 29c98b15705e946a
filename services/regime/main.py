"""Regime service: every market event in, one RegimeUpdate out (docs/pipeline.md).

    python -m services.regime          (settings: SMARTLEV_REGIME_*, services/regime/config.py)

Per symbol a `SignalPipeline` lives in memory; its state is kept in the faust table
`regime-state` (changelog in Kafka, see services/regime/state.py), so a partition that
moves to another instance takes its symbols' state along. The in-memory pipeline is
used only while its seq matches the table's, i.e. nobody else moved the symbol on.
"""

from __future__ import annotations

import time

import faust

from services.regime.config import RegimeSettings
from services.regime.state import SymbolSignals, restore, signal_key
from shared.core.config import StrategyConfig
from shared.stream import StreamRuntime, is_new, parse_market
from shared.topics import MARKET_REGIMES, MARKET_TICKS

TABLE = "regime-state"


def build(settings: RegimeSettings, config: StrategyConfig | None = None) -> StreamRuntime:
    """The runtime with the regime agent registered (tests run it in-process)."""
    config = config or StrategyConfig()
    runtime = StreamRuntime(settings)
    ticks = runtime.input(MARKET_TICKS)
    regimes = runtime.output(MARKET_REGIMES)
    table = runtime.app.Table(TABLE, default=None, partitions=MARKET_TICKS.partitions)
    live: dict[str, SymbolSignals] = {}

    def load(symbol: str) -> SymbolSignals:
        row = table.get(symbol)
        cached = live.pop(symbol, None)
        if cached is not None and cached.last_seq == (None if row is None else row["seq"]):
            return cached
        return restore(symbol, config, row, table.get(signal_key(symbol)))

    @runtime.app.agent(ticks.topic, name="regime")
    async def regime(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            market = await runtime.parse(ticks, event, parse_market)
            if market is None:
                continue
            symbol = market.symbol
            signals = load(symbol)
            if not is_new(signals.last_seq, market.seq):
                live[symbol] = signals
                runtime.skipped(ticks)
                continue
            try:
                update, closed = signals.step(market, time.time_ns())
            except ValueError as exc:  # a tick back in time; the state is unchanged
                live[symbol] = signals
                await runtime.reject(ticks, event, str(exc))
                continue
            await runtime.send(regimes, symbol, update)
            if closed:
                table[signal_key(symbol)] = signals.signal_row()
            table[symbol] = signals.tick_row()
            live[symbol] = signals
            runtime.processed(ticks, market.ts_init_ns)

    return runtime


def main() -> None:
    build(RegimeSettings()).run()


if __name__ == "__main__":
    main()
