"""What every stage service shares (`StageRuntime`), and the faust one (`StreamRuntime`).

A stage service (regime, leverage, hedging, NAV; docs/pipeline.md) is a thin shell.
Regime (a faust table) and leverage read through faust:

    runtime = StreamRuntime(settings)                       # settings.service = "regime"
    ticks = runtime.input(MARKET_TICKS)                     # raw bytes + its .dlq twin
    out = runtime.output(MARKET_REGIMES)

    async def handle(batch):                                 # faust events, in order
        for event in batch:
            parsed = await runtime.parse(ticks, event.message, to_core)  # None: DLQ'd
            if parsed is None or not is_new(last_seq, seq):          # bad / redelivery
                continue
            outputs.append((out, symbol, message))
        await runtime.send_many(outputs)                     # broker acked
        ... write state ...                                  # output before state

    @runtime.app.agent(ticks.topic)
    async def regime(stream):
        await runtime.consume(stream, handle)

Hedging and NAV keep no faust table and read with a plain aiokafka consumer
(`shared.consumer_stage.ConsumerRuntime`, same handler shape, records instead of events).

Why raw bytes in: faust throws a value that fails to decode into the agent, which kills
it; reading bytes and decoding here turns bad input into a `DeadLetter` on
`<topic>.dlq` (topic, partition, offset, key, payload, reason, service) and the agent
moves on. The decision itself is pure (`decode_input`, `dead_letter`), so it is unit
tested without a broker.

Batches. Awaiting the broker's ack for every event caps a stage at a few hundred events
a second. `runtime.consume(stream, handle)` hands `handle` the events waiting (up to
`max_batch`; an idle stage handles one event at once, after a few turns of the event
loop to see whether more are on their way, `_more_coming`), and the stage does, per
batch: compute every output in order in memory, `send_many` (produce all, then await
all acks), then write its state once per symbol (last seq + state). Still output before
state: a crash re-runs at most the batch, and the seq guard skips what was already
applied. A batch's events are acked to faust (so their offsets may be committed) only
after `handle` returned; if it raises, the worker stops with the batch unacked, so it
is redelivered instead of being skipped over by the next batch.

Metrics are labelled by service and input topic (un-namespaced name); each `Input` has
its own DLQ.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, Protocol, TypeVar

import faust
import mode
import uvloop
from aiokafka.structs import TopicPartition
from faust import streams as faust_streams
from faust.exceptions import ConsumerNotStarted
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import ChannelT, EventT, StreamT, TopicT
from google.protobuf.message import Message
from mode.services import WaitResults
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from smartlev.v1 import market_pb2

from shared.adapters.record_batches import BatchSender, idempotent_producer
from shared.adapters.redis_wire import RedisWire
from shared.codec import (
    DecodeError,
    decode,
    encode,
    faust_topic,
    funding_from_proto,
    tick_from_proto,
)
from shared.core.config import unknown_symbol_problem
from shared.core.market import (
    MAX_SEQ,
    FundingRate,
    Tick,
    funding_rate_problem,
    market_figure_problem,
    market_price_problem,
    symbol_problem,
)
from shared.eager import Finished, run_until_suspended
from shared.health import HealthRegistry, HealthServer, kafka_check, redis_check, stalled_check
from shared.heap import freeze_heap
from shared.logging import get_logger
from shared.serving import enter
from shared.settings import ServiceSettings
from shared.topics import TopicSpec
from shared.transient import is_transient

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class OfSymbol(Protocol):
    """A validated input: every stage reads symbol-keyed topics (shared/topics.py)."""

    @property
    def symbol(self) -> str: ...


S = TypeVar("S", bound=OfSymbol)
Outgoing = tuple[str, str, Message]  # (topic name, key, value) to produce

MESSAGES = Counter(
    "smartlev_stream_messages_total",
    "Input messages by outcome: processed, skipped (redelivered seq), dead_lettered.",
    ["service", "topic", "outcome"],
)
# Fine between 5 and 100 ms, where a stage's latency under load lives.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05)
LATENCY = Histogram(
    "smartlev_stream_latency_seconds",
    "From the market event's ts_init (ingestion) to this stage's output being acked.",
    ["service"],
    buckets=(*LATENCY_BUCKETS, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
FAUST_DATA = Path(".run") / "faust"  # each faust app's local data, under the cwd
BATCH_EVENTS = Histogram(
    "smartlev_stream_batch_events",
    "Input events per handled batch: a stage's costs are per batch more than per event.",
    ["service"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)


# --------------------------------------------------------------------------- pure parts


def is_new(last_seq: int | None, seq: int) -> bool:
    """Apply an event only if its seq is above the last one applied for its symbol;
    anything at or below is a redelivery whose output already went out."""
    return last_seq is None or seq > last_seq


def decode_input(
    message_type: type[M], payload: bytes | None, convert: Callable[[M], T]
) -> T | str:
    """Decode and validate one input value: the converted value, or the reason (str) it
    must be dead-lettered. `convert` raises ValueError (DecodeError is one) on bad input."""
    try:
        return convert(decode(message_type, payload))
    except DecodeError as exc:
        return exc.reason if exc.expected == message_type.DESCRIPTOR.full_name else str(exc)
    except ValueError as exc:
        return str(exc) or type(exc).__name__


# What a dead letter carries of its input, well inside the broker's 1 MiB per message.
LETTER_PAYLOAD_BYTES = 512 * 1024
LETTER_KEY_BYTES = 1024
LETTER_REASON_CHARS = 2000


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | str | None,
    payload: bytes | None,
    reason: str,
    service: str,
    ts_ns: int,
) -> market_pb2.DeadLetter:
    """The DLQ record of a rejected input; its id names where the input was. A payload
    over LETTER_PAYLOAD_BYTES is cut to it, and the reason says so: an input near the
    broker's message limit made a letter over it, the broker refused the letter, and the
    stage died on that input at every restart. The whole input stays where the id says."""
    raw_key = key.encode("utf-8") if isinstance(key, str) else key or b""
    payload, reason = payload or b"", reason[:LETTER_REASON_CHARS]
    if len(payload) > LETTER_PAYLOAD_BYTES:
        reason += f" (payload cut to its first {LETTER_PAYLOAD_BYTES:,} of {len(payload):,} bytes)"
        payload = payload[:LETTER_PAYLOAD_BYTES]
    return market_pb2.DeadLetter(
        event_id=f"{topic}/{partition}/{offset}",
        topic=topic,
        partition=partition,
        offset=offset,
        key=raw_key[:LETTER_KEY_BYTES],
        payload=payload,
        reason=reason,
        ts_ns=ts_ns,
        service=service,
    )


class MarketInput(NamedTuple):
    """A validated market event: the wire message (forwarded unchanged) and its core value."""

    message: market_pb2.MarketEvent
    symbol: str
    seq: int
    ts_init_ns: int
    value: Tick | FundingRate


def parse_market(
    message: market_pb2.MarketEvent, instruments: Collection[str] | None = None
) -> MarketInput:
    """Validate a MarketEvent every stage can act on (ingestion's own rules, again for
    any other producer); ValueError says why not. `instruments`: the symbols the stage
    trades; another one is refused where it enters, not carried as state (a table row,
    a Redis hash, a rebalance) to hedging's refusal."""
    figures: dict[str, Decimal | None]
    if message.HasField("tick"):
        wire: market_pb2.Tick | market_pb2.FundingRateObserved = message.tick
        tick = tick_from_proto(message.tick)
        if tick.price <= 0:
            raise ValueError(f"price must be positive, got {tick.price}")
        if tick.mark_price is not None and tick.mark_price <= 0:
            raise ValueError(f"mark_price must be positive, got {tick.mark_price}")
        value: Tick | FundingRate = tick
        figures = {"price": tick.price, "mark_price": tick.mark_price}
    elif message.HasField("funding"):
        wire = message.funding
        value = funding_from_proto(message.funding)
        beyond = funding_rate_problem(value.rate)
        if beyond is not None:
            raise ValueError(beyond)
        figures = {"rate": value.rate}
    else:
        raise ValueError("no event set in MarketEvent")
    prices = message.HasField("tick")
    for name, figure in figures.items():
        if figure is None:
            continue
        problem = market_figure_problem(figure, name) or (
            market_price_problem(figure, name) if prices else None
        )
        if problem is not None:
            raise ValueError(problem)
    bad_symbol = symbol_problem(wire.symbol)
    if bad_symbol is not None:
        raise ValueError(bad_symbol)
    if instruments is not None and (unknown := unknown_symbol_problem(wire.symbol, instruments)):
        raise ValueError(unknown)
    if not 0 < wire.seq <= MAX_SEQ:
        raise ValueError(f"seq must be in [1, 2^53), got {wire.seq}")
    if wire.ts_event_ns <= 0:  # regime opened a bar in 1970 with it
        raise ValueError(f"ts_event_ns must be > 0, got {wire.ts_event_ns}")
    return MarketInput(message, wire.symbol, wire.seq, wire.ts_init_ns, value)


