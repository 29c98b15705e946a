"""The runtime every faust stage service shares: app, input/DLQ topics, seq guard, main().

A stage service (regime, leverage, hedging, NAV; docs/pipeline.md) is a thin shell:

    runtime = StreamRuntime(settings)                       # settings.service = "regime"
    ticks = runtime.input(MARKET_TICKS)                     # raw bytes + its .dlq twin
    out = runtime.output(MARKET_REGIMES)

    @runtime.app.agent(ticks.topic)
    async def regime(stream):
        async for event in stream.events():
            parsed = await runtime.parse(ticks, event, to_core)   # None: dead-lettered
            if parsed is None:
                continue
            if not is_new(last_seq, seq):                          # redelivery
                runtime.skipped(ticks); continue
            await runtime.send(out, symbol, message)               # broker acked
            ... write state ...                                    # output before state
            runtime.processed(ticks, ts_init_ns)

    def main() -> None:
        runtime.run()                                        # logs, /healthz, SIGTERM

Why raw bytes in: faust throws a value that fails to decode into the agent, which kills
it; reading bytes and decoding here turns bad input into a `DeadLetter` on
`<topic>.dlq` (topic, partition, offset, key, payload, reason, service) and the agent
moves on. The decision itself is pure (`decode_input`, `dead_letter`), so it is unit
tested without a broker.

A service with several inputs (hedging: leverage.targets and orders.events) calls
`runtime.input()` once per topic and runs one agent per input; each `Input` has its own
DLQ. Metrics are labelled by service and input topic (un-namespaced name).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import faust
import mode
from faust.types import EventT, RecordMetadata, TopicT
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram
from smartlev.v1 import market_pb2

from shared.codec import DecodeError, decode, faust_topic, funding_from_proto, tick_from_proto
from shared.core.market import FundingRate, Tick
from shared.health import HealthRegistry, HealthServer, freshness_check, kafka_check, redis_check
from shared.logging import configure_logging, get_logger
from shared.settings import ServiceSettings
from shared.topics import TopicSpec

M = TypeVar("M", bound=Message)
T = TypeVar("T")

MESSAGES = Counter(
    "smartlev_stream_messages_total",
    "Input messages by outcome: processed, skipped (redelivered seq), dead_lettered.",
    ["service", "topic", "outcome"],
)
LATENCY = Histogram(
    "smartlev_stream_latency_seconds",
    "From the market event's ts_init (ingestion) to this stage's output being acked.",
    ["service"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
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
    """The DLQ record of a rejected input; its id names where the input was."""
    raw_key = key.encode("utf-8") if isinstance(key, str) else key or b""
    return market_pb2.DeadLetter(
        event_id=f"{topic}/{partition}/{offset}",
        topic=topic,
        partition=partition,
        offset=offset,
        key=raw_key,
        payload=payload or b"",
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


def parse_market(message: market_pb2.MarketEvent) -> MarketInput:
    """Validate a MarketEvent every stage can act on; ValueError says why not."""
    if message.HasField("tick"):
        wire: market_pb2.Tick | market_pb2.FundingRateObserved = message.tick
        tick = tick_from_proto(message.tick)
        if tick.price <= 0:
            raise ValueError(f"price must be positive, got {tick.price}")
        if tick.mark_price is not None and tick.mark_price <= 0:
            raise ValueError(f"mark_price must be positive, got {tick.mark_price}")
        value: Tick | FundingRate = tick
    elif message.HasField("funding"):
        wire = message.funding
        value = funding_from_proto(message.funding)
    else:
        raise ValueError("no event set in MarketEvent")
    if not wire.symbol:
        raise ValueError("symbol is empty")
    if wire.seq <= 0:
        raise ValueError("seq is missing (must be >= 1)")
    return MarketInput(message, wire.symbol, wire.seq, wire.ts_init_ns, value)


def event_key(event: EventT) -> str:
    """The message key as text (keys are symbols/products, UTF-8)."""
    key = event.key
    return key.decode("utf-8") if isinstance(key, bytes) else str(key or "")


# --------------------------------------------------------------------------- the app


def app_id(settings: ServiceSettings) -> str:
    """`<namespace>smartlev-<service>`: also the consumer group and table topics' prefix."""
    return f"{settings.namespace}smartlev-{settings.service}"


def build_app(settings: ServiceSettings, **overrides: Any) -> faust.App:
    """A faust App for a stage: in-memory tables restored from their Kafka changelog,
    no faust web server (shared/health serves /healthz and /metrics), acks=all."""
    options: dict[str, Any] = {
        "broker": settings.kafka.faust_broker,
        "store": "memory://",
        "web_enabled": False,
        "autodiscover": False,
        "topic_replication_factor": settings.kafka.replication,
        "topic_allow_declare": True,  # faust creates its own changelog topics
        "topic_disable_leader": True,  # no `__assignor-__leader` topic: no leader timers
        "consumer_auto_offset_reset": "earliest",
        "producer_acks": -1,
        "broker_client_id": f"{settings.kafka.client_id}-{settings.service}",
    }
    options.update(overrides)
    return faust.App(app_id(settings), **options)


