"""The ingestion shell: validate each candidate, publish it, record the seq after the ack.

`Ingestor.submit()` runs the pure `admit()` against the symbol's state and sends the
event (valid -> `market.ticks` as a `MarketEvent` keyed by symbol, event_id
`<symbol>:<seq>`; refused -> `market.ticks.dlq` as a `DeadLetter` with the reason)
without waiting; `commit()` waits until the broker acknowledged everything sent (acks=all)
and only then records each symbol's new state in Redis. Batching the acks keeps
`replay --speed max` fast; the seq guarantees do not depend on the batch size (see
store.py for the crash between ack and record).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from smartlev.v1 import market_pb2

from services.ingestion.producer import BatchProducer, Sent
from services.ingestion.store import SeqStore
from services.ingestion.validation import (
    Accepted,
    MarketValue,
    Policy,
    Reason,
    Rejected,
    SymbolState,
    admit,
)
from shared import codec
from shared.core.market import FundingRate, Tick
from shared.logging import StructLogger


class IngestionMetrics:
    """The service's Prometheus metrics (own registry in tests)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.published = Counter(
            "smartlev_ingestion_published_total",
            "market events published to market.ticks",
            ["symbol", "kind"],
            registry=registry,
        )
        self.rejected = Counter(
            "smartlev_ingestion_rejected_total",
            "candidate events refused and dead-lettered, by reason",
            ["symbol", "reason"],
            registry=registry,
        )
        self.flagged = Counter(
            "smartlev_ingestion_flagged_jumps_total",
            "ticks published although their price (or mark) moved more than max_jump from "
            "the last one",
            ["symbol", "of"],
            registry=registry,
        )
        self.staleness = Gauge(
            "smartlev_ingestion_staleness_seconds",
            "wall seconds since the last accepted event (since start before the first)",
            registry=registry,
        )
        self.latency = Histogram(
            "smartlev_ingestion_publish_latency_seconds",
            "submit -> broker ack (acks=all) per published event",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=registry,
        )


@dataclass
class Stats:
    published: int = 0
    rejected: int = 0
    dead_lettered: int = 0
    flagged: int = 0


def describe(value: object) -> bytes:
    """A refused candidate as JSON bytes for `DeadLetter.payload` (numbers as text)."""
    if isinstance(value, Tick | FundingRate):
        body: dict[str, object] = {"kind": type(value).__name__}
        body.update({k: str(v) for k, v in value._asdict().items()})
    else:
        body = {"kind": type(value).__name__, "repr": repr(value)[:500]}
    return json.dumps(body, sort_keys=True).encode("utf-8")


class Ingestor:
    def __init__(
        self,
        *,
        producer: BatchProducer,
        store: SeqStore,
        topic: str,
        dlq_topic: str,
        source: str,
        policy: Policy,
        metrics: IngestionMetrics,
        log: StructLogger,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.producer = producer
        self.store = store
        self.topic = topic
        self.dlq_topic = dlq_topic
        self.source = source
        self.policy = policy
        self.metrics = metrics
        self.log = log
        self.clock_ns = clock_ns
        self.stats = Stats()
        self.started = time.monotonic()
        self.last_accepted: float | None = None  # time.monotonic() of the last accept
        self._states: dict[str, SymbolState] = {}
        self._recorded: dict[str, int] = {}  # symbol -> seq stored in Redis
        self._pending: list[tuple[Sent, float, Accepted | None]] = []
        metrics.staleness.set_function(self.staleness)

    def staleness(self) -> float:
        """Wall seconds since the last accepted event (since start before the first)."""
        return time.monotonic() - (self.last_accepted or self.started)

    def state(self, symbol: str) -> SymbolState:
        """The symbol's state, loaded from the store on first use."""
        if symbol not in self._states:
            loaded = self.store.load(symbol)
            self._states[symbol] = loaded
            self._recorded[symbol] = loaded.seq
            self.log.info("state_loaded", symbol=symbol, seq=loaded.seq, last=loaded.last_key)
        return self._states[symbol]

    def submit(self, event: MarketValue) -> Accepted | Rejected:
        symbol = event.symbol if isinstance(event.symbol, str) else ""
        if not symbol.strip():
            rejected = Rejected(Reason.SCHEMA, f"symbol must be a non-empty string: {symbol!r}")
            self.dead_letter(symbol, describe(event), rejected)
            return rejected
        state, verdict = admit(self.state(symbol), event, self.policy)
        if isinstance(verdict, Rejected):
            self.dead_letter(symbol, describe(event), verdict)
            return verdict
        self.store.check_lease(symbol)  # before its seq goes out: a successor may use it
        self._states[symbol] = state
        self.last_accepted = time.monotonic()
        message = self._message(verdict)
        future = self.producer.send(self.topic, key=symbol, value=message)
        self._pending.append((future, time.perf_counter(), verdict))
        for of, move in (("price", verdict.jump), ("mark", verdict.mark_jump)):
            if move is not None:
                self.stats.flagged += 1
                self.metrics.flagged.labels(symbol, of).inc()
                self.log.warning(
                    "jump_flagged",
                    symbol=symbol,
                    of=of,
                    seq=verdict.seq,
                    ts_ns=event.ts_ns,
                    move=f"{move:.4f}",
                    max_jump=self.policy.max_jump,
                )
        return verdict

    def _message(self, accepted: Accepted) -> market_pb2.MarketEvent:
        event = accepted.event
        event_id = f"{event.symbol}:{accepted.seq}"
        if isinstance(event, Tick):
            return codec.market_event_from_tick(
                event,
                seq=accepted.seq,
                source=self.source,
                ts_init_ns=self.clock_ns(),
                event_id=event_id,
            )
        return codec.market_event_from_funding(
            event,
            seq=accepted.seq,
            source=self.source,
            ts_init_ns=self.clock_ns(),
            event_id=event_id,
        )

    def dead_letter(self, symbol: str, payload: bytes, rejected: Rejected) -> None:
        """Send a refused candidate (or an unparseable exchange payload) to the DLQ."""
        letter = market_pb2.DeadLetter(
            event_id=f"{symbol or '?'}:dlq:{uuid.uuid4().hex}",
            topic=self.topic,
            partition=-1,  # never was on the topic: refused before publishing
            offset=-1,
            key=symbol.encode("utf-8"),
            payload=payload,
            reason=str(rejected),
            ts_ns=self.clock_ns(),
            service="ingestion",
        )
        future = self.producer.send(self.dlq_topic, key=symbol or None, value=letter)
        self._pending.append((future, time.perf_counter(), None))
        reason = rejected.reason.value
        self.stats.rejected += 1
        self.metrics.rejected.labels(symbol or "?", reason).inc()
        self.log.warning("event_rejected", symbol=symbol, reason=str(rejected))

    def commit(self) -> None:
        """Wait for every ack (raises if the broker refused any), then record state."""
        if not self._pending:
            return
        self.producer.flush()
        for future, sent_at, accepted in self._pending:
            future.result(timeout=30)
            if accepted is None:
                self.stats.dead_lettered += 1
                continue
            self.metrics.latency.observe(time.perf_counter() - sent_at)
            kind = "tick" if isinstance(accepted.event, Tick) else "funding"
            self.metrics.published.labels(accepted.event.symbol, kind).inc()
            self.stats.published += 1
        self._pending.clear()
        for symbol, state in self._states.items():
            if state.seq != self._recorded[symbol]:
                self.store.record(symbol, self._recorded[symbol], state)
                self._recorded[symbol] = state.seq
