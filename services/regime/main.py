"""Regime service: every market event in, one RegimeUpdate out (docs/pipeline.md).

    python -m services.regime          (settings: SMARTLEV_REGIME_*, services/regime/config.py)

Per symbol a `SignalPipeline` lives in memory; its state is kept in the faust table
`regime-state` (changelog in Kafka, see services/regime/state.py), so a partition that
moves to another instance takes its symbols' state along. The in-memory pipeline is
used only while its seq matches the table's, i.e. nobody else moved the symbol on.
Events are handled in batches (shared/stream.py: outputs acked together, then the
rows of each symbol once).
"""

from __future__ import annotations

import time
from functools import partial

import faust
from faust.types import EventT

from services.regime.config import RegimeSettings
from services.regime.state import SymbolSignals, restore, signal_key
from shared.settings import from_environment
from shared.stream import Outgoing, StreamRuntime, acting_on, is_new, parse_market
from shared.topics import COMPACTED_SEGMENT_MS, MARKET_REGIMES, MARKET_TICKS

TABLE = "regime-state"


def build(settings: RegimeSettings) -> StreamRuntime:
    """The runtime with the regime agent registered (tests run it in-process)."""
    config = settings.strategy
    runtime = StreamRuntime(settings)
    ticks = runtime.input(MARKET_TICKS)
    regimes = runtime.output(MARKET_REGIMES)
    table = runtime.app.Table(
        TABLE,
        default=None,
        partitions=MARKET_TICKS.partitions,
        # its changelog is compacted: a restart replays an hour's rows, not a week's
        extra_topic_configs={"segment.ms": str(COMPACTED_SEGMENT_MS)},
    )
    live: dict[str, SymbolSignals] = {}
    parse_known = partial(parse_market, instruments=config.instruments)

    def load(symbol: str) -> SymbolSignals:
        row = table.get(symbol)
        cached = live.pop(symbol, None)
        if cached is not None and cached.last_seq == (None if row is None else row["seq"]):
            return cached
        return restore(symbol, config, row, table.get(signal_key(symbol)))

    async def handle(batch: list[EventT]) -> None:
        """Outputs of the whole batch in order, acked together, then each symbol's rows."""
        touched: dict[str, tuple[SymbolSignals, bool]] = {}
        last_event: dict[str, EventT] = {}
        outputs: list[Outgoing] = []
        done: list[int] = []
        for event in batch:
            market = await runtime.parse(ticks, event.message, parse_known)
            if market is None:
                continue
            symbol = market.symbol
            last_event[symbol] = event
            signals, closed = touched.get(symbol) or (load(symbol), False)
            touched[symbol] = (signals, closed)
            if not is_new(signals.last_seq, market.seq):
                runtime.skipped(ticks)
                continue
            try:
                update, bar_closed = signals.step(market, time.time_ns())
            except ValueError as exc:  # a tick back in time; the state is unchanged
                await runtime.reject(ticks, event.message, str(exc))
                continue
            touched[symbol] = (signals, closed or bar_closed)
            outputs.append((regimes, symbol, update))
            done.append(market.ts_init_ns)
        await runtime.send_many(outputs)
        for symbol, (signals, closed) in touched.items():
            with acting_on(last_event[symbol]):  # the changelog partition of the symbol
                for key, row in signals.rows(symbol, closed):
                    table[key] = row
            live[symbol] = signals
        for ts_init_ns in done:
            runtime.processed(ticks, ts_init_ns)

    @runtime.app.agent(ticks.topic, name="regime")
    async def regime(stream: faust.StreamT[bytes]) -> None:
        await runtime.consume(stream, handle)

    return runtime


def main() -> None:
    build(from_environment(RegimeSettings)).run()


if __name__ == "__main__":
    main()