class OffsetGaps:
    """Per partition, the offset the stage must handle next. A later one means faust
    dropped fetched events on the way: after a rebalance, faust seeks to the committed
    offset while its fetch loop is still handing over records fetched before (moving
    its read offset past the seek), then clears the agent queues when flow resumes, and
    drops the re-read records as below its read offset. The stage then seeks back to
    the first one missing and drops what arrives before it (see `batches`).
    In a new assignment the first offset due is the partition's committed one (where
    faust seeked it), not whatever arrives first: events a rebalance took out of a
    gathering batch (`_Consumer.stop_flow`) may be exactly the ones faust then drops.
    Input topics are written without transactions, so their offsets have no holes."""

    def __init__(self, committed: Callable[[Any], int | None] = lambda tp: None) -> None:
        self.committed = committed  # a partition's committed offset, if known
        self.generation: int | None = None
        self.next: dict[Any, int] = {}

    def check(self, generation: int, tp: Any, offset: int) -> int | None:
        """None: handle the event; else drop it and seek `tp` to the offset returned."""
        if generation != self.generation:  # new assignment: start where faust seeked
            self.generation, self.next = generation, {}
        want = self.next[tp] if tp in self.next else self.committed(tp)
        if want is not None and offset > want:
            return want
        self.next[tp] = max(want or 0, offset + 1)
        return None


@contextmanager
def acting_on(event: EventT) -> Iterator[None]:
    """Make `event` faust's current event for the block. A table write goes to the
    changelog partition of the current event, which in a batch is the batch's last
    event, maybe of another partition: write each key while acting on its own event.
    (faust has no public setter; this is the context variable its streams set.)"""
    token = faust_streams._current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        faust_streams._current_event.reset(token)


# --------------------------------------------------------------------------- the app


def app_id(settings: ServiceSettings) -> str:
    """`<namespace>smartlev-<service>`: also the consumer group and table topics' prefix."""
    return f"{settings.namespace}smartlev-{settings.service}"