@dataclass(frozen=True, slots=True)
class Input:
    """A raw-bytes input topic (namespaced) with its dead-letter twin."""

    spec: TopicSpec  # the registry entry (un-namespaced: metric label)
    topic: TopicT  # values arrive as bytes
    dlq: TopicT  # DeadLetter values


@dataclass
class StreamRuntime:
    """One service's app, topics, metrics and entrypoint; see the module doc."""

    settings: ServiceSettings
    stale_after_s: float = 900.0  # /healthz fails when no input was handled for this long
    app: faust.App = field(init=False)
    last_progress: float | None = field(init=False, default=None)
    redis: Any = field(init=False, default=None)  # set by services that use Redis

    def __post_init__(self) -> None:
        self.app = build_app(self.settings)
        self.log = get_logger(self.settings.service, "stream")
        self._on_stop: list[Callable[[], Awaitable[None]]] = []

    @property
    def service(self) -> str:
        return self.settings.service

    def spec(self, spec: TopicSpec) -> TopicSpec:
        return spec.in_namespace(self.settings.namespace)

    def input(self, spec: TopicSpec) -> Input:
        named = self.spec(spec)
        return Input(
            spec=spec,
            topic=faust_topic(self.app, named, decode_values=False),
            dlq=faust_topic(self.app, named.dlq()),
        )

    def output(self, spec: TopicSpec) -> TopicT:
        return faust_topic(self.app, self.spec(spec))

    async def parse(self, inp: Input, event: EventT, convert: Callable[[Any], T]) -> T | None:
        """Decode + validate the event's value as `inp.spec.value_type`, converted by
        `convert`; on failure dead-letter it and return None."""
        result = decode_input(inp.spec.value_type, event.value, convert)
        if isinstance(result, str):
            await self.reject(inp, event, result)
            return None
        return result

    async def reject(self, inp: Input, event: EventT, reason: str) -> None:
        """Send the event to the input's DLQ with `reason` (waits for the ack). Also for
        input that decodes but the stage's state refuses (e.g. a tick back in time)."""
        message = event.message
        payload = event.value if isinstance(event.value, bytes) else message.value
        letter = dead_letter(
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key,
            payload=payload,
            reason=reason,
            service=self.service,
            ts_ns=time.time_ns(),
        )
        await self.send(inp.dlq, event_key(event), letter)
        MESSAGES.labels(self.service, inp.spec.name, "dead_lettered").inc()
        self.last_progress = time.monotonic()
        self.log.warning(
            "dead_lettered",
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            reason=reason,
        )

    async def send(self, topic: TopicT, key: str, value: Message) -> RecordMetadata:
        """Produce and wait for the broker's ack (acks=all): output before state."""
        pending = await topic.send(key=key, value=value)
        return await pending

    def processed(self, inp: Input, ts_init_ns: int) -> None:
        MESSAGES.labels(self.service, inp.spec.name, "processed").inc()
        LATENCY.labels(self.service).observe(max(time.time_ns() - ts_init_ns, 0) / 1e9)
        self.last_progress = time.monotonic()

    def skipped(self, inp: Input) -> None:
        MESSAGES.labels(self.service, inp.spec.name, "skipped").inc()
        self.last_progress = time.monotonic()

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Close a client (e.g. Redis) when the worker stops."""
        self._on_stop.append(callback)

    def health(self) -> HealthRegistry:
        registry = HealthRegistry()
        registry.register("kafka", kafka_check(self.settings.kafka_bootstrap))
        if self.redis is not None:
            registry.register("redis", redis_check(self.redis))
        registry.register(
            "consumer",
            freshness_check(lambda: self.last_progress, self.stale_after_s, "input handled"),
        )
        return registry

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
        """The service entrypoint: JSON logs, health server, worker; exits on SIGTERM."""
        configure_logging(self.service, self.settings.log_level)
        self.worker().execute_from_commandline()


class _Sidecar(mode.Service):
    """Starts the health/metrics server with the worker, closes clients when it stops."""

    def __init__(self, runtime: StreamRuntime, **kwargs: Any) -> None:
        self.runtime = runtime
        self.server: HealthServer | None = None
        super().__init__(**kwargs)

    async def on_start(self) -> None:
        # Idle since start counts as fresh: a quiet market is not a stuck consumer.
        self.runtime.last_progress = time.monotonic()
        settings = self.runtime.settings
        if settings.metrics_port:
            self.server = HealthServer(
                self.runtime.health(), port=settings.metrics_port, service=settings.service
            )
            await self.server.start()

    async def on_stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        for callback in self.runtime._on_stop:
            await callback()
