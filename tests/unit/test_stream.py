"""The pure parts of the shared stream runtime: seq guard, DLQ decision, market parsing,
and the faust app's settings (no broker)."""

from __future__ import annotations

import asyncio
import time
import weakref
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from intervaltree import IntervalTree
from smartlev.v1 import market_pb2

from shared import codec, stream
from shared.core.market import FundingRate, Tick
from shared.health import stalled_check
from shared.settings import ServiceSettings
from shared.stream import (
    _GATHERING,
    LETTER_PAYLOAD_BYTES,
    MarketInput,
    OffsetGaps,
    RecoveryWatch,
    StreamRuntime,
    TailGapWatch,
    _Consumer,
    _Gathering,
    app_id,
    dead_letter,
    decode_input,
    faust_reads,
    is_new,
    parse_market,
)
from shared.topics import MARKET_TICKS

SYMBOL = "BTC-USDT"


def tick_event(seq: int = 1, price: str = "43210.5", mark: str = "") -> market_pb2.MarketEvent:
    return market_pb2.MarketEvent(
        tick=market_pb2.Tick(
            event_id=f"t|{seq}",
            symbol=SYMBOL,
            ts_event_ns=10,
            ts_init_ns=20,
            price=price,
            mark_price=mark,
            seq=seq,
            source="t",
        )
    )


def funding_event(seq: int = 2, rate: str = "0.0001") -> market_pb2.MarketEvent:
    return market_pb2.MarketEvent(
        funding=market_pb2.FundingRateObserved(
            event_id=f"f|{seq}",
            symbol=SYMBOL,
            ts_event_ns=30,
            ts_init_ns=40,
            rate=rate,
            seq=seq,
            source="t",
        )
    )


@pytest.mark.parametrize(
    ("last", "seq", "apply"),
    [(None, 1, True), (1, 2, True), (5, 7, True), (5, 5, False), (5, 4, False)],
)
def test_sequence_guard_applies_only_newer_seq(last: int | None, seq: int, apply: bool) -> None:
    assert is_new(last, seq) is apply


def test_parse_market_tick_and_funding() -> None:
    parsed = parse_market(tick_event(3, "100.5", "100.4"))
    assert parsed == MarketInput(
        tick_event(3, "100.5", "100.4"),
        SYMBOL,
        3,
        20,
        Tick(SYMBOL, 10, Decimal("100.5"), Decimal("100.4")),
    )
    funding = parse_market(funding_event())
    assert funding.value == FundingRate(SYMBOL, 30, Decimal("0.0001"))
    assert (funding.seq, funding.ts_init_ns) == (2, 40)


def decide_bytes(payload: bytes | None) -> MarketInput | str:
    return decode_input(market_pb2.MarketEvent, payload, parse_market)


