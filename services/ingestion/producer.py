"""Ingestion's producer: aiokafka on its own thread, one record batch per burst of events.

Why not kafka-python's `KafkaProducer`, which ingestion used first: its network thread
costs ~0.9 ms of CPU per produce request and its `send` ~25 us a message. Offered 1,000
ticks/s, a replay used 0.26 cores with it and 0.16 with this; at full speed it published
~10,000 messages/s, this ~21,000 (2-vCPU VM).

The ingestor sees the shape it had: `send(topic, key, value)` returns a future that
raises if the broker refused the message, `flush()` waits for everything sent so far,
`close()`. Producing goes through `BatchSender` (the stages' own path) on an idempotent
`acks=all` aiokafka producer.

Batching needs no linger: the first `send` of a burst wakes the I/O thread, which takes
everything pending once it gets to run (the replay's main thread keeps the GIL until it
waits for the next due event), so the ticks a paced replay hands over together share a
request. Order: one burst in flight at a time, and the next one waits (and grows) until
it is acked, so a symbol's events reach their partition in the order sent. Once a burst
fails, every later one fails too, unsent: had one gone out, the topic would hold events
after a hole, and a restart resumes after the topic's last event (the ingestor starts
over with a fresh producer).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop
from aiokafka import AIOKafkaProducer
from google.protobuf.message import Message

from shared.adapters.record_batches import BatchSender, Outbound, idempotent_producer
from shared.codec import encode

T = TypeVar("T")
START_TIMEOUT_S = 30.0
Sent = concurrent.futures.Future[None]


class BurstAfterFailure(Exception):
    """Not sent: an earlier burst failed (sending it would leave a hole behind it)."""

    def __init__(self, first: Exception) -> None:
        super().__init__(f"not sent: an earlier burst failed ({first!r})")
        self.first = first


class BatchProducer:
    def __init__(self, bootstrap: str, client_id: str) -> None:
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"{client_id}-io", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._pending: list[Outbound] = []
        # The newest burst: the pending events' while there are any, else the one last
        # handed to the pump (a done one before the first send).
        self._burst: Sent = concurrent.futures.Future()
        self._burst.set_result(None)
        self._wake = asyncio.Event()
        self._failed: Exception | None = None  # the first burst that failed, for good
        try:
            self._producer = self._run(self._start(bootstrap, client_id), START_TIMEOUT_S)
        except BaseException:
            self._stop_thread(START_TIMEOUT_S)
            raise
        self._sender = BatchSender(self._producer)
        self._pump = asyncio.run_coroutine_threadsafe(self._pumping(), self._loop)

    def _run(self, work: Coroutine[Any, Any, T], timeout: float | None) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result(timeout)

    @staticmethod
    async def _start(bootstrap: str, client_id: str) -> AIOKafkaProducer:
        producer = idempotent_producer(bootstrap, client_id)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()
            raise
        return producer

    def send(self, topic: str, key: str | None, value: Message) -> Sent:
        """Queue one message; the future is done once its burst is acked."""
        record = (topic, None if key is None else key.encode("utf-8"), encode(value))
        with self._lock:
            first = not self._pending
            if first:
                self._burst = concurrent.futures.Future()
            self._pending.append(record)
            burst = self._burst
        if first:
            self._loop.call_soon_threadsafe(self._wake.set)
        return burst

    async def _pumping(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                records, self._pending = self._pending, []
                burst = self._burst
            if not records:
                continue
            if self._failed is not None:
                burst.set_exception(BurstAfterFailure(self._failed))
                continue
            try:
                await self._sender.send_all(records)
            except Exception as exc:  # the ingestor raises it from the burst's future
                self._failed = exc
                burst.set_exception(exc)
            else:
                burst.set_result(None)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything sent so far is acked or refused (bursts go out in
        order, so the newest one is the last to finish)."""
        concurrent.futures.wait([self._burst], timeout)

    def close(self, timeout: float | None = None) -> None:
        try:
            self._pump.cancel()
            self._run(self._producer.stop(), timeout)
        finally:
            self._stop_thread(timeout)

    def _stop_thread(self, timeout: float | None) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self._loop.close()
