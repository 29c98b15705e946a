"""Where ingestion keeps its per-symbol state: Redis, with Kafka as the tie-breaker.

Redis hash `<namespace>ingest:{<symbol>}` (the symbol is the cluster hash tag) holds the
last published `seq`, the order key of the last accepted event and the last tick price and
mark; `...:feed` the live feed's own state (its last mark, the funding awaiting settlement).
The service records it only after the broker acknowledged every event up to that seq
(output before state), with one Lua script that checks the seq it read is still there
and moves it forward (allocation and the last tick change together, or not at all; a
second writer for the same symbol gets `SeqConflict` and stops instead of going on with
seqs of its own). It stops at its first record, after that batch went out: two
ingestions of one symbol at once publish one batch twice under the same seqs, and the
stages take the first they read. Run one ingestion per symbol (fencing the second in
the broker needs a transactional producer and read-committed consumers).

A crash between the broker's ack and the record would leave Redis behind the topic. So
`load()` also reads the tail of the symbol's partition of `market.ticks` and takes
whichever is further: a restarted ingestion never reuses a seq and never republishes
an event it already published.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import redis
from kafka import KafkaConsumer, TopicPartition
from smartlev.v1 import market_pb2

from services.ingestion.validation import EMPTY, SymbolState
from shared import codec
from shared.core.market import FUNDING_RANK, TICK_RANK
from shared.redis_store import key
from shared.topics import partition_for

# KEYS[1] the state hash. ARGV[1] the seq read before (expected), ARGV[2] the new seq,
# ARGV[3..] field/value pairs. Returns {1, seq} when recorded, {0, current seq} if not.
_RECORD_LUA = """
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local new = tonumber(ARGV[2])
if current ~= tonumber(ARGV[1]) or new <= current then return {0, current} end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], unpack(ARGV, 3))
return {1, new}
"""

Recover = Callable[[str], SymbolState | None]


class SeqConflict(RuntimeError):
    """Another writer moved the symbol's seq: two ingestions for one symbol."""


def state_key(namespace: str, symbol: str) -> str:
    return key(f"{namespace}ingest", symbol)


def feed_key(namespace: str, symbol: str) -> str:
    """The live feed's own state (the last mark, the funding awaiting settlement)."""
    return key(f"{namespace}ingest", symbol, "feed")


def _state_from_hash(fields: dict[str, str]) -> SymbolState:
    if not fields.get("seq"):
        return EMPTY
    price, mark = fields.get("price"), fields.get("mark")
    last_key = (int(fields["ts_ns"]), int(fields["rank"])) if fields.get("ts_ns") else None
    return SymbolState(
        int(fields["seq"]),
        last_key,
        Decimal(price) if price else None,
        Decimal(mark) if mark else None,
    )


class SeqStore:
    """Per-symbol state in Redis (sync client: the ingestion loop runs in one thread)."""

    def __init__(self, client: redis.Redis, namespace: str, recover: Recover | None = None):
        self.client = client
        self.namespace = namespace
        self.recover = recover
        self._record = client.register_script(_RECORD_LUA)

    def read(self, symbol: str) -> SymbolState:
        raw = self.client.hgetall(state_key(self.namespace, symbol))
        return _state_from_hash({_text(k): _text(v) for k, v in raw.items()})

    def load(self, symbol: str) -> SymbolState:
        """Redis's state, or the topic's when the topic is ahead (repairing Redis)."""
        stored = self.read(symbol)
        found = self.recover(symbol) if self.recover is not None else None
        if found is None or found.seq <= stored.seq:
            return stored
        self.record(symbol, stored.seq, found)
        return found

    def feed_fields(self, symbol: str) -> dict[str, str]:
        raw = self.client.hgetall(feed_key(self.namespace, symbol))
        return {_text(k): _text(v) for k, v in raw.items()}

    def save_feed_fields(self, symbol: str, fields: dict[str, str]) -> None:
        """Replace the live feed's state (after what it implied was published: a crash
        before this write settles a funding again, which time order then refuses)."""
        name = feed_key(self.namespace, symbol)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(name)
            if fields:
                pipe.hset(name, items=[part for pair in fields.items() for part in pair])
            pipe.execute()

    def record(self, symbol: str, expected_seq: int, state: SymbolState) -> None:
        """Move the stored state from `expected_seq` to `state` atomically."""
        fields: list[str | int] = []
        if state.last_key is not None:
            fields += ["ts_ns", state.last_key[0], "rank", state.last_key[1]]
        if state.last_price is not None:
            fields += ["price", codec.decimal_to_wire(state.last_price, name="price")]
        if state.last_mark is not None:
            fields += ["mark", codec.decimal_to_wire(state.last_mark, name="mark")]
        ok, current = self._record(
            keys=[state_key(self.namespace, symbol)], args=[expected_seq, state.seq, *fields]
        )
        if not int(ok):
            raise SeqConflict(
                f"{symbol}: stored seq is {int(current)}, expected {expected_seq} "
                f"(recording {state.seq}); is another ingestion publishing this symbol?"
            )