def test_decode_input_returns_the_value_or_the_reason() -> None:
    assert isinstance(decide_bytes(codec.encode(tick_event())), MarketInput)
    assert "malformed protobuf" in str(decide_bytes(b"\xff\x00garbage"))
    assert decide_bytes(b"") == "no event set in the oneof wrapper"
    assert decide_bytes(None) == "payload is null (tombstone)"
    assert "is not a plain decimal" in str(decide_bytes(codec.encode(tick_event(price="1e5"))))
    assert "price must be positive" in str(decide_bytes(codec.encode(tick_event(price="0"))))
    # a tick at 5e37 traded, then its update could not be written (the symbol halted)
    for huge in (tick_event(price="5" + "0" * 37), tick_event(mark="1000000000000.1")):
        assert "above the highest price taken" in str(decide_bytes(codec.encode(huge)))
    assert isinstance(decide_bytes(codec.encode(tick_event(price="1000000000000"))), MarketInput)
    assert "mark_price must be positive" in str(decide_bytes(codec.encode(tick_event(mark="-1"))))
    assert "seq must be in [1, 2^53)" in str(decide_bytes(codec.encode(tick_event(seq=0))))
    # Lua compares seqs as doubles: 2^53 and 2^53 + 1 would be one seq
    assert isinstance(decide_bytes(codec.encode(tick_event(seq=2**53 - 1))), MarketInput)
    assert "seq must be in [1, 2^53)" in str(decide_bytes(codec.encode(tick_event(seq=2**53))))
    # ingestion refuses them too: one opened a bar in 1970 the next real tick closed
    for ts in (0, -3_600_000_000_000):
        for event in (tick_event(), funding_event()):
            getattr(event, event.WhichOneof("event")).ts_event_ns = ts
            assert decide_bytes(codec.encode(event)) == f"ts_event_ns must be > 0, got {ts}"
    # A figure of more than 12 places (trailing zeros too) made cash no wire carries.
    twelve, thirteen = "50100.123456789012", "50100." + "0" * 13
    at_most = tick_event(price=twelve, mark=twelve)
    assert isinstance(decide_bytes(codec.encode(at_most)), MarketInput)
    for tick in (tick_event(price=thirteen), tick_event(mark=thirteen)):
        assert "has 13 decimal places, more than 12" in str(decide_bytes(codec.encode(tick)))
    assert "rate has 13 decimal places" in str(
        decide_bytes(codec.encode(funding_event(rate="0.0001000000000")))
    )
    assert isinstance(decide_bytes(codec.encode(funding_event(rate="-0.05"))), MarketInput)
    assert "|rate| must be <= 0.05" in str(decide_bytes(codec.encode(funding_event(rate="0.051"))))
    for symbol in ("", "BTC{X}", "BTC-USDT|signal", "BTC:LONG", "BTC USDT", "X" * 41):
        bad = tick_event()
        bad.tick.symbol = symbol  # each would break a Redis hash tag, a key or a product id
        assert decide_bytes(codec.encode(bad)) == (
            f"symbol {symbol!r} must be 1-40 characters of A-Z a-z 0-9 . _ -"
        )


def test_a_dead_letter_carries_at_most_half_a_mebibyte_of_its_input() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB
    letter = dead_letter(
        topic="t", partition=0, offset=9, key="k" * 5000, payload=big, reason="r" * 9000,
        service="s", ts_ns=1,
    )  # fmt: skip
    assert letter.payload == big[:LETTER_PAYLOAD_BYTES] and len(letter.key) == 1024
    assert letter.reason.endswith(f"(payload cut to its first 524,288 of {len(big):,} bytes)")
    assert letter.ByteSize() < 600_000  # its value (reject cuts its Kafka key as well)
    small = dead_letter(
        topic="t", partition=0, offset=9, key=None, payload=b"x", reason="why", service="s",
        ts_ns=1,
    )  # fmt: skip
    assert (small.payload, small.reason) == (b"x", "why")


def test_dead_letter_names_where_the_input_was() -> None:
    letter = dead_letter(
        topic="ns.market.ticks",
        partition=2,
        offset=151,
        key=b"BTC-USDT",
        payload=b"\xff",
        reason="bad",
        service="regime",
        ts_ns=7,
    )
    assert letter == market_pb2.DeadLetter(
        event_id="ns.market.ticks/2/151",
        topic="ns.market.ticks",
        partition=2,
        offset=151,
        key=b"BTC-USDT",
        payload=b"\xff",
        reason="bad",
        ts_ns=7,
        service="regime",
    )
    assert (
        dead_letter(
            topic="t",
            partition=0,
            offset=0,
            key=None,
            payload=None,
            reason="r",
            service="s",
            ts_ns=0,
        ).key
        == b""
    )


def test_app_settings() -> None:
    settings = ServiceSettings(service="regime", namespace="t1.")
    runtime = StreamRuntime(settings)
    conf = runtime.app.conf
    assert app_id(settings) == "t1.smartlev-regime" == runtime.app.conf.id
    assert str(conf.store) == "memory:"
    assert conf.web_enabled is False
    assert conf.producer_acks == -1
    assert conf.consumer_auto_offset_reset == "earliest"
    assert conf.topic_replication_factor == 1
    assert conf.topic_allow_declare is True
    assert conf.consumer_metadata_max_age_ms == 10_000  # a topic missing at the start
    ticks = runtime.input(MARKET_TICKS)
    assert ticks.topic.get_topic_name() == ticks.name == "t1.market.ticks"
    assert ticks.dlq == "t1.market.ticks.dlq"


