"""`python -m services.nav`: hedge.fills -> every product marked to market -> nav.updates.

For each HedgeUpdate: a tick marks every product's books at the tick's price (a run of
market events is marked together, `handle_market`); an order (no tick) re-marks the
products whose units changed at the last price; funding only moves the books, which the
next tick marks. Output before state: the NavUpdated goes to
`nav.updates` and `nav.latest` (keyed by product) and is acked, then `nav:{product}` is
written in Redis together with the last applied seq (or order id), so a redelivered
event is skipped and a crash in between re-sends the same NavUpdated (same event_id).
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

from services.nav.config import NavSettings
from services.nav.marking import (
    FillsEvent,
    Marked,
    mark,
    nav_updated,
    parse_update,
    state_fields,
)
from shared.adapters.redis_wire import RedisWire
from shared.consumer_stage import ConsumerRuntime, Records
from shared.core.accounting import AccountingConfig
from shared.redis_store import ApplyOnceStore
from shared.stream import Outgoing
from shared.topics import HEDGE_FILLS, NAV_LATEST, NAV_UPDATES

MARKET_SOURCE = "market"  # ApplyOnceStore source whose "offset" is the market seq


class NavService:
    """The shell: read the books' last marks, call the core, send, then write."""

    def __init__(self, runtime: ConsumerRuntime, redis: RedisWire, initial_nav: Decimal) -> None:
        self.runtime = runtime
        self.store = ApplyOnceStore(redis, namespace=f"{runtime.settings.namespace}nav")
        self.initial_nav = initial_nav
        self.updates = runtime.output(NAV_UPDATES)
        self.latest = runtime.output(NAV_LATEST)

    async def handle_market(self, events: list[FillsEvent]) -> int:
        """Apply a run of market events (ticks, funding) at once: one read per product,
        every NavUpdated sent before one write per product with the last seq marked.
        A product's fields merge over the run (a leverage change's `reasons` stay).
        Returns how many NavUpdateds went out."""
        products = list(dict.fromkeys(b.product for e in events for b in e.books))
        reads = await asyncio.gather(*(self.store.read(p) for p in products))
        current = {p: fields for p, (fields, _) in zip(products, reads, strict=True)}
        last_seq = {p: int(f.get("seq", "0")) for p, f in current.items()}
        last_nav = {p: Decimal(f.get("nav", str(self.initial_nav))) for p, f in current.items()}
        now = time.time_ns()
        outgoing: list[Outgoing] = []
        writes: dict[str, dict[str, str | int | Decimal]] = {}
        for event in events:
            if event.kind != "tick":
                continue  # funding moves the books; the next tick marks them
            assert event.price is not None
            for book in event.books:
                if event.seq <= last_seq[book.product]:
                    continue  # redelivery: its output already went out
                marked = mark(book, event.price, last_nav[book.product])
                message = nav_updated(marked, event, event.seq, now)
                outgoing += [(t, book.product, message) for t in (self.updates, self.latest)]
                writes.setdefault(book.product, {}).update(
                    state_fields(marked, event, event.seq, now)
                )
                last_seq[book.product], last_nav[book.product] = event.seq, marked.nav
        if not outgoing:
            return 0
        await self.runtime.send_many(outgoing)
        await asyncio.gather(
            *(
                self.store.apply(
                    product,
                    {self.store.state_key(product): fields},
                    source=MARKET_SOURCE,
                    offset=last_seq[product],
                )
                for product, fields in writes.items()
            )
        )
        return len(outgoing) // 2

    async def handle_order(self, event: FillsEvent) -> int:
        """Re-mark the products an order changed, at the last price; returns how many
        products got a NavUpdated."""
        current = await asyncio.gather(*(self.store.read(b.product) for b in event.books))
        pending: list[tuple[Marked, int]] = []
        for book, (fields, _) in zip(event.books, current, strict=True):
            last_seq = int(fields.get("seq", "0"))
            last_nav = Decimal(fields.get("nav", str(self.initial_nav)))
            if Decimal(fields.get("units", "0")) != book.units and not (
                await self.store.was_applied(book.product, event.event_id)
            ):
                price = Decimal(fields.get("price", "0"))
                pending.append((mark(book, price, last_nav), last_seq))
        if not pending:
            return 0
        now = time.time_ns()
        messages = [(m, seq, nav_updated(m, event, seq, now)) for m, seq in pending]
        await self.runtime.send_many(
            [
                (t, m.product, message)
                for m, _, message in messages
                for t in (self.updates, self.latest)
            ]
        )
        for marked, seq, _ in messages:
            changes = {self.store.state_key(marked.product): state_fields(marked, event, seq, now)}
            await self.store.apply(marked.product, changes, message_id=event.event_id)
        return len(messages)


def build(settings: NavSettings) -> ConsumerRuntime:
    runtime = ConsumerRuntime(settings)
    service = NavService(runtime, runtime.connect_redis(), AccountingConfig().initial_nav)
    fills = runtime.input(HEDGE_FILLS)

    async def handle(batch: Records) -> None:
        # Market events go in runs (one read and one write per product per run), orders
        # one by one; state is read from Redis per run, so a re-run of the batch after a
        # transient error (handle_batch retries) skips what was applied, by seq or id.
        run: list[FillsEvent] = []
        for message in batch:
            event = await runtime.parse(fills, message, parse_update)
            if event is None:
                continue
            if event.kind != "order":
                run.append(event)
                continue
            await flush(run)
            await service.handle_order(event)
            runtime.processed(fills, event.ts_init_ns or time.time_ns())
        await flush(run)

    async def flush(run: list[FillsEvent]) -> None:
        if run:
            await service.handle_market(run)
            for event in run:
                runtime.processed(fills, event.ts_init_ns or time.time_ns())
            run.clear()

    runtime.on_batch(fills, handle)
    return runtime


def main() -> None:
    build(NavSettings()).run()


if __name__ == "__main__":
    main()
