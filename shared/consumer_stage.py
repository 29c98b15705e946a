"""A stage that reads its inputs with one aiokafka consumer in its own event loop.

For the stages that keep no faust table (hedging, NAV): faust's path from the broker to
an agent costs a stage ~0.2-0.3 ms of CPU per event (a consumer thread, a hop to the main
loop, a race against the flow-control event per message, the conductor, a queue, the
stream iterator), more than the stage's own work. Here `getmany` hands over everything
fetched and the stage's handler takes it as one batch:

    runtime = ConsumerRuntime(settings)
    fills = runtime.input(HEDGE_FILLS)                  # raw bytes + its .dlq twin
    runtime.on_batch(fills, handle)                     # handle(list[ConsumerRecord])
    runtime.run()                                       # logs, /healthz, SIGTERM

The guarantees are the stream runtime's (shared/stream.py): output before state, a seq
or id guard in the state, transient errors re-run the batch, anything else stops the
stage with the batch not committed. Offsets are committed after the batch is handled,
at most every `commit_interval_s` (the seq guard skips what a restart reads again), and
always before a partition is given up: a rebalance waits for the batch in hand
(`_Rebalance`), commits, then lets the partitions go. A batch fetched before a rebalance
keeps only the records of partitions still assigned; a partition that moved is read by
its new owner from the last commit. A handler that leaves a record unapplied for good
(hedging's halted symbol) `hold`s its partition there: the commits stop at that record,
so a restart after the fix reads it again, while the handler goes on with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

import uvloop
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
)
from aiokafka.structs import TopicPartition

from shared.stream import (
    FETCH_MAX_WAIT_MS,
    Input,
    StageRuntime,
    app_id,
    wait_long_when_idle,
)
from shared.transient import is_transient

Records = list[ConsumerRecord]

BatchHandler = Callable[[Records], Awaitable[None]]


class StageFailed(Exception):
    """The stage stopped on an error that retrying cannot fix (see `fail`)."""


@dataclass
class ConsumerRuntime(StageRuntime):
    """See the module doc."""

    commit_interval_s: float = 1.0
    poll_timeout_ms: int = 1000  # getmany's longest wait (a stop cancels it sooner)
    stop_grace_s: float = 5.0  # how long a stop waits for the batch in hand
    consumer: AIOKafkaConsumer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._handlers: dict[str, BatchHandler] = {}  # by namespaced topic
        self._timers: list[tuple[str, float, Callable[[], Awaitable[None]]]] = []
        self._handling = asyncio.Lock()  # held while a batch is handled and committed
        self._pending: dict[TopicPartition, int] = {}  # handled, not yet committed
        self._holds: dict[TopicPartition, int] = {}  # the first offset left unapplied
        self._committed_at = time.monotonic()
        self._stopping = False

    def on_batch(self, inp: Input, handle: BatchHandler) -> None:
        """Hand `inp`'s records to `handle`, in offset order per partition."""
        self._handlers[inp.name] = handle

    def hold(self, record: ConsumerRecord) -> None:
        """`record` is left unapplied until a restart: no commit of its partition passes
        it from now on (the records after it are skipped by their handler, or applied
        and then skipped by the seq guard when read again)."""
        tp = TopicPartition(record.topic, record.partition)
        self._holds[tp] = min(self._holds.get(tp, record.offset), record.offset)

    def every(self, name: str, interval_s: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` every `interval_s` beside the consumer (its errors are its own)."""
        self._timers.append((name, interval_s, job))

    def assignment(self) -> set[TopicPartition]:
        return set(self.consumer.assignment()) if self.consumer is not None else set()

    async def _high_waters(self, partitions: frozenset[TopicPartition]) -> int:
        assert self.consumer is not None  # partitions are assigned to a consumer
        return sum((await self.consumer.end_offsets(list(partitions))).values())

    async def fail(self, exc: BaseException) -> NoReturn:
        self.log.error("stage_failed", error=repr(exc), exc_info=exc)
        raise StageFailed(repr(exc)) from exc

    def run(self) -> None:
        """The service entrypoint: JSON logs, health server, consumer; exits on SIGTERM
        (status 1 when the stage failed). On uvloop: NAV alone at 100 updates/s used
        ~10% less CPU than on asyncio's own loop (2.2-2.4 vs 2.5-2.7 ms an update)."""
        self.enter_service()
        try:
            uvloop.run(self.serve())
        except StageFailed:
            raise SystemExit(1) from None

    async def serve(self) -> None:
        """Consume until SIGTERM/SIGINT, then commit what was handled and leave the group."""
        consumer = self.consumer = self.new_consumer()
        consumer.subscribe(list(self._handlers), listener=_Rebalance(self))
        await self.start_serving()
        timers = [asyncio.create_task(self._every(*timer)) for timer in self._timers]
        try:
            try:
                await start_consumer(consumer)
            except KafkaConnectionError as exc:
                raise SystemExit(
                    f"{self.service}: Kafka at {self.settings.kafka_bootstrap} is not "
                    f"reachable: {exc}"
                ) from exc
            self.log.info("stage_started", inputs=sorted(self._handlers))
            loop_task = asyncio.create_task(self._consume(consumer))
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._stop, loop_task)
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            async with self._handling:
                await self._commit(consumer)
        finally:
            for task in timers:
                task.cancel()
            await consumer.stop()
            await self.stop_serving()
            self.log.info("stage_stopped")

    def new_consumer(self) -> AIOKafkaConsumer:
        """The stage's consumer (its group, manual commits), to start with
        `start_consumer`."""
        return AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            client_id=f"{self.settings.kafka.client_id}-{self.service}",
            group_id=app_id(self.settings),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
            session_timeout_ms=15_000,  # as the faust stages: a killed member is replaced soon
            heartbeat_interval_ms=3_000,
            # Co-partitioned: every input is keyed by symbol with the same partition count,
            # so an instance must hold the same partitions of each (all of a symbol's
            # inputs in one place, topics.py). aiokafka's default, round robin over all
            # the partitions, gave one instance a symbol's targets and another its orders.
            partition_assignment_strategy=(RangePartitionAssignor,),
        )

    def _stop(self, loop_task: asyncio.Task[None]) -> None:
        """Stop after the batch in hand (a wait for input is cut short); a batch still
        retrying after `stop_grace_s` (Redis or the broker gone) is cut short too, as a
        crash would cut it: not committed, so read again on restart."""
        self._stopping = True
        if not self._handling.locked():
            loop_task.cancel()
        else:
            asyncio.get_running_loop().call_later(self.stop_grace_s, loop_task.cancel)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while not self._stopping:
            fetched = await consumer.getmany(timeout_ms=self.poll_timeout_ms)
            if fetched:
                await self._handle(consumer, fetched)
            elif self._pending:
                async with self._handling:
                    await self._commit(consumer)

    async def _handle(
        self, consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, Records]
    ) -> None:
        async with self._handling:
            owned = consumer.assignment()  # a partition that moved is its new owner's
            kept = {tp: records for tp, records in fetched.items() if tp in owned}
            by_topic: dict[str, Records] = {}
            for tp, records in kept.items():
                by_topic.setdefault(tp.topic, []).extend(records)
            for topic, records in by_topic.items():
                await self.handle_batch(self._handlers[topic], records)
            for tp, records in kept.items():
                self._pending[tp] = min(records[-1].offset + 1, self._holds.get(tp, 1 << 63))
            if time.monotonic() - self._committed_at >= self.commit_interval_s:
                await self._commit(consumer)

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        """Commit the handled offsets of the partitions still assigned (lock held)."""
        owned = consumer.assignment()
        offsets = {tp: offset for tp, offset in self._pending.items() if tp in owned}
        self._pending.clear()
        self._committed_at = time.monotonic()
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved meanwhile: their new owner reads from the last commit
            # and the seq guard skips what this instance already applied.
            self.log.warning("commit_skipped", error=repr(exc))
        except KafkaError as exc:
            if not is_transient(exc):
                raise
            self.log.warning("commit_deferred", error=repr(exc))
            self._pending = {**offsets, **self._pending}

    async def _every(
        self, name: str, interval_s: float, job: Callable[[], Awaitable[None]]
    ) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except Exception as exc:  # a periodic check must not stop the stage
                self.log.error("timer_failed", timer=name, error=repr(exc), exc_info=exc)


async def start_consumer(consumer: AIOKafkaConsumer) -> None:
    """Start it; from then on the broker may hold a fetch long only while every assigned
    partition is in it (`wait_long_when_idle`, as the faust stages). With one long wait
    for every fetch, a batch handled for longer than aiokafka's prefetch backoff (0.1 s)
    let a fetch for the other partitions go out while the batch's partition had records
    waiting, and the broker held it: that partition's next records waited up to the
    whole 500 ms behind it. Under load hedging then fell behind (batches grew, so they
    took longer, so the stall came again): p50 0.2-0.9 s at 1,000 ticks/s instead of ~30 ms."""
    await consumer.start()
    wait_long_when_idle(consumer._fetcher)


class _Rebalance(ConsumerRebalanceListener):
    """Give partitions up only after the batch in hand is handled and committed."""

    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        runtime = self.runtime
        async with runtime._handling:
            if runtime.consumer is not None:
                await runtime._commit(runtime.consumer)
            # A hold is this assignment's: back here, the partition is read from what its
            # owners committed meanwhile, and held again at what is left unapplied (kept,
            # it pulled the group's commit back to where this instance had stopped).
            for tp in revoked:
                runtime._holds.pop(tp, None)
        runtime.log.info("partitions_revoked", partitions=sorted(str(tp) for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.runtime.log.info("partitions_assigned", partitions=sorted(str(tp) for tp in assigned))