async def test_parse_dead_letters_bad_input_and_returns_none() -> None:
    runtime = StreamRuntime(ServiceSettings(service="regime", namespace="t2."))
    ticks = runtime.input(MARKET_TICKS)
    sent: list[tuple[Any, str, Any]] = []

    async def send(topic: Any, key: str, value: Any) -> None:
        sent.append((topic, key, value))

    runtime.send = send  # type: ignore[method-assign]
    bad = SimpleNamespace(
        topic="t2.market.ticks", partition=1, offset=9, key=b"BTC-USDT", value=b"\xff\x00"
    )
    assert await runtime.parse(ticks, bad, parse_market) is None
    [(topic, key, letter)] = sent
    assert topic == ticks.dlq == "t2.market.ticks.dlq" and key == SYMBOL
    assert (letter.partition, letter.offset, letter.payload) == (1, 9, b"\xff\x00")
    assert letter.service == "regime" and "malformed protobuf" in letter.reason

    good = SimpleNamespace(
        topic="t2.market.ticks",
        partition=1,
        offset=10,
        key=b"BTC-USDT",
        value=codec.encode(tick_event()),
    )
    parsed = await runtime.parse(ticks, good, parse_market)
    assert isinstance(parsed, MarketInput) and len(sent) == 1


def test_offset_gaps_seek_back_to_the_first_event_faust_dropped() -> None:
    gaps = OffsetGaps()
    assert [gaps.check(1, "p2", o) for o in (151, 152, 153)] == [None, None, None]
    # faust dropped 154..160: every later event is dropped, asking to seek back to 154
    assert gaps.check(1, "p2", 161) == 154
    assert gaps.check(1, "p2", 162) == 154
    assert gaps.check(1, "p2", 154) is None  # re-read after the seek
    assert gaps.check(1, "p2", 152) is None  # an older redelivery: the seq guard skips it
    assert gaps.check(1, "p2", 155) is None
    assert gaps.check(1, "p0", 7) is None  # partitions are independent
    # a new assignment starts wherever faust put the partition
    assert gaps.check(2, "p2", 300) is None
    assert gaps.check(2, "p2", 301) is None


def test_offset_gaps_start_a_new_assignment_at_the_committed_offset() -> None:
    """A rebalance dropped a gathering batch (offsets 60-61) and faust then dropped
    their re-read as below its read offset: the first event of the new assignment is
    62, but 60 is committed, so the stage seeks back instead of skipping two events."""
    committed: dict[str, int] = {"p0": 9}
    gaps = OffsetGaps(committed.get)
    assert gaps.check(1, "p2", 59) is None
    committed["p2"] = 60  # what faust's seek for the new assignment set
    assert gaps.check(2, "p2", 62) == 60
    assert gaps.check(2, "p2", 63) == 60  # dropped until the re-read
    assert gaps.check(2, "p2", 60) is None
    assert gaps.check(2, "p2", 61) is None
    assert gaps.check(2, "p2", 62) is None
    assert gaps.check(3, "p0", 5) is None  # below: a redelivery, seq-guarded
    assert gaps.check(3, "p0", 6) is None
    assert gaps.check(4, "p1", 40) is None  # nothing committed yet


def test_recovery_watch_fires_only_after_stall_without_progress() -> None:
    watch = RecoveryWatch(stall_s=45)
    assert not watch.stalled(True, {"tp": 0}, now=0)
    assert not watch.stalled(True, {"tp": 0}, now=44.9)
    assert watch.stalled(True, {"tp": 0}, now=45)


def test_recovery_watch_restarts_the_clock_on_progress_and_after_recovery() -> None:
    watch = RecoveryWatch(stall_s=45)
    watch.stalled(True, {"tp": 0}, now=0)
    assert not watch.stalled(True, {"tp": 7}, now=40)  # progress: a new offset
    assert not watch.stalled(True, {"tp": 7}, now=84)
    assert watch.stalled(True, {"tp": 7}, now=85)
    assert not watch.stalled(False, {"tp": 7}, now=200)  # recovered
    assert not watch.stalled(True, {"tp": 7}, now=201)  # a new recovery starts afresh


def test_tail_gap_watch_seeks_back_a_partition_left_behind_unchanged() -> None:
    """faust dropped the rest of a fetched chunk: the position stands past the next
    offset the stage expects, and nothing more comes. Due only once unchanged for
    settle_s, to the expected offset; then watched afresh."""
    watch = TailGapWatch(settle_s=5)
    assert watch.due({"p2": (297, 74)}, now=0) == {}
    assert watch.due({"p2": (297, 74)}, now=4.9) == {}
    assert watch.due({"p2": (297, 74)}, now=5) == {"p2": 74}
    assert watch.due({"p2": (297, 74)}, now=6) == {}  # sought: a new wait starts here
    assert watch.due({"p2": (297, 74)}, now=11) == {"p2": 74}


