"""Leverage service: every RegimeUpdate in, one TargetsUpdate out (docs/pipeline.md).

    python -m services.leverage        (settings: SMARTLEV_LEVERAGE_*, services/leverage/config.py)

Per batch of events (shared/stream.py): read each symbol's controllers from Redis once,
skip redelivered seqs, `decide` every event in order, publish all outputs and wait for
the acks, then write each symbol's new state once (seq-guarded, atomic).
"""

from __future__ import annotations

import asyncio
import time
from functools import partial

import faust
from faust.types import EventT

from services.leverage.config import LeverageSettings
from services.leverage.state import SymbolControllers, parse_regime_update, restore
from shared.redis_store import ApplyOnceStore
from shared.settings import from_environment
from shared.stream import Outgoing, StreamRuntime, is_new
from shared.topics import LEVERAGE_TARGETS, MARKET_REGIMES

STATE = "controllers"


def build(settings: LeverageSettings) -> StreamRuntime:
    """The runtime with the leverage agent registered (tests run it in-process)."""
    config = settings.strategy
    runtime = StreamRuntime(settings)
    regimes = runtime.input(MARKET_REGIMES)
    targets = runtime.output(LEVERAGE_TARGETS)
    store = ApplyOnceStore(runtime.connect_redis(), namespace=f"{settings.namespace}lev")
    parse_known = partial(parse_regime_update, instruments=config.instruments)

    async def load(symbol: str) -> SymbolControllers:
        fields, _ = await store.read(symbol, STATE)
        return restore(symbol, config, fields)

    async def handle(batch: list[EventT]) -> None:
        """Outputs of the whole batch in order, acked together, then per symbol one
        seq-guarded write of the state after its last event."""
        states: dict[str, SymbolControllers] = {}
        changed: set[str] = set()
        outputs: list[Outgoing] = []
        done: list[int] = []
        for event in batch:
            update = await runtime.parse(regimes, event.message, parse_known)
            if update is None:
                continue
            market = update.market
            state = states.get(market.symbol) or await load(market.symbol)
            states[market.symbol] = state
            if not is_new(state.last_seq, market.seq):
                runtime.skipped(regimes)
                continue
            outputs.append((targets, market.symbol, state.step(update, time.time_ns())))
            changed.add(market.symbol)
            done.append(market.ts_init_ns)
        await runtime.send_many(outputs)
        symbols = sorted(changed)
        written = await asyncio.gather(
            *(
                store.apply(
                    symbol,
                    {store.state_key(symbol, STATE): states[symbol].fields()},
                    source="seq",
                    offset=states[symbol].last_seq or 0,
                )
                for symbol in symbols
            )
        )
        for symbol, result in zip(symbols, written, strict=True):
            if not result.applied:
                runtime.log.warning("state_not_written", symbol=symbol, seq=states[symbol].last_seq)
        for ts_init_ns in done:
            runtime.processed(regimes, ts_init_ns)

    @runtime.app.agent(regimes.topic, name="leverage")
    async def leverage(stream: faust.StreamT[bytes]) -> None:
        await runtime.consume(stream, handle)

    return runtime


def main() -> None:
    build(from_environment(LeverageSettings)).run()


if __name__ == "__main__":
    main()
