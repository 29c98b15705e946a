"""The outbox relay: settled orders -> `orders.events`, at least once, in order.

An order is settled in Redis together with its outbox entry (ledger.py); this task
publishes the entries of each symbol in the order they were settled (acks=all,
idempotent producer) and deletes them only once the broker acked them. A crash between
the ack and the delete publishes them again on the next sweep; hedging applies an
order's `event_id` once, so the books see it once. It sweeps when a settle wakes it and
every `poll_s` anyway (entries left by a crash, by a failed sweep, or by another
gateway instance). Sweeps begin at most every `interval_s` (50 ms): after a quiet spell an
order goes out at once, and under load a sweep carries every order settled since the
last (one Redis read, one produce request, one delete for all of them) instead of one or
two. A sweep takes the oldest `window` entries at a time, publishes and deletes
them, then the next: a backlog a long Kafka outage left is never one Redis reply (and
never one stall of the event loop every order waits behind). Symbols flush on their
own, one flush of a symbol at a time (`run`). A flush that Kafka failed renews the
producer (`renew`): a batch that expired unsent (a partition without a leader past the
request timeout) took sequence numbers the broker never saw, and the idempotent producer
then sent every later batch of that partition past the gap, refused for good
(OutOfOrderSequenceNumber): orders settled and never published, until a restart.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge
from redis.exceptions import RedisError

from services.gateway.ledger import Ledger
from shared.adapters.record_batches import BatchSender
from shared.logging import get_logger

log = get_logger("gateway", "relay")

PUBLISHED = Counter(
    "smartlev_gateway_outbox_published_total", "Order events acked by Kafka.", ["symbol"]
)
PENDING = Gauge(
    "smartlev_gateway_outbox_pending", "Order events settled but not yet acked.", ["symbol"]
)


class OutboxRelay:
    def __init__(
        self,
        ledger: Ledger,
        producer: AIOKafkaProducer,
        topic: str,
        symbols: Iterable[str],
        poll_s: float,
        interval_s: float = 0.0,
        window: int = 1000,
        renew: Callable[[], Awaitable[AIOKafkaProducer]] | None = None,
    ) -> None:
        self.ledger = ledger
        self.sender = BatchSender(producer)
        self.renew = renew  # a started producer in place of a failed one (None: keep it)
        self._renewing = asyncio.Lock()
        self.topic = topic
        self.symbols = tuple(symbols)
        self.poll_s = poll_s
        self.interval_s = interval_s
        self.window = window
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()
        self._flushing: dict[str, asyncio.Task[None]] = {}

    def wake(self, symbol: str) -> None:
        """`symbol` has a new entry: sweep it soon (entries settled meanwhile go with it)."""
        self._dirty.add(symbol)
        self._wake.set()

    async def publish(self, symbol: str) -> list[tuple[str, bytes]]:
        """Send the symbol's oldest pending events (up to `window`) and wait for every
        ack; returns them, (field, event) (not yet deleted: `flush` does both)."""
        entries, pending = await self.ledger.outbox(symbol, self.window)
        PENDING.labels(symbol).set(pending)
        key = symbol.encode()
        await self.sender.send_all((self.topic, key, payload) for _, payload in entries)
        PUBLISHED.labels(symbol).inc(len(entries))
        return entries

    async def flush(self, symbol: str) -> int:
        """Publish and delete the symbol's pending events, a window at a time."""
        total = 0
        while True:
            entries = await self.publish(symbol)
            await self.ledger.acked(symbol, entries)
            total += len(entries)
            if len(entries) < self.window:
                PENDING.labels(symbol).set(0)
                return total

    async def sweep(self, symbols: Iterable[str] | None = None) -> int:
        """Flush `symbols` (None: all of them), each to its end: a failure raises (the
        first) once every other flush is done, none left running behind it."""
        chosen = self.symbols if symbols is None else tuple(symbols)
        counts = await asyncio.gather(*(self.flush(s) for s in chosen), return_exceptions=True)
        for count in counts:
            if isinstance(count, BaseException):
                raise count
        return sum(c for c in counts if isinstance(c, int))

    async def run(self) -> None:
        """Until cancelled: every symbol first (what a previous run left goes out first)
        and again at least every `poll_s`, however often settles wake it (entries a
        failed sweep, a crash or another instance left would otherwise wait for a quiet
        moment); the woken symbols in between, no sooner than `interval_s` after the
        previous sweep began. Each symbol flushes on its own, one flush at a time: one
        whose send hangs (a partition without a leader) holds up no other symbol, and a
        sweep does not start a second flush of it (they published its events twice);
        one woken meanwhile goes again when its flush ends. A failed flush is logged."""
        full_at = -math.inf
        try:
            while True:
                began = time.monotonic()
                full = began - full_at >= self.poll_s
                if full:
                    full_at = began
                dirty, self._dirty = self._dirty, set()
                for symbol in self.symbols if full else dirty:
                    self._start(symbol)
                until_full = self.poll_s - (time.monotonic() - full_at)
                try:
                    await asyncio.wait_for(self._wake.wait(), max(until_full, 0))
                    await asyncio.sleep(max(began + self.interval_s - time.monotonic(), 0))
                except TimeoutError:
                    pass
                self._wake.clear()
        finally:
            flushing = list(self._flushing.values())
            for task in flushing:
                task.cancel()
            await asyncio.gather(*flushing, return_exceptions=True)

    def _start(self, symbol: str) -> None:
        if symbol in self._flushing:
            self._dirty.add(symbol)  # settled after its flush read the outbox: again
        else:
            self._flushing[symbol] = asyncio.create_task(self._flush_logged(symbol))

    async def _flush_logged(self, symbol: str) -> None:
        sender = self.sender
        try:
            await self.flush(symbol)
        except (KafkaError, RedisError, OSError) as exc:
            log.warning("outbox_flush_failed", symbol=symbol, error=f"{type(exc).__name__}: {exc}")
            if isinstance(exc, KafkaError):
                await self._renewed(sender)
        except Exception:  # a bug: logged, and the other symbols still go out
            log.exception("outbox_flush_crashed", symbol=symbol)
        finally:
            del self._flushing[symbol]
            if symbol in self._dirty:
                self._wake.set()

    async def _renewed(self, failed: BatchSender) -> None:
        """Send through a new producer from now on, unless another flush's failure of the
        same one renewed it already; one that cannot start (the broker is down) leaves
        the failed one in place, to be renewed after the next failure."""
        async with self._renewing:
            if self.renew is None or self.sender is not failed:
                return
            try:
                self.sender = BatchSender(await self.renew())
            except (KafkaError, OSError) as exc:
                log.warning("outbox_producer_not_renewed", error=f"{type(exc).__name__}: {exc}")
                return
            log.info("outbox_producer_renewed")