def test_tail_gap_watch_restarts_the_clock_on_progress_and_forgets_caught_up() -> None:
    watch = TailGapWatch(settle_s=5)
    watch.due({"p2": (297, 74), "p1": (10, 8)}, now=0)
    assert watch.due({"p2": (297, 120), "p1": (10, 8)}, now=4) == {}  # p2 moved on
    assert watch.due({"p2": (297, 120), "p1": (10, 8)}, now=5) == {"p1": 8}
    assert watch.due({"p2": (297, 120)}, now=8.9) == {}
    assert watch.due({}, now=9) == {}  # caught up (or a batch in hand): forgotten
    assert watch.due({"p2": (297, 120)}, now=10) == {}
    assert watch.due({"p2": (297, 120)}, now=15) == {"p2": 120}


class _Message:
    """Stands in for a faust ConsumerMessage: only identity matters to the unacked set."""


def test_stopping_the_flow_drops_a_gathering_batch_without_acking_it() -> None:
    """A rebalance waits for every unacked message; events a batch gathered but never
    handed out would hold it forever. They leave the unacked set (not acked: read again
    from the committed offset) and the batch is emptied; other messages stay tracked."""
    consumer = _Consumer.__new__(_Consumer)  # the flow-control state is all stop_flow uses
    consumer.flow_active = True
    consumer.can_resume_flow = asyncio.Event()
    consumer.suspend_flow = asyncio.Event()
    gathered, handed_out = [_Message(), _Message()], _Message()
    consumer._unacked_messages = weakref.WeakSet([*gathered, handed_out])
    gathering = _Gathering()
    gathering.events.extend(SimpleNamespace(message=m) for m in gathered)
    _GATHERING.add(gathering)
    try:
        consumer.stop_flow()
    finally:
        _GATHERING.discard(gathering)
    assert gathering.events == []
    assert set(consumer._unacked_messages) == {handed_out}
    assert not consumer.flow_active and consumer.suspend_flow.is_set()
    assert not any(getattr(m, "acked", False) for m in gathered)


