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

from smartlev.v1 import nav_pb2

from services.nav.config import NavSettings
from services.nav.marking import (
    FillsEvent,
    Marked,
    Unmarkable,
    as_last_marked,
    marked_update,
    parse_update,
    state_fields,
)
from shared.adapters.redis_wire import RedisWire
from shared.consumer_stage import ConsumerRuntime, Records
from shared.logging import get_logger
from shared.redis_store import ApplyOnceStore
from shared.settings import from_environment
from shared.stream import Outgoing, Record
from shared.topics import HEDGE_FILLS, NAV_LATEST, NAV_UPDATES

log = get_logger("nav")
MARKET_SOURCE = "market"  # ApplyOnceStore source whose "offset" is the market seq


class NavService:
    """The shell: read the books' last marks, call the core, send, then write."""

    def __init__(self, runtime: ConsumerRuntime, redis: RedisWire, initial_nav: Decimal) -> None:
        self.runtime = runtime
        self.store = ApplyOnceStore(redis, namespace=f"{runtime.settings.namespace}nav")
        self.initial_nav = initial_nav
        self.updates = runtime.output(NAV_UPDATES)
        self.latest = runtime.output(NAV_LATEST)
        self.fills = runtime.input(HEDGE_FILLS)

    async def handle_market(self, run: list[tuple[FillsEvent, Record]]) -> None:
        """Apply a run of market events (ticks, funding) at once: one read per product,
        every NavUpdated sent before one write per product with the last seq marked.
        A product's fields merge over the run (a leverage change's `reasons` stay). A
        tick whose books cannot be marked is dead-lettered first, before anything after
        it moves the products' seq past it."""
        products = list(dict.fromkeys(b.product for e, _ in run for b in e.books))
        reads = await asyncio.gather(*(self.store.read(p) for p in products))
        current = {p: fields for p, (fields, _) in zip(products, reads, strict=True)}
        last_seq = {p: int(f.get("seq", "0")) for p, f in current.items()}
        last_nav = {p: Decimal(f.get("nav", str(self.initial_nav))) for p, f in current.items()}
        now = time.time_ns()
        outgoing: list[Outgoing] = []
        writes: dict[str, dict[str, str | int | Decimal]] = {}
        applied: list[FillsEvent] = []
        skipped = 0  # events every product of which had been marked past (redeliveries)
        for event, record in run:
            if event.kind != "tick":
                # funding moves the books; the next tick marks them (one read again after
                # a later tick marked them all is a redelivery)
                if all(event.seq <= last_seq[book.product] for book in event.books):
                    skipped += 1
                else:
                    applied.append(event)
                continue
            assert event.price is not None
            try:
                updates = [  # the books not marked yet (a redelivery's were)
                    marked_update(book, event.price, last_nav[book.product], event, event.seq, now)
                    for book in event.books
                    if event.seq > last_seq[book.product]
                ]
            except Unmarkable as exc:
                await self.runtime.reject(self.fills, record, str(exc))
                continue
            if not updates:
                skipped += 1
                continue
            for marked, message in updates:
                outgoing += [(t, marked.product, message) for t in (self.updates, self.latest)]
                writes.setdefault(marked.product, {}).update(
                    state_fields(marked, event, event.seq, event.ts_init_ns or now)
                )
                last_seq[marked.product], last_nav[marked.product] = event.seq, marked.nav
            applied.append(event)
        if outgoing:
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
        for event in applied:
            self.runtime.processed(self.fills, event.ts_init_ns or now)
        for _ in range(skipped):
            self.runtime.skipped(self.fills)

    async def handle_order(self, event: FillsEvent, record: Record) -> None:
        """Re-mark the products an order changed, at the last price, in the last regime
        and as fresh as that price (an order's update carries none of them; books that
        cannot be marked there dead-letter the order's update, before anything is
        sent). A product with a hedge and no price is not re-marked (the next tick
        marks it); one without is (its NAV does not depend on the price), as old as no
        price: 0, which the gateway holds stale while units are out. The order is
        recorded on every product of its update, re-marked or not: read again after a
        later order moved a product it passed over, it would mark that product back
        with its own, older books."""
        current = await asyncio.gather(*(self.store.read(b.product) for b in event.books))
        applied = await asyncio.gather(
            *(self.store.was_applied(b.product, event.event_id) for b in event.books)
        )
        now = time.time_ns()
        pending: list[tuple[Marked, nav_pb2.NavUpdated, int, FillsEvent, int]] = []
        passed: list[str] = []  # products the order leaves as marked
        try:
            for book, (fields, _), seen in zip(event.books, current, applied, strict=True):
                if seen:
                    continue
                last_seq = int(fields.get("seq", "0"))
                last_nav = Decimal(fields.get("nav", str(self.initial_nav)))
                if Decimal(fields.get("units", "0")) == book.units:
                    passed.append(book.product)
                    continue
                price = Decimal(fields.get("price") or "0")
                if price <= 0 and book.qty != 0:
                    # No tick marked the product yet (or its mark was lost): a hedge
                    # cannot be valued without a price; the next tick marks it.
                    log.warning("remark_without_price", product=book.product)
                    passed.append(book.product)
                    continue
                remark = as_last_marked(event, fields)
                marked, message = marked_update(book, price, last_nav, remark, last_seq, now)
                # as fresh as its price: none yet, or a hash an older build wrote
                # before session 18, whose write time stood in for it
                priced = int(fields.get("written_ns") or 0)
                pending.append((marked, message, last_seq, remark, priced))
        except Unmarkable as exc:
            await self.runtime.reject(self.fills, record, str(exc))
            return
        if pending:
            await self.runtime.send_many(
                [
                    (t, m.product, message)
                    for m, message, *_ in pending
                    for t in (self.updates, self.latest)
                ]
            )
        for marked, _, seq, remark, priced in pending:
            state = state_fields(marked, remark, seq, priced)
            changes = {self.store.state_key(marked.product): state}
            await self.store.apply(marked.product, changes, message_id=event.event_id)
        for product in passed:
            await self.store.apply(product, {}, message_id=event.event_id)
        if pending or passed:
            self.runtime.processed(self.fills, now)
        else:
            self.runtime.skipped(self.fills)  # a redelivery: every product had it


def build(settings: NavSettings) -> ConsumerRuntime:
    runtime = ConsumerRuntime(settings)
    service = NavService(runtime, runtime.connect_redis(), settings.strategy.accounting.initial_nav)

    async def handle(batch: Records) -> None:
        # Market events go in runs (one read and one write per product per run), orders
        # one by one; state is read from Redis per run, so a re-run of the batch after a
        # transient error (handle_batch retries) skips what was applied, by seq or id.
        run: list[tuple[FillsEvent, Record]] = []
        for record in batch:
            event = await runtime.parse(service.fills, record, parse_update)
            if event is None:
                continue
            if event.kind != "order":
                run.append((event, record))
                continue
            if run:
                await service.handle_market(run)
                run = []
            await service.handle_order(event, record)
        if run:
            await service.handle_market(run)

    runtime.on_batch(service.fills, handle)
    return runtime


def main() -> None:
    build(from_environment(NavSettings)).run()


if __name__ == "__main__":
    main()