FETCH_MAX_WAIT_MS = 10  # while some partition's records wait to be consumed
IDLE_FETCH_MAX_WAIT_MS = 500  # while every partition is in the fetch


class _FetchWaitThread(aiokafka_driver.AIOKafkaConsumerThread):
    """faust 0.15.3 hard-codes the consumer's `fetch_max_wait_ms=1500`. aiokafka keeps
    one fetch in flight per broker and leaves partitions with records still buffered
    out of it, so while a stage works through a batch, the next fetch asks only for
    its idle partitions and the broker holds it the full wait: the busy partition then
    waits up to 1.5 s for its next records (measured: ~1.5 s per stage under load).
    A short wait bounds that stall. But an idle stage then fetches a hundred times a
    second (measured: regime and leverage idle cost the broker 17% of a core and
    themselves 11%), so the wait is short only while it is needed (`wait_long_when_idle`)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read when its fetcher starts
        return consumer

    async def on_start(self) -> None:
        await super().on_start()
        assert self._consumer is not None  # on_start made it
        tables: Any = self.consumer.app.tables  # faust's TableManager (its type hides recovery)
        wait_long_when_idle(self._consumer._fetcher, faust_reads(tables))


def faust_reads(tables: Any) -> Callable[[Any], bool]:
    """Whether a faust app reads a partition's records now: it reads its tables'
    changelogs only while it recovers them. The rest of the time their partitions stay
    assigned, and what was fetched of them (the app's own writes) stays buffered; were
    they counted, the wait would stay short for good (regime, idle after it had written
    its table: ~95 fetches a second instead of ~2)."""

    def read(tp: Any) -> bool:
        return tp.topic not in tables.changelog_topics or bool(tables.recovery.in_recovery)

    return read


def wait_long_when_idle(fetcher: Any, read: Callable[[Any], bool] = lambda tp: True) -> None:
    """Let the broker hold a fetch IDLE_FETCH_MAX_WAIT_MS when it asks for every
    partition the app reads (`read(tp)`; none has records waiting, none is paused):
    then only new records can end the wait, and they end it at once. Otherwise a
    partition left out of the fetch may become fetchable meanwhile, and the wait stays
    short (the fetcher is an aiokafka consumer's, started with FETCH_MAX_WAIT_MS; both
    stage runtimes)."""
    plan = fetcher._get_actions_per_node

    def actions_per_node(assignment: Any) -> tuple[Any, ...]:
        requests, *rest = plan(assignment)
        if requests and not _any_left_out(fetcher, assignment, read):
            for _node, request in requests:
                request._max_wait_ms = IDLE_FETCH_MAX_WAIT_MS
        return (requests, *rest)

    fetcher._get_actions_per_node = actions_per_node


def _any_left_out(fetcher: Any, assignment: Any, read: Callable[[Any], bool]) -> bool:
    """Some partition the app reads has fetched records not taken yet, or is paused."""
    buffered = fetcher._records
    return any(
        (tp in buffered or assignment.state_value(tp).paused) for tp in assignment.tps if read(tp)
    )


class _Gathering:
    """Events `batches` took for its next batch and has not handed out yet."""

    __slots__ = ("__weakref__", "events")

    def __init__(self) -> None:
        self.events: list[EventT] = []


_GATHERING: weakref.WeakSet[_Gathering] = weakref.WeakSet()


def _commit_would_skip(acked: Sequence[int], committed: int | None, gaps: Any) -> bool:
    """True when the acked offsets of a partition start above its committed offset (the
    next one to read) and faust knows of no gap to bridge it: committing them would skip
    the offsets between, never handled. faust 0.15.3's `_new_offset` refuses only when
    they start two or more above it: an event faust dropped in a rebalance would be
    committed over if its successor were acked first, and lost if the partition then
    moved. `batches` never acks past a gap (OffsetGaps); this is the net under it."""
    return bool(acked) and committed is not None and not gaps and min(acked) > committed


class _Consumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return _FetchWaitThread(self, loop=self.loop, beacon=self.beacon)

    def _new_offset(self, tp: Any) -> int | None:
        if _commit_would_skip(self._acked[tp], self._committed_offset[tp], self._gap[tp]):
            return None
        new: int | None = super()._new_offset(tp)
        return new

    async def wait_first(self, *coros: Any, timeout: Any = None) -> WaitResults:
        """faust's fetch loop hands over every message as `wait_first(deliver(message),
        suspend_flow.wait())`: four tasks, a wait and three cancellations per message,
        and a turn of the event loop each, though a delivery almost never suspends
        (room in the agent's queue, flow running). Run the first coroutine eagerly
        (shared/eager.py) and race the rest of it as before only if it suspends: a
        delivery blocked on a full queue still loses to a rebalance's flow suspension.
        While the flow is suspended, or the consumer stops, faust's own path is taken."""
        first, *others = coros or (None,)
        if (
            timeout is not None
            or not asyncio.iscoroutine(first)
            or self.suspend_flow.is_set()
            or self.should_stop
            or self._crashed.is_set()
        ):
            return await super().wait_first(*coros, timeout=timeout)
        try:
            started = run_until_suspended(first)
        except BaseException:
            _close(others)
            raise
        if isinstance(started, Finished):
            _close(others)
            return WaitResults([first], [started.value], False)
        return await super().wait_first(started, *others)

    def stop_flow(self) -> None:
        """A rebalance (or shutdown) stops the flow, clears the agents' queues and then
        waits for every event taken off them to be acked. A batch still gathering
        (taken, waiting for the next event that the cleared queue no longer holds) is
        never handled, so it would never be acked: the rebalance hung until SIGKILL
        (seen under load: "wait_empty: Waiting for tasks ..."). Drop it instead, as
        faust drops what it clears from the queues: off the unacked set (faust's stream
        iterator still holds the last event, so it would not be garbage-collected out of
        that weak set), never acked, so read again from the committed offset."""
        super().stop_flow()
        for gathering in list(_GATHERING):
            for event in gathering.events:
                self._unacked_messages.discard(event.message)
            gathering.events.clear()


def _close(awaitables: Sequence[Any]) -> None:
    """Close coroutines that will not be awaited (no "never awaited" warning)."""
    for awaitable in awaitables:
        if asyncio.iscoroutine(awaitable):
            awaitable.close()


class _Transport(aiokafka_driver.Transport):
    Consumer = _Consumer


class _App(faust.App):
    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def build_app(settings: ServiceSettings, **overrides: Any) -> faust.App:
    """A faust App for a stage: in-memory tables restored from their Kafka changelog,
    no faust web server (shared/health serves /healthz and /metrics), acks=all.

    faust's producer carries only table changelogs (a stage's outputs go through its
    own `BatchSender`), off the events' path: it lingers 5 ms, so a batch's table rows
    go out as one request (regime at 1,000 ticks/s: ~30 produce requests a second
    instead of ~90, of ~470 the broker served in all). The consumer's fetch wait is
    FETCH_MAX_WAIT_MS instead of faust's fixed 1.5 s, longer while idle
    (_FetchWaitThread).
    `stream_wait_empty` stays on: a rebalance waits for the batch being handled.

    A member that died (kill -9) holds its partitions until its session times out; 15 s
    instead of faust's 60 s lets a restarted instance take over that much sooner."""
    datadir = FAUST_DATA / f"{app_id(settings)}-data"  # not litter in the cwd
    datadir.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {
        "broker": settings.kafka.faust_broker,
        "store": "memory://",
        "datadir": str(datadir),
        "web_enabled": False,
        "autodiscover": False,
        "topic_replication_factor": settings.kafka.replication,
        "topic_allow_declare": True,  # faust creates its own changelog topics
        "topic_disable_leader": True,  # no `__assignor-__leader` topic: no leader timers
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "producer_linger": 0.005,
        "broker_client_id": f"{settings.kafka.client_id}-{settings.service}",
        # No standby copies of tables: an instance promoted from standby to active in
        # faust 0.15.3 seeks its changelog to -1 while its consumer already stands at
        # the end, and waits forever for records (seen when the active one was killed;
        # tests/integration/test_two_instances.py). A new active replays the changelog.
        "table_standby_replicas": 0,
        "broker_session_timeout": 15.0,
        "broker_heartbeat_interval": 3.0,
        # An input topic missing from the metadata the group's first assignment used (one
        # created a moment before the stage started: seen once in CI) is left out of it
        # ("Ignoring missing topic") until a metadata refresh finds it and the group
        # rebalances: within 10 s, not aiokafka's 5 minutes.
        "consumer_metadata_max_age_ms": 10_000,
    }
    options.update(overrides)
    return _App(app_id(settings), **options)


class Record(Protocol):
    """What a stage reads of an input message: faust's `Message` (`event.message`) and
    aiokafka's `ConsumerRecord` both have it."""

    topic: str
    partition: int
    offset: int
    key: Any
    value: Any


def record_key(record: Record) -> str:
    """The message key as text (keys are symbols/products, UTF-8); bytes that are not
    UTF-8 shown escaped (such a key is no symbol: its record is dead-lettered)."""
    key = record.key
    return key.decode("utf-8", "backslashreplace") if isinstance(key, bytes) else str(key or "")


@dataclass(frozen=True, slots=True)
class Input:
    """A raw-bytes input topic (namespaced) with its dead-letter twin."""

    spec: TopicSpec  # the registry entry (un-namespaced: metric label)
    name: str  # the namespaced topic
    dlq: str  # the namespaced `.dlq` twin (DeadLetter values)


@dataclass(frozen=True, slots=True)
class FaustInput(Input):
    """An input a faust agent reads: values arrive as bytes."""

    topic: TopicT


# The positions (topic, partition, offset) a batch being handled has dead-lettered, so a
# re-run after a transient error does not send them again (`StageRuntime.handle_batch`).
_LETTERED: ContextVar[set[tuple[str, int, int]] | None] = ContextVar("lettered", default=None)
# How many outcomes (processed, skipped, dead-lettered) the batch's current run reached,
# and the most any of its runs reached: a re-run after a transient error counts only past
# that, so each event is counted once, by the first run that reaches it (`handle_batch`).
_REACHED: ContextVar[list[int] | None] = ContextVar("reached", default=None)


@dataclass
class StageRuntime:
    """What every stage runtime shares, however it reads its input (see the module doc):
    outputs through its own idempotent producer, dead letters, metrics, health, the
    transient-retry rule, and the health/metrics server's start and stop."""

    settings: ServiceSettings
    stale_after_s: float = 900.0  # /healthz fails when no input was handled for this long
    retry_backoff_s: float = 0.2  # first pause before a batch is re-run after a blip
    # shared/heap.py; the entrypoints (`run`) set it, not stages built inside a test run
    freeze_heap_at_first_batch: bool = False
    last_progress: float | None = field(init=False, default=None)
    redis: Any = field(init=False, default=None)  # set by services that use Redis

    def __post_init__(self) -> None:
        self.log = get_logger(self.settings.service, "stream")
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._producer_lock = asyncio.Lock()
        self._batches: BatchSender | None = None  # its producer starts on the first send
        self._server: HealthServer | None = None
        self._assigned = AssignedPartitions(self)
        # Labelled children looked up once: `labels()` per event cost ~2.5 us of ~130.
        self._latency = LATENCY.labels(self.service)
        self._batch_events = BATCH_EVENTS.labels(self.service)
        self._counts: dict[tuple[str, str], Any] = {}
        self._in_hand: dict[object, float] = {}  # batches being handled: since when

    @property
    def service(self) -> str:
        return self.settings.service

    def spec(self, spec: TopicSpec) -> TopicSpec:
        return spec.in_namespace(self.settings.namespace)

    def input(self, spec: TopicSpec) -> Input:
        if spec.key != "symbol":  # `parse` checks a record's key against its symbol
            raise ValueError(f"{spec.name} is keyed by {spec.key}: stages read symbol keys")
        named = self.spec(spec)
        return Input(spec=spec, name=named.name, dlq=named.dlq().name)

    def output(self, spec: TopicSpec) -> str:
        """The namespaced name of an output topic (for `send_many`)."""
        return self.spec(spec).name

    def assignment(self) -> set[TopicPartition]:
        """The input partitions this instance consumes right now."""
        raise NotImplementedError

    def connect_redis(self, **redis_py: Any) -> RedisWire:
        """The stage's Redis: `self.redis` (redis-py: /healthz and the slow paths) and the
        multiplexed connection its state steps go over (~15 us of CPU a command instead
        of ~120 us); both closed when the stage stops."""
        self.redis = Redis.from_url(self.settings.redis_url, **redis_py)
        wire = RedisWire.from_url(self.settings.redis_url)
        self.on_stop(self.redis.aclose)
        self.on_stop(wire.aclose)
        return wire

    async def parse(self, inp: Input, record: Record, convert: Callable[[Any], S]) -> S | None:
        """Decode + validate the record's value as `inp.spec.value_type`, converted by
        `convert`; on failure dead-letter it and return None. So is a record keyed by
        another symbol than its own: it sits in that symbol's partition, out of its own
        symbol's order, possibly on another instance than the rest of its symbol."""
        result = decode_input(inp.spec.value_type, record.value, convert)
        if not isinstance(result, str) and (key := record_key(record)) != result.symbol:
            result = f"record key {key!r} is not its symbol {result.symbol!r}"
        if isinstance(result, str):
            await self.reject(inp, record, result)
            return None
        return result

    async def reject(self, inp: Input, record: Record, reason: str) -> None:
        """Send the record to the input's DLQ with `reason` (waits for the ack). Also for
        input that decodes but the stage's state refuses (e.g. a tick back in time).
        Once per batch however often a transient error re-runs it (`handle_batch`). It is
        the event's outcome, as processed and skipped are (`_new_outcome`): a re-run that
        skips the event (its seq passed meanwhile) does not count it again."""
        self._new_outcome()
        where = (record.topic, record.partition, record.offset)
        lettered = _LETTERED.get()
        if lettered is not None and where in lettered:
            return
        letter = dead_letter(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            payload=record.value,
            reason=reason,
            service=self.service,
            ts_ns=time.time_ns(),
        )
        # the letter's Kafka key counts against the broker's limit too: cut like its field
        await self.send(inp.dlq, record_key(record)[:LETTER_KEY_BYTES], letter)
        if lettered is not None:
            lettered.add(where)
        self._count(inp, "dead_lettered").inc()
        self.last_progress = time.monotonic()
        self.log.warning(
            "dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=letter.reason,
        )

    async def send(self, topic: str, key: str, value: Message) -> None:
        """Produce and wait for the broker's ack (acks=all): output before state."""
        await self.send_many([(topic, key, value)])

    async def send_many(self, messages: Sequence[Outgoing]) -> None:
        """Produce every message in order, then wait for all the acks together: one
        round trip for a whole batch. Order per partition is kept (record_batches.py).

        Not through faust's `Topic.send`: its per-message path cost ~1 ms a message in
        these services (measured: 7,680 NavUpdateds queued in 5.9 s); nor aiokafka's
        `send` per message (~13 us each, a quarter of NAV's CPU at full speed)."""
        sender = await self._sender()
        await sender.send_all(
            (topic, key.encode(), encode(value)) for topic, key, value in messages
        )

    async def _sender(self) -> BatchSender:
        async with self._producer_lock:
            if self._batches is None:
                producer = idempotent_producer(
                    self.settings.kafka_bootstrap,
                    f"{self.settings.kafka.client_id}-{self.service}-out",
                )
                await producer.start()
                self._batches = BatchSender(producer)
        return self._batches

    async def handle_batch(
        self, handle: Callable[[list[T]], Awaitable[None]], batch: list[T]
    ) -> None:
        """`handle(batch)` until it goes through: a transient error (broker, Redis,
        network) re-runs the whole batch after a pause, exactly as a redelivery would
        (same outputs again, seq-guarded state); any other error stops the stage with
        the batch unacknowledged (`fail`), so it is redelivered on restart, never
        skipped. So `handle` must take its state from the store, not from what a failed
        run left in memory. Its dead letters go out once, in the first run that reaches
        them (each run refuses the same records)."""
        pause = self.retry_backoff_s
        if self.freeze_heap_at_first_batch:  # up and reading: its heap is built
            self.freeze_heap_at_first_batch = False
            self.log.info("heap_frozen", objects=freeze_heap())
        self._batch_events.observe(len(batch))
        lettered = _LETTERED.set(set())  # this task's batch's: see `reject`
        reached = [0, 0]
        counting = _REACHED.set(reached)  # see `_new_outcome`
        token = object()
        self._in_hand[token] = time.monotonic()  # the health check's (`stalled_check`)
        try:
            while True:
                reached[0] = 0
                try:
                    await handle(batch)
                    return
                except Exception as exc:
                    if not is_transient(exc):
                        await self.fail(exc)
                    self.log.warning("batch_retry", events=len(batch), error=repr(exc))
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 5.0)
        finally:
            del self._in_hand[token]
            _LETTERED.reset(lettered)
            _REACHED.reset(counting)

    async def fail(self, exc: BaseException) -> None:
        """Stop the stage without acknowledging the input in hand; never returns (the
        stage must not go on to later events on top of state that was not written)."""
        raise NotImplementedError

    async def _input_mark(self) -> tuple[object, int]:
        """The assigned partitions, and a number that grows with new input to them: their
        high-water marks summed (`stalled_check`)."""
        assigned = frozenset(self.assignment())
        return assigned, (await self._high_waters(assigned) if assigned else 0)

    async def _high_waters(self, partitions: frozenset[TopicPartition]) -> int:
        """The partitions' high-water marks, summed."""
        raise NotImplementedError

    def processed(self, inp: Input, ts_init_ns: int) -> None:
        self.last_progress = time.monotonic()
        if self._new_outcome():
            self._count(inp, "processed").inc()
            self._latency.observe(max(time.time_ns() - ts_init_ns, 0) / 1e9)

    def skipped(self, inp: Input) -> None:
        self.last_progress = time.monotonic()
        if self._new_outcome():
            self._count(inp, "skipped").inc()

    @staticmethod
    def _new_outcome() -> bool:
        """Whether the batch's run is the first to reach its next outcome (processed,
        skipped, dead-lettered; `_REACHED`): each event's counted once, by the first."""
        reached = _REACHED.get()
        if reached is None:  # outside a batch: always
            return True
        reached[0] += 1
        if reached[0] <= reached[1]:
            return False
        reached[1] = reached[0]
        return True

    def _count(self, inp: Input, outcome: str) -> Any:
        child = self._counts.get((inp.spec.name, outcome))
        if child is None:
            child = self._counts[inp.spec.name, outcome] = MESSAGES.labels(
                self.service, inp.spec.name, outcome
            )
        return child

    def enter_service(self) -> None:
        """What a service entrypoint (`run`) does first: JSON logs, and the heap frozen
        at the first batch."""
        enter(self.service, self.settings)
        self.freeze_heap_at_first_batch = True

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Close a client (e.g. Redis) when the stage stops."""
        self._on_stop.append(callback)

    def health(self) -> HealthRegistry:
        registry = HealthRegistry()
        registry.register("kafka", kafka_check(self.settings.kafka_bootstrap))
        if self.redis is not None:
            registry.register("redis", redis_check(self.redis))
        registry.register(
            "consumer",
            stalled_check(
                lambda: self.last_progress,
                self._input_mark,
                self.stale_after_s,
                lambda: min(self._in_hand.values(), default=None),
            ),
        )
        return registry

    async def start_serving(self) -> None:
        """/healthz and /metrics up (if a port is set); idle since start counts as fresh:
        a quiet market is not a stuck consumer."""
        self.last_progress = time.monotonic()
        REGISTRY.register(self._assigned)
        if self.settings.metrics_port:
            self._server = HealthServer(
                self.health(),
                port=self.settings.metrics_port,
                host=self.settings.metrics_host,
                service=self.service,
            )
            await self._server.start()

    async def stop_serving(self) -> None:
        """The health server down, then every client closed, the producer last."""
        REGISTRY.unregister(self._assigned)
        if self._server is not None:
            await self._server.stop()
        for callback in self._on_stop:
            await callback()
        if self._batches is not None:
            await self._batches.producer.stop()


@dataclass
class StreamRuntime(StageRuntime):
    """A stage whose agents read through faust (regime: its table; leverage)."""

    # Events handled together at most (one round of acks and state writes per batch).
    max_batch: int = 256
    # Pause before seeking back over a gap: faust's fetch loop moves its read offset
    # after handing an event over, and would drop the re-read events if that came last.
    gap_settle_s: float = 0.05
    recovery_stall_s: float = 45.0  # table recovery without progress: exit (RecoveryWatch)
    tail_gap_s: float = 5.0  # a position past the events handed over this long: seek back
    gather_turns: int = 4  # see `_more_coming`
    app: faust.App = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.app = build_app(self.settings)
        self._gaps: dict[tuple[str, ...], OffsetGaps] = {}  # by input topics, newest `batches`
        self._batch_in_hand = False  # a batch handed out by `batches` is being handled

    def input(self, spec: TopicSpec) -> FaustInput:
        plain = super().input(spec)
        topic = faust_topic(self.app, self.spec(spec), decode_values=False)
        return FaustInput(spec=spec, name=plain.name, dlq=plain.dlq, topic=topic)

    def assignment(self) -> set[TopicPartition]:
        try:
            return set(self.app.consumer.assignment())
        except ConsumerNotStarted:
            return set()

    async def batches(
        self, stream: StreamT[Any], max_batch: int | None = None
    ) -> AsyncIterator[list[EventT]]:
        """The stream's events in batches of what is already buffered (1..max_batch);
        a batch is acked to faust when the next one is asked for, never if the
        consumer of the batch raised; events gathered but not handed out yet are dropped
        when the flow stops (`_Consumer.stop_flow`). Prefer `consume`, which also stops
        on failure."""
        limit = max_batch or self.max_batch
        stream.enable_acks = False  # acked below, once the batch is handled
        channel = stream.channel
        if not isinstance(channel, ChannelT):
            raise TypeError("batches() reads a topic's stream")
        waiting = channel.queue
        gathering = _Gathering()  # the consumer drops it when the flow stops
        _GATHERING.add(gathering)
        batch = gathering.events
        gaps = OffsetGaps(self._committed)
        self._gaps[tuple(getattr(channel, "topics", ()))] = gaps  # a restarted agent's replaces
        async for event in stream.events():
            message = event.message
            resume_at = gaps.check(self.app.consumer_generation_id, message.tp, message.offset)
            if resume_at is not None:  # faust dropped fetched events: read them again
                # It comes again after the seek. Not acked: faust would count it handled
                # and, once the re-read event before it is, commit past both (lost on a
                # crash). Off the unacked set, as `stop_flow` drops a gathering batch.
                self._drop(message)
                if waiting.empty():  # let faust's fetch loop hand over what it has
                    await asyncio.sleep(self.gap_settle_s)
                if waiting.empty():  # else seek once the last of them is dropped
                    self.log.warning(
                        "offset_gap",
                        partition=message.tp.partition,
                        offset=message.offset,
                        resume_at=resume_at,
                    )
                    await self.app.consumer.seek(message.tp, resume_at)
                continue
            batch.append(event)
            del event, message  # only the gathering batch holds it: stop_flow may drop it
            if len(batch) < limit and await self._more_coming(waiting):
                continue
            if not batch:  # dropped by stop_flow while waiting for more
                continue
            handed, batch[:] = list(batch), []
            self._batch_in_hand = True
            try:
                yield handed
            finally:
                self._batch_in_hand = False
            for done in handed:
                await stream.ack(done)

    async def tail_gaps(self) -> dict[Any, tuple[int, int]]:
        """Input partitions whose consumer position stands past the offset `batches`
        expects next, as (position, expected), while no batch is in hand and the flow
        runs (see TailGapWatch). Expected: the next offset after the events handed over
        in this generation, else the committed one (where faust sought the partition)."""
        consumer: Any = self.app.consumer
        tables: Any = self.app.tables  # faust's TableManager (its type hides recovery)
        if self._batch_in_hand or not consumer.flow_active or tables.recovery.in_recovery:
            return {}
        generation = self.app.consumer_generation_id
        expected_next = {
            tp: offset
            for gaps in self._gaps.values()
            if gaps.generation == generation
            for tp, offset in gaps.next.items()
        }
        reads = faust_reads(tables)  # outside recovery: the input topics, no changelog
        behind: dict[Any, tuple[int, int]] = {}
        for tp in self.assignment():
            if not reads(tp):
                continue
            expected = expected_next.get(tp, self._committed(tp))
            position = await consumer.position(tp)
            if expected is not None and position is not None and position > expected:
                behind[tp] = (position, expected)
        return behind

    def _drop(self, message: Any) -> None:
        """Forget an event without acking it (a rebalance waits for unacked ones)."""
        consumer: Any = self.app.consumer
        consumer._unacked_messages.discard(message)

    def _committed(self, tp: Any) -> int | None:
        """The partition's committed offset as faust knows it (its seek after a
        rebalance sets it; faust has no public accessor)."""
        consumer: Any = self.app.consumer
        offset = consumer._committed_offset.get(tp)
        return offset if isinstance(offset, int) else None

    async def _more_coming(self, waiting: Any) -> bool:
        """True when the next event is already in the queue, or arrives within a few
        turns of the event loop: faust's fetch loop hands a fetched chunk over up to 100
        events a turn (`_Consumer.wait_first`), but one a turn where a delivery had to
        wait, and looking only at the queue then closed batches of ~7 events under full
        load (each with its own round of acks and state writes)."""
        for _ in range(self.gather_turns):
            if not waiting.empty():
                return True
            await asyncio.sleep(0)
        return not waiting.empty()

    async def consume(
        self,
        stream: StreamT[Any],
        handle: Callable[[list[EventT]], Awaitable[None]],
        max_batch: int | None = None,
    ) -> None:
        """The agent body of a batching stage: `handle` each batch (`handle_batch`)."""
        async for batch in self.batches(stream, max_batch):
            await self.handle_batch(handle, batch)

    async def _input_mark(self) -> tuple[object, int]:
        """As every runtime's, the input taken anew when a recovery begins or ends: the
        changelogs count only during one, and a baseline with them would hide the input
        that came after it."""
        assigned, mark = await super()._input_mark()
        tables: Any = self.app.tables  # faust's TableManager (its type hides recovery)
        return (assigned, bool(tables.recovery.in_recovery)), mark

    async def _high_waters(self, partitions: frozenset[TopicPartition]) -> int:
        """Of the partitions the app reads now: its tables' changelogs stay assigned, and
        its own writes to them (after an event was handled) are not input waiting."""
        reads = faust_reads(self.app.tables)
        read = [tp for tp in partitions if reads(tp)]
        return sum((await self.app.consumer.highwaters(*read)).values()) if read else 0

    async def fail(self, exc: BaseException) -> None:
        self.log.error("stage_failed", error=repr(exc), exc_info=exc)
        await self.app.crash(exc)
        await asyncio.Event().wait()

    def worker(self, **kwargs: Any) -> faust.Worker:
        """The faust worker running the app plus /healthz + /metrics (if a port is set)."""
        kwargs.setdefault("loglevel", self.settings.log_level)
        return faust.Worker(
            self.app,
            _Sidecar(self),
            quiet=True,
            override_logging=False,
            redirect_stdouts=False,
            **kwargs,
        )

    def run(self) -> None:
        """The service entrypoint: JSON logs, health server, worker; exits on SIGTERM.
        On uvloop, faust's consumer thread too (regime + leverage paced at 1,000 ticks/s:
        tick -> target p50 60-62 -> 37-46 ms, bench_stages, alternating runs)."""
        self.enter_service()
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        self.worker().execute_from_commandline()


RECOVERY_STALLED_EXIT = 70  # the exit code of a worker whose table recovery hung


class RecoveryWatch:
    """faust 0.15.3 can hang in table recovery after a takeover: the instance left waits
    forever for changelog records that never come ("No event received for active tp ...
    since recovery start"; docs/reliability.md, problem 5). A fresh start recovers, so a
    recovery without progress for `stall_s` makes the worker exit for its supervisor to
    restart it (docker-compose restarts; tests restart it themselves)."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.since: float | None = None
        self.offsets: dict[Any, int] = {}

    def stalled(self, in_recovery: bool, offsets: dict[Any, int], now: float) -> bool:
        """True once recovery has been in progress with unchanged offsets for stall_s."""
        if not in_recovery:
            self.since = None
            return False
        if self.since is None or offsets != self.offsets:
            self.since, self.offsets = now, dict(offsets)
            return False
        return now - self.since >= self.stall_s


class TailGapWatch:
    """faust 0.15.3's fetch loop drops the rest of a fetched chunk when the group's
    generation changes while it hands the chunk over (`Consumer.getmany`), though the
    consumer's position already stands past it. `batches` seeks back over such a gap
    once a later event arrives (OffsetGaps); at the end of a partition none arrives,
    and the stage waited forever for events it was never handed (docs/reliability.md,
    problem 12). A partition whose position stays past the offset the stage expects
    next, unchanged for `settle_s` with no batch in hand, is due a seek back to it."""

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self.since: dict[Any, tuple[tuple[int, int], float]] = {}  # tp -> (seen, since)

    def due(self, behind: dict[Any, tuple[int, int]], now: float) -> dict[Any, int]:
        """`behind`: tp -> (position, expected) now (`StreamRuntime.tail_gaps`). The
        offsets to seek to, for the partitions behind the same way for settle_s."""
        since: dict[Any, tuple[tuple[int, int], float]] = {}
        due: dict[Any, int] = {}
        for tp, seen in behind.items():
            previous = self.since.get(tp)
            at = previous[1] if previous is not None and previous[0] == seen else now
            if now - at >= self.settle_s:
                due[tp] = seen[1]  # sought back: watched afresh from here
            else:
                since[tp] = (seen, at)
        self.since = since
        return due


class AssignedPartitions(Collector):
    """`smartlev_stream_assigned_partitions`: 1 per (topic, partition) this instance
    consumes right now, read at scrape time, so an operator (or a test) sees which of
    several instances holds a symbol's partition, and that a survivor took it over."""

    def __init__(self, runtime: StageRuntime) -> None:
        self.runtime = runtime

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "smartlev_stream_assigned_partitions",
            "Partitions assigned to this instance (topic without the namespace).",
            labels=["service", "topic", "partition"],
        )

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield self._family()  # registering must not touch the consumer (not started yet)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        namespace = self.runtime.settings.namespace
        for tp in sorted(self.runtime.assignment()):
            topic = tp.topic.removeprefix(namespace)
            family.add_metric([self.runtime.service, topic, str(tp.partition)], 1)
        yield family


class _Sidecar(mode.Service):
    """Starts the health/metrics server with the worker, closes clients when it stops."""

    def __init__(self, runtime: StreamRuntime, **kwargs: Any) -> None:
        self.runtime = runtime
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        await self.runtime.start_serving()

    @mode.Service.task
    async def _watch_recovery(self) -> None:
        watch = RecoveryWatch(self.runtime.recovery_stall_s)
        tables: Any = self.runtime.app.tables  # faust's TableManager (its type hides recovery)
        recovery = tables.recovery
        while not self.should_stop:
            await self.sleep(1.0)
            offsets = dict(recovery.active_offsets)
            if watch.stalled(recovery.in_recovery, offsets, time.monotonic()):
                self.runtime.log.error(
                    "recovery_stalled",
                    stall_s=watch.stall_s,
                    offsets={str(tp): offset for tp, offset in offsets.items()},
                    exit_code=RECOVERY_STALLED_EXIT,
                )
                os._exit(RECOVERY_STALLED_EXIT)  # a clean stop would wait on the hung recovery

    @mode.Service.task
    async def _watch_tail_gaps(self) -> None:
        watch = TailGapWatch(self.runtime.tail_gap_s)
        while not self.should_stop:
            await self.sleep(1.0)
            try:  # a rebalance may take a partition away meanwhile: look again next second
                behind = await self.runtime.tail_gaps()
                for tp, offset in watch.due(behind, time.monotonic()).items():
                    self.runtime.log.warning("offset_gap_at_tail", tp=str(tp), resume_at=offset)
                    await self.runtime.app.consumer.seek(tp, offset)
            except Exception as exc:
                self.runtime.log.warning("tail_gap_watch_failed", error=repr(exc))

    async def on_stop(self) -> None:
        await self.runtime.stop_serving()
