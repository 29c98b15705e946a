"""Leverage service: every RegimeUpdate in, one TargetsUpdate out (docs/pipeline.md).

    python -m services.leverage        (settings: SMARTLEV_LEVERAGE_*, services/leverage/config.py)

Per event: read the symbol's controllers from Redis, skip a redelivered seq, `decide`,
publish and wait for the ack, then write the new state (seq-guarded, atomic).
"""

from __future__ import annotations

import time

import faust
from redis.asyncio import Redis

from services.leverage.config import LeverageSettings
from services.leverage.state import SymbolControllers, parse_regime_update, restore
from shared.core.config import StrategyConfig
from shared.redis_store import ApplyOnceStore
from shared.stream import StreamRuntime, is_new
from shared.topics import LEVERAGE_TARGETS, MARKET_REGIMES

STATE = "controllers"


def build(settings: LeverageSettings, config: StrategyConfig | None = None) -> StreamRuntime:
    """The runtime with the leverage agent registered (tests run it in-process)."""
    config = config or StrategyConfig()
    runtime = StreamRuntime(settings)
    regimes = runtime.input(MARKET_REGIMES)
    targets = runtime.output(LEVERAGE_TARGETS)
    runtime.redis = redis = Redis.from_url(settings.redis_url)
    runtime.on_stop(redis.aclose)
    store = ApplyOnceStore(redis, namespace=f"{settings.namespace}lev")

    async def load(symbol: str) -> SymbolControllers:
        fields, _ = await store.read(symbol, STATE)
        return restore(symbol, config, fields)

    @runtime.app.agent(regimes.topic, name="leverage")
    async def leverage(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            update = await runtime.parse(regimes, event, parse_regime_update)
            if update is None:
                continue
            market = update.market
            state = await load(market.symbol)
            if not is_new(state.last_seq, market.seq):
                runtime.skipped(regimes)
                continue
            await runtime.send(targets, market.symbol, state.step(update, time.time_ns()))
            result = await store.apply(
                market.symbol,
                {store.state_key(market.symbol, STATE): state.fields()},
                source="seq",
                offset=market.seq,
            )
            if not result.applied:
                runtime.log.warning("state_not_written", symbol=market.symbol, seq=market.seq)
            runtime.processed(regimes, market.ts_init_ns)

    return runtime


def main() -> None:
    build(LeverageSettings()).run()


if __name__ == "__main__":
    main()
