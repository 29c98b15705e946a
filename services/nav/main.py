"""`python -m services.nav`: hedge.fills -> every product marked to market -> nav.updates.

For each HedgeUpdate: a tick marks every product's books at the tick's price; an order
(no tick) re-marks the products whose units changed at the last price; funding only
moves the books, which the next tick marks. Output before state: the NavUpdated goes to
`nav.updates` and `nav.latest` (keyed by product) and is acked, then `nav:{product}` is
written in Redis together with the last applied seq (or order id), so a redelivered
event is skipped and a crash in between re-sends the same NavUpdated (same event_id).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis

from services.nav.config import NavSettings
from services.nav.marking import (
    FillsEvent,
    Marked,
    mark,
    nav_updated,
    parse_update,
    state_fields,
)
from shared.core.accounting import AccountingConfig
from shared.redis_store import ApplyOnceStore
from shared.stream import Input, StreamRuntime
from shared.topics import HEDGE_FILLS, NAV_LATEST, NAV_UPDATES

MARKET_SOURCE = "market"  # ApplyOnceStore source whose "offset" is the market seq


class NavService:
    """The shell: read the books' last marks, call the core, send, then write."""

    def __init__(self, runtime: StreamRuntime, redis: Redis, initial_nav: Decimal) -> None:
        self.runtime = runtime
        self.store = ApplyOnceStore(redis, namespace=f"{runtime.settings.namespace}nav")
        self.initial_nav = initial_nav
        self.updates = runtime.output(NAV_UPDATES)
        self.latest = runtime.output(NAV_LATEST)

    async def handle(self, event: FillsEvent) -> int:
        """Apply one event; returns how many products got a NavUpdated."""
        if event.kind == "funding":
            return 0
        current = await asyncio.gather(*(self.store.read(b.product) for b in event.books))
        pending: list[tuple[Marked, int]] = []
        for book, (fields, _) in zip(event.books, current, strict=True):
            last_seq = int(fields.get("seq", "0"))
            last_nav = Decimal(fields.get("nav", str(self.initial_nav)))
            if event.kind == "tick":
                if event.seq <= last_seq:  # redelivery: its output already went out
                    continue
                assert event.price is not None
                pending.append((mark(book, event.price, last_nav), event.seq))
            elif Decimal(fields.get("units", "0")) != book.units and not (
                await self.store.was_applied(book.product, event.event_id)
            ):
                price = Decimal(fields.get("price", "0"))
                pending.append((mark(book, price, last_nav), last_seq))
        if not pending:
            return 0
        now = time.time_ns()
        messages = [(m, seq, nav_updated(m, event, seq, now)) for m, seq in pending]
        await asyncio.gather(
            *(
                self.runtime.send(topic, m.product, message)
                for m, _, message in messages
                for topic in (self.updates, self.latest)
            )
        )
        for marked, seq, _ in messages:
            changes = {self.store.state_key(marked.product): state_fields(marked, event, seq, now)}
            if event.kind == "tick":
                await self.store.apply(
                    marked.product, changes, source=MARKET_SOURCE, offset=event.seq
                )
            else:
                await self.store.apply(marked.product, changes, message_id=event.event_id)
        return len(messages)


def build(settings: NavSettings) -> StreamRuntime:
    runtime = StreamRuntime(settings)
    redis = Redis.from_url(settings.redis_url)
    runtime.redis = redis
    runtime.on_stop(redis.aclose)
    service = NavService(runtime, redis, AccountingConfig().initial_nav)
    fills: Input = runtime.input(HEDGE_FILLS)

    async def handle(batch: list[Any]) -> None:
        # Each event reads its products' state from Redis, so a re-run of the batch after
        # a transient error (consume() retries) skips what was applied, by seq or id.
        for message in batch:
            event = await runtime.parse(fills, message, parse_update)
            if event is not None:
                await service.handle(event)
                runtime.processed(fills, event.ts_init_ns or time.time_ns())

    @runtime.app.agent(fills.topic)
    async def nav(stream: Any) -> None:
        await runtime.consume(stream, handle)

    return runtime


def main() -> None:
    build(NavSettings()).run()


if __name__ == "__main__":
    main()