def topic_recovery(bootstrap: str, topic: str, chunk: int = 1000) -> Recover:
    """A `Recover` that reads the symbol's partition of `topic` backwards, `chunk`
    messages at a time, for its last event (seq, order key) and last tick (price, and its
    mark when it carries one: a mark further back is not looked for, so the first mark
    after a recovery from the topic is not judged for a jump)."""

    def recover(symbol: str) -> SymbolState | None:
        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            enable_auto_commit=False,
            client_id="smartlev-ingestion-recovery",
        )
        try:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                raise RuntimeError(f"topic {topic} does not exist (run kafka_admin)")
            tp = TopicPartition(topic, partition_for(symbol, len(partitions)))
            consumer.assign([tp])
            begin = consumer.beginning_offsets([tp])[tp]
            end = consumer.end_offsets([tp])[tp]
            last: market_pb2.MarketEvent | None = None
            while end > begin:
                start = max(begin, end - chunk)
                events = [e for e in _read(consumer, tp, start, end, symbol) if _sound(e)]
                if last is None and events:
                    last = events[-1]
                ticks = [e for e in events if e.HasField("tick")]
                if last is not None and ticks:
                    return _state_from_events(last, ticks[-1])
                end = start
            return None if last is None else _state_from_events(last, None)
        finally:
            consumer.close()

    return recover


def _read(
    consumer: KafkaConsumer, tp: TopicPartition, start: int, end: int, symbol: str
) -> list[market_pb2.MarketEvent]:
    """`symbol`'s events in [start, end): keyed by it and about it (a record keyed by
    another symbol is dead-lettered by the consumers, whatever it carries)."""
    key = symbol.encode("utf-8")
    consumer.seek(tp, start)
    out: list[market_pb2.MarketEvent] = []
    while consumer.position(tp) < end:
        for record in consumer.poll(timeout_ms=1000).get(tp, []):
            if record.offset >= end or record.key != key:
                continue
            try:
                event = codec.decode(market_pb2.MarketEvent, record.value)
            except codec.DecodeError:
                continue  # not ours to judge here; consumers dead-letter it
            if _symbol(event) == symbol:
                out.append(event)
    return out


def _symbol(event: market_pb2.MarketEvent) -> str:
    which = event.WhichOneof("event")
    return str(getattr(event, which).symbol) if which else ""


def _sound(event: market_pb2.MarketEvent) -> bool:
    """Only what ingestion itself could have published counts: a positive seq and exact
    numbers. Anything else on the topic was injected by someone else; its consumers
    dead-letter it, and recovery must not trust (or crash on) it."""
    which = event.WhichOneof("event")
    inner = getattr(event, which)
    try:
        if which == "tick" and codec.decimal_from_wire(inner.price) <= 0:
            return False
        if which == "tick" and inner.mark_price and codec.decimal_from_wire(inner.mark_price) <= 0:
            return False
        if which == "funding":
            codec.decimal_from_wire(inner.rate)
    except codec.DecodeError:
        return False
    return int(inner.seq) > 0


def _state_from_events(
    last: market_pb2.MarketEvent, last_tick: market_pb2.MarketEvent | None
) -> SymbolState:
    which = last.WhichOneof("event")
    inner = getattr(last, which)
    rank = TICK_RANK if which == "tick" else FUNDING_RANK
    if last_tick is None:
        return SymbolState(int(inner.seq), (int(inner.ts_event_ns), rank))
    tick = last_tick.tick
    mark = codec.decimal_from_wire(tick.mark_price) if tick.mark_price else None
    price = codec.decimal_from_wire(tick.price)
    return SymbolState(int(inner.seq), (int(inner.ts_event_ns), rank), price, mark)


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
