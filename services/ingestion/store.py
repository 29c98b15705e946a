"""Where ingestion keeps its per-symbol state: Redis, with Kafka as the tie-breaker.

Redis hash `<namespace>ingest:{<symbol>}` (the symbol is the cluster hash tag) holds the
last published `seq`, the order key of the last accepted event and the last tick price and
mark; `...:feed` the live feed's own state (its last mark, the funding awaiting settlement).
The service records it only after the broker acknowledged every event up to that seq
(output before state), with one Lua script that checks the seq it read is still there
and moves it forward (allocation and the last tick change together, or not at all).

One ingestion per symbol: `...:owner` is a lease (`SymbolLease`) an ingestion takes
before it reads the state and renews while it runs; a second ingestion of the symbol
waits for it (`SymbolTaken`) and takes over, from the state the first left, once the
first stops or its lease runs out. An ingestion checks its lease before each event it
sends and the record script checks it again, so one that lost it (stalled past its
lease, Redis unreachable) stops with `LeaseLost` instead of publishing under seqs its
successor uses. What a lease cannot fence is a stall between that check and the send:
a batch sent then goes out under seqs the successor reuses, its record is refused and
the stages take the first they read (fencing in the broker needs a transactional
producer and read-committed consumers).

A crash between the broker's ack and the record would leave Redis behind the topic. So
`load()` also reads the tail of the symbol's partition of `market.ticks` and takes
whichever is further: a restarted ingestion never reuses a seq and never republishes
an event it already published.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
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

# KEYS[1] the state hash, KEYS[2] the symbol's lease. ARGV[1] the seq read before
# (expected), ARGV[2] the new seq, ARGV[3] the lease's token, ARGV[4] its time to live
# (ms), ARGV[5..] field/value pairs. Returns {1, seq} when recorded (the lease renewed),
# {0, current seq} if the seq moved, {-1, holder} if another ingestion holds the lease.
_RECORD_LUA = """
local held = redis.call('GET', KEYS[2])
if held and held ~= ARGV[3] then return {-1, held} end
local current = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local new = tonumber(ARGV[2])
if current ~= tonumber(ARGV[1]) or new <= current then return {0, current} end
redis.call('HSET', KEYS[1], 'seq', ARGV[2], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
return {1, new}
"""

# KEYS[1] the lease, ARGV[1] the token, ARGV[2] its time to live (ms). Taken or renewed:
# {1, '', 0}; held by another: {0, its token, ms left}.
_LEASE_LUA = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return {0, held, redis.call('PTTL', KEYS[1])} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, '', 0}
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Recover = Callable[[str], SymbolState | None]
LEASE_TTL_S = 5.0  # a crashed ingestion's successor waits this long at most


class SeqConflict(RuntimeError):
    """Another writer moved the symbol's seq: two ingestions for one symbol."""


class Standby(Exception):
    """This ingestion may not publish the symbol now: it waits `retry_after_s` and tries
    to take the symbol's lease again (main.Attempts)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class SymbolTaken(Standby):
    """Another ingestion holds the symbol's lease."""


class LeaseLost(Standby):
    """This ingestion's lease ran out (or another took it) while it ran."""


def lease_key(namespace: str, symbol: str) -> str:
    return key(f"{namespace}ingest", symbol, "owner")


def holder_token() -> str:
    """A run's name as a lease holder, for whoever finds the lease taken (host, pid, a
    nonce: a pid reused after a restart is another holder)."""
    return f"{socket.gethostname()}/pid {os.getpid()}/{uuid.uuid4().hex[:8]}"


class SymbolLease:
    """The symbol's lease in Redis, as this process holds it. `valid` is judged on the
    local clock from when each take or renewal was sent, so it ends no later than the key
    does in Redis (unless Redis loses the key: a crash losing its last second, a
    failover; the README's "What it does not do")."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        symbol: str,
        token: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.symbol = symbol
        self.name = lease_key(namespace, symbol)
        self.token = token
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self._clock = clock
        self._until = 0.0
        self._take = client.register_script(_LEASE_LUA)
        self._release = client.register_script(_RELEASE_LUA)

    @property
    def valid(self) -> bool:
        return self._clock() < self._until

    def take(self) -> None:
        """Take or renew the lease, else `SymbolTaken` naming its holder."""
        sent = self._clock()
        taken, holder, left_ms = self._take(keys=[self.name], args=[self.token, self.ttl_ms])
        if int(taken):
            self.renewed(sent)
            return
        self._until = 0.0
        left_s = max(int(left_ms), 0) / 1000
        raise SymbolTaken(
            f"{self.symbol} is being ingested by {_text(holder)} (its lease runs out in "
            f"{left_s:.1f}s unless renewed); one ingestion per symbol: this one takes over "
            "when that one stops",
            retry_after_s=min(left_s, self.ttl_ms / 1000) + 0.05,
        )

    def renewed(self, sent: float) -> None:
        self._until = sent + self.ttl_ms / 1000

    def check(self) -> None:
        """`LeaseLost` unless the lease is still this process's."""
        if not self.valid:
            raise LeaseLost(
                f"{self.symbol}: this ingestion's lease ran out (stalled, or Redis "
                "unreachable); it stops publishing and takes the lease again",
                retry_after_s=0.0,
            )

    def release(self) -> None:
        self._until = 0.0
        self._release(keys=[self.name], args=[self.token])


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
    """Per-symbol state in Redis (sync client: the ingestion loop runs in one thread; the
    leases' heartbeat renews them from a thread of its own). Owns the client."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        recover: Recover | None = None,
        lease_ttl_s: float = LEASE_TTL_S,
        token: str | None = None,
    ):
        """`token`: the holder the leases are taken as; one run's attempts pass the same,
        so an attempt rebuilt after a failure takes its predecessor's lease back at once
        (one that could not hand it back, Redis down, left it in place)."""
        self.client = client
        self.namespace = namespace
        self.recover = recover
        self.lease_ttl_s = lease_ttl_s
        self.token = token or holder_token()
        self._record = client.register_script(_RECORD_LUA)
        self._leases: dict[str, SymbolLease] = {}
        self._closed = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def read(self, symbol: str) -> SymbolState:
        raw = self.client.hgetall(state_key(self.namespace, symbol))
        return _state_from_hash({_text(k): _text(v) for k, v in raw.items()})

    def load(self, symbol: str) -> SymbolState:
        """Take the symbol's lease (`SymbolTaken` while another ingestion holds it), then
        Redis's state, or the topic's when the topic is ahead (repairing Redis)."""
        self._lease(symbol)
        stored = self.read(symbol)
        found = self.recover(symbol) if self.recover is not None else None
        if found is None or found.seq <= stored.seq:
            return stored
        self.record(symbol, stored.seq, found)
        return found

    def _lease(self, symbol: str) -> None:
        lease = self._leases.get(symbol)
        if lease is None:
            lease = SymbolLease(self.client, self.namespace, symbol, self.token, self.lease_ttl_s)
        lease.take()
        self._leases[symbol] = lease
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(
                target=self._renewing, name="ingestion-lease", daemon=True
            )
            self._heartbeat.start()

    def _renewing(self) -> None:
        """Renew every lease three times a lease: a paced replay or a quiet feed records
        nothing for long stretches. A renewal that fails leaves the lease to run out, and
        the next event sent finds it so (`check_lease`)."""
        while not self._closed.wait(self.lease_ttl_s / 3):
            for lease in list(self._leases.values()):
                with contextlib.suppress(SymbolTaken, redis.RedisError, OSError):
                    lease.take()

    def check_lease(self, symbol: str) -> None:
        """`LeaseLost` unless this process still holds the symbol's lease."""
        self._taken(symbol).check()

    def _taken(self, symbol: str) -> SymbolLease:
        """The symbol's lease as `load` took it, or `LeaseLost`."""
        lease = self._leases.get(symbol)
        if lease is None:
            raise LeaseLost(f"{symbol}: no lease taken", retry_after_s=0.0)
        return lease

    def close(self) -> None:
        """Stop renewing, hand the leases back (a successor need not wait them out) and
        close the client."""
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        for lease in self._leases.values():
            with contextlib.suppress(redis.RedisError, OSError):
                lease.release()
        self.client.close()

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
        lease = self._taken(symbol)
        sent = time.monotonic()
        ok, current = self._record(
            keys=[state_key(self.namespace, symbol), lease.name],
            args=[expected_seq, state.seq, self.token, lease.ttl_ms, *fields],
        )
        if int(ok) < 0:
            raise LeaseLost(
                f"{symbol}: {_text(current)} holds the lease now; this ingestion's "
                f"record of seq {state.seq} was refused",
                retry_after_s=0.0,
            )
        if not int(ok):
            raise SeqConflict(
                f"{symbol}: stored seq is {int(current)}, expected {expected_seq} "
                f"(recording {state.seq}); is another ingestion publishing this symbol?"
            )
        lease.renewed(sent)


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