async def test_a_batch_waits_a_few_loop_turns_for_events_on_their_way() -> None:
    """faust hands a fetched chunk over about one event per turn of the event loop: the
    batch stays open while the next event arrives within `gather_turns` turns, and
    closes (False) once the queue stayed empty that long."""
    runtime = StreamRuntime(ServiceSettings(service="regime", namespace="t3."))
    queue: asyncio.Queue[int] = asyncio.Queue()

    async def put_after(turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        queue.put_nowait(1)

    late = asyncio.create_task(put_after(runtime.gather_turns - 1))
    assert await runtime._more_coming(queue)
    await late
    queue.get_nowait()
    assert not await runtime._more_coming(queue)  # nothing on its way
    too_late = asyncio.create_task(put_after(runtime.gather_turns + 2))
    assert not await runtime._more_coming(queue)
    await too_late
    assert await runtime._more_coming(queue)  # already waiting: no turn needed


def _consumer() -> _Consumer:
    """A stage's faust consumer as built for the worker (not started: no broker)."""
    consumer = StreamRuntime(ServiceSettings(service="regime", namespace="t4.")).app.consumer
    assert isinstance(consumer, _Consumer)
    return consumer


async def test_a_delivery_that_does_not_suspend_needs_no_race() -> None:
    """faust's fetch loop hands each message over as wait_first(deliver, suspend_flow):
    a delivery with room in the queue finishes in its first step, without a task."""
    consumer = _consumer()
    delivered: list[int] = []

    async def deliver(message: int) -> None:
        delivered.append(message)

    tasks_before = len(asyncio.all_tasks())
    for message in range(3):
        result = await consumer.wait_first(deliver(message), consumer.suspend_flow.wait())
        assert not result.stopped and result.results == [None]
        assert len(asyncio.all_tasks()) == tasks_before
    assert delivered == [0, 1, 2]


async def test_a_blocked_delivery_still_loses_to_a_flow_suspension() -> None:
    """The race faust's fetch loop relies on in a rebalance: a delivery waiting for room
    in a full queue is abandoned (cancelled) when the flow is suspended."""
    consumer = _consumer()
    room = asyncio.Event()
    states: list[str] = []

    async def deliver() -> None:
        states.append("waiting")
        try:
            await room.wait()
            states.append("delivered")
        except asyncio.CancelledError:
            states.append("abandoned")
            raise

    race = asyncio.ensure_future(consumer.wait_first(deliver(), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    assert not race.done() and states == ["waiting"]
    consumer.suspend_flow.set()
    result = await race
    await asyncio.sleep(0)  # the loser's cancellation runs
    assert result.results == [True]  # suspend_flow.wait() won
    assert states == ["waiting", "abandoned"]


async def test_a_delivery_that_waits_for_room_is_delivered_once_there_is_room() -> None:
    consumer = _consumer()
    room = asyncio.Event()

    async def deliver() -> str:
        await room.wait()
        return "delivered"

    race = asyncio.ensure_future(consumer.wait_first(deliver(), consumer.suspend_flow.wait()))
    await asyncio.sleep(0.01)
    room.set()
    assert (await race).results == ["delivered"]


async def test_while_the_flow_is_suspended_delivery_takes_fausts_own_race(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No eager step then: the delivery runs as a task against the set suspension, as in
    faust (the fast path must not change what a rebalance sees)."""
    consumer = _consumer()
    consumer.suspend_flow.set()
    eager: list[object] = []
    monkeypatch.setattr(stream, "run_until_suspended", lambda coro: eager.append(coro))

    async def deliver() -> None:
        await asyncio.Event().wait()

    result = await consumer.wait_first(deliver(), consumer.suspend_flow.wait())
    assert result.results == [True] and not result.stopped
    assert eager == []  # faust's race alone, never the eager step


def test_a_faust_app_reads_its_changelogs_only_while_it_recovers_them() -> None:
    changelog = "ns.smartlev-regime-regime-state-changelog"
    recovery = SimpleNamespace(in_recovery=False)
    tables = SimpleNamespace(changelog_topics={changelog}, recovery=recovery)
    read = faust_reads(tables)
    ticks, table = SimpleNamespace(topic="ns.market.ticks"), SimpleNamespace(topic=changelog)
    assert read(ticks) and not read(table)
    recovery.in_recovery = True
    assert read(ticks) and read(table)


PARTITION = TP("ns.market.ticks", 0)


def consumer_with(acked: list[int], committed: int | None) -> _Consumer:
    """The stages' faust consumer with only its commit bookkeeping set (no broker)."""
    consumer = _Consumer.__new__(_Consumer)
    consumer._acked = {PARTITION: list(acked)}
    consumer._acked_index = {PARTITION: set(acked)}
    consumer._committed_offset = {PARTITION: committed}
    consumer._gap = {PARTITION: IntervalTree()}
    return consumer


def test_a_commit_never_skips_an_offset_that_was_not_handled() -> None:
    """Committed 500 (the next to read), 500 dropped in a rebalance, 501 acked before it
    (`batches` does not; the guard is the net under it): faust's own rule commits 502,
    past 500."""
    assert faust_aiokafka.Consumer._new_offset(consumer_with([501], 500), PARTITION) == 502
    assert consumer_with([501], 500)._new_offset(PARTITION) is None
    assert consumer_with([501, 502], 500)._new_offset(PARTITION) is None
    assert consumer_with([500, 501], 500)._new_offset(PARTITION) == 502
    assert consumer_with([3, 4], None)._new_offset(PARTITION) == 5  # nothing committed yet
    assert consumer_with([], 500)._new_offset(PARTITION) is None


class _GapMessage:
    def __init__(self, offset: int) -> None:
        self.tp, self.offset = PARTITION, offset


class _GapStream:
    """What `batches` reads of a faust stream: its channel's queue, its events, acks."""

    def __init__(self, app: Any, offsets: list[int]) -> None:
        from faust import Channel

        self.channel = Channel(app)
        self.enable_acks = True
        self.acked: list[int] = []
        self.events_in = [SimpleNamespace(message=_GapMessage(o)) for o in offsets]

    async def events(self) -> Any:
        for event in self.events_in:
            yield event

    async def ack(self, event: Any) -> None:
        self.acked.append(event.message.offset)


async def test_events_dropped_at_a_gap_are_read_again_never_acked() -> None:
    """Committed 500; faust dropped 500-501 and handed over 502-503. Those two are not
    handled: `batches` seeks back to 500 and forgets them without acking (an ack would
    count them handled, and faust would commit past them once 500 and 501 were). The
    re-read 500-503 are handed out and acked once handled."""
    runtime = StreamRuntime(ServiceSettings(service="regime", namespace="t6."))
    consumer: Any = runtime.app.consumer
    consumer._committed_offset = {PARTITION: 500}
    runtime.gap_settle_s = 0
    stream = _GapStream(runtime.app, [502, 503, 500, 501, 502, 503])
    consumer._unacked_messages = weakref.WeakSet()
    held = [e.message for e in stream.events_in]  # the weak set's referents
    for message in held[:2]:
        consumer._unacked_messages.add(message)
    seeks: list[tuple[Any, int]] = []

    async def seek(tp: Any, offset: int) -> None:
        seeks.append((tp, offset))

    consumer.seek = seek
    handed: list[list[int]] = []
    async for batch in runtime.batches(stream):  # type: ignore[arg-type]
        handed.append([e.message.offset for e in batch])
    assert seeks == [(PARTITION, 500), (PARTITION, 500)]
    assert set(consumer._unacked_messages) == set()  # forgotten: no rebalance waits
    assert [offset for batch in handed for offset in batch] == [500, 501, 502, 503]
    assert stream.acked == [500, 501, 502, 503]  # only what was handed out and handled


async def test_the_stalled_checks_input_leaves_out_the_changelogs_the_app_writes() -> None:
    """regime's table changelog stays assigned to its consumer, and every batch writes to
    it after the events were handled: counted, a probe between the two saw input that
    nobody would handle, and an idle stage read as stuck 15 minutes later. What counts
    is what the app reads: its input topics, and the changelogs only while it recovers."""
    runtime = StreamRuntime(ServiceSettings(service="regime", namespace="t7."))
    table = runtime.app.Table("regime-state", default=None, partitions=1)
    ticks = TP(f"t7.{MARKET_TICKS.name}", 0)
    changelog = TP(table.changelog_topic.get_topic_name(), 0)
    marks = {ticks: 40, changelog: 7}

    class Consumer:
        def assignment(self) -> set[TP]:
            return {ticks, changelog}

        async def highwaters(self, *partitions: TP) -> dict[TP, int]:
            return {tp: marks[tp] for tp in partitions}

    runtime.app.consumer = Consumer()  # type: ignore[assignment]
    identity, mark = await runtime._input_mark()
    assert identity == ({ticks, changelog}, False) and mark == 40
    marks[changelog] = 9  # the app's own rows, after the batch
    assert (await runtime._input_mark())[1] == 40
    marks[ticks] = 41
    assert (await runtime._input_mark())[1] == 41
    runtime.app.tables.recovery.in_recovery = True  # recovering: reading the changelog
    assert await runtime._input_mark() == (({ticks, changelog}, True), 50)

    # A baseline taken in recovery (the changelog's 5,000 in it) hid the input after it:
    # 1,000 ticks waiting for an hour read as healthy. The end of a recovery re-takes it.
    marks[changelog] = 5000
    an_hour_ago = time.monotonic() - 3600
    check = stalled_check(lambda: an_hour_ago, runtime._input_mark, max_age_s=60)
    assert await check() is True  # the baseline, in recovery
    runtime.app.tables.recovery.in_recovery = False
    assert await check() is True  # a new baseline: nothing new yet
    marks[ticks] += 1000
    result = await check()
    assert isinstance(result, str) and "1000 new input message(s) waiting" in result


async def test_a_batch_re_run_after_a_transient_error_dead_letters_its_records_once() -> None:
    """A transient error later in a batch (Redis down at leverage's state write, a broker
    timeout) re-runs the whole batch, and every run sent its bad records' dead letters
    again: six letters for one record over five retries. Once per batch now; a record
    of the next batch at another position is dead-lettered as ever."""
    runtime = StreamRuntime(ServiceSettings(service="regime", namespace="t8."))
    runtime.retry_backoff_s = 0.001
    ticks = runtime.input(MARKET_TICKS)
    sent: list[Any] = []

    async def send(topic: Any, key: str, value: Any) -> None:
        sent.append(value)

    runtime.send = send  # type: ignore[method-assign]

    def bad(offset: int) -> SimpleNamespace:
        return SimpleNamespace(
            topic="t8.market.ticks", partition=0, offset=offset, key=b"BTC-USDT", value=b"\xff"
        )

    runs = 0

    async def handle(batch: list[SimpleNamespace]) -> None:
        nonlocal runs
        runs += 1
        for record in batch:
            await runtime.parse(ticks, record, parse_market)
        if runs < 4:
            raise ConnectionError("Redis went away")  # transient: the batch runs again

    await runtime.handle_batch(handle, [bad(5), bad(6)])
    assert runs == 4
    assert [(letter.offset, letter.reason[:9]) for letter in sent] == [
        (5, "malformed"),
        (6, "malformed"),
    ]
    await runtime.handle_batch(handle, [bad(5), bad(7)])  # a redelivery, then a new one
    assert [letter.offset for letter in sent] == [5, 6, 5, 7]


async def test_a_batch_re_run_after_a_transient_error_counts_its_events_once() -> None:
    """Every run of a batch counted its events: a batch of three run three times read
    9 on /metrics (and a latency sample each). Each is now counted by the first run
    that reaches it, so also one a run handled before a later event failed (hedging's
    own commits stay "processed" when the re-run finds them done)."""
    runtime = StreamRuntime(ServiceSettings(service="leverage", namespace="t9."))
    runtime.retry_backoff_s = 0.001
    ticks = runtime.input(MARKET_TICKS)
    runs = 0

    async def handle(batch: list[int]) -> None:
        nonlocal runs
        runs += 1
        for seq in batch:
            if runs == 1 and seq == 2:
                raise ConnectionError("a broker timeout")  # the first run stops early
            if seq % 2:
                runtime.processed(ticks, time.time_ns())
            else:
                runtime.skipped(ticks)
        if runs < 3:
            raise ConnectionError("Redis went away")

    def counts() -> tuple[float, float]:
        return tuple(  # type: ignore[return-value]
            runtime._count(ticks, outcome)._value.get() for outcome in ("processed", "skipped")
        )

    def samples() -> float:
        return sum(bucket.get() for bucket in runtime._latency._buckets)

    before = samples()
    await runtime.handle_batch(handle, [1, 2, 3])
    assert runs == 3 and counts() == (2, 1)
    assert samples() - before == 2
    runtime.processed(ticks, time.time_ns())  # outside a batch: counted at once
    assert counts() == (3, 1)


async def test_an_event_dead_lettered_then_skipped_on_a_re_run_is_counted_once() -> None:
    """Outcomes were matched run to run by count, and a dead letter was none: an event
    refused in the first run and skipped in the re-run (its seq passed by the next
    event: NAV's unmarkable tick, hedging's refused order) shifted every outcome after
    it, and one counted already was counted again."""
    runtime = StreamRuntime(ServiceSettings(service="nav", namespace="t10."))
    runtime.retry_backoff_s = 0.001
    ticks = runtime.input(MARKET_TICKS)

    async def send(topic: Any, key: str, value: Any) -> None:
        pass

    runtime.send = send  # type: ignore[method-assign]
    refused = SimpleNamespace(
        topic="t10.market.ticks", partition=0, offset=5, key=b"BTC-USDT", value=b"\xff"
    )
    runs = 0

    async def handle(batch: list[SimpleNamespace]) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await runtime.reject(ticks, refused, "unmarkable")
            runtime.processed(ticks, time.time_ns())  # the next tick
            raise ConnectionError("a broker timeout")  # before the batch's last event
        runtime.skipped(ticks)  # refused, and passed since: a redelivery now
        runtime.processed(ticks, time.time_ns())
        runtime.processed(ticks, time.time_ns())  # the last event: new

    def counts() -> tuple[float, ...]:
        return tuple(
            runtime._count(ticks, outcome)._value.get()
            for outcome in ("processed", "skipped", "dead_lettered")
        )

    await runtime.handle_batch(handle, [refused])
    assert runs == 2 and counts() == (2, 0, 1)
