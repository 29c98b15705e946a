"""Ingestion against the real broker and Redis, each test in its own namespace."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from itertools import islice

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from smartlev.v1 import market_pb2

from services.ingestion.config import IngestionSettings
from services.ingestion.main import build_ingestor
from services.ingestion.publisher import IngestionMetrics, Ingestor
from services.ingestion.runner import run_finite
from services.ingestion.store import (
    LeaseLost,
    SeqConflict,
    SeqStore,
    SymbolTaken,
    holder_token,
    lease_key,
    state_key,
)
from services.ingestion.validation import Accepted, Policy, SymbolState, admit
from shared import codec
from shared.adapters.market_data import load_bars, load_funding, load_marks
from shared.adapters.tick_replay import data_dir, make_producer
from shared.backtest import market_events
from shared.core.bars import ticks_from_bars
from shared.core.market import NS_PER_HOUR, FundingRate, Tick
from shared.pipeline_runner import (
    PYTHON,
    ROOT,
    free_port,
    health_problem,
    new_namespace,
    replay_args,
)
from shared.topics import MARKET_TICKS, partition_for
from tests.chaos.faults import read_topic
from tests.integration.pipeline import Slice

pytestmark = pytest.mark.integration

SYMBOL = "BTC-USDT"
START = 1_609_459_200 * 10**9  # 2021-01-01
TICKS = 200


@pytest.fixture
def settings(kafka_bootstrap: str, redis_url: str) -> Iterator[IngestionSettings]:
    namespace = f"t{uuid.uuid4().hex[:8]}."
    yield IngestionSettings(
        namespace=namespace,
        kafka={"bootstrap": kafka_bootstrap},
        redis={"url": redis_url},
        source="replay",
        batch_size=64,
    )
    topic = MARKET_TICKS.in_namespace(namespace)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap.split(","))
    try:
        admin.delete_topics([topic.name, topic.dlq_name])
    finally:
        admin.close()
    client = redis.Redis.from_url(redis_url)
    client.delete(state_key(namespace, SYMBOL), lease_key(namespace, SYMBOL))
    client.close()


def backtester_stream() -> list[Tick | FundingRate]:
    """What run_backtest iterates for 50 hourly BTC bars from 2021-01-01 (200 ticks)."""
    root, stem = data_dir(), "BTCUSDT"
    end = START + 50 * NS_PER_HOUR
    bars, _ = load_bars(root / f"{stem}_perp_1h_2019_2023.csv", SYMBOL, start_ns=START, end_ns=end)
    rates, _ = load_funding(
        root / f"{stem}_funding_8h_2019_2023.csv", SYMBOL, start_ns=START, end_ns=end
    )
    marks = load_marks(root / f"{stem}_mark_1h_2019_2023.csv", start_ns=START, end_ns=end)
    return list(market_events(ticks_from_bars(bars, NS_PER_HOUR, marks), rates))


def replay_settings(settings: IngestionSettings) -> IngestionSettings:
    return settings.model_copy(
        update={"start": "2021-01-01T00:00:00Z", "end": "2021-01-03T02:00:00Z"}
    )


def ingestor(
    settings: IngestionSettings, token: str | None = None
) -> tuple[Ingestor, object, SeqStore]:
    return build_ingestor(settings, IngestionMetrics(CollectorRegistry()), token)  # type: ignore[return-value]


def close(parts: tuple[Ingestor, object, SeqStore]) -> None:
    parts[1].close()  # type: ignore[attr-defined]
    parts[2].close()


def consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 15.0) -> list[object]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    records: list[object] = []
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=300).values():
                records.extend(batch)
        # one more poll: a duplicate beyond the expected count would show up here
        records.extend(r for b in consumer.poll(timeout_ms=500).values() for r in b)
    finally:
        consumer.close()
    return records


def as_core(event: market_pb2.MarketEvent) -> Tick | FundingRate:
    if event.HasField("tick"):
        return codec.tick_from_proto(event.tick)
    return codec.funding_from_proto(event.funding)


def test_replay_is_the_backtester_stream_with_seqs_1_to_n_across_a_restart(
    settings: IngestionSettings,
) -> None:
    from services.ingestion.main import finite_events

    replay = replay_settings(settings)
    expected = backtester_stream()
    assert sum(isinstance(e, Tick) for e in expected) == TICKS
    assert list(finite_events(replay)) == expected

    first = ingestor(replay)  # publishes the first half, then "crashes"
    try:
        half = run_finite(first[0], SYMBOL, list(islice(expected, 90)), speed=None, batch_size=32)
    finally:
        close(first)
    assert half.published == 90
    second = ingestor(replay)  # restarted: the whole file again
    try:
        rest = run_finite(second[0], SYMBOL, finite_events(replay), speed=None, batch_size=32)
    finally:
        close(second)
    assert (rest.skipped, rest.published, rest.rejected) == (90, len(expected) - 90, 0)

    topic = MARKET_TICKS.in_namespace(settings.namespace).name
    records = consume(settings.kafka_bootstrap, topic, len(expected))
    assert len(records) == len(expected)
    events = [codec.decode(market_pb2.MarketEvent, r.value) for r in records]  # type: ignore[attr-defined]
    assert {r.key for r in records} == {SYMBOL.encode()}  # type: ignore[attr-defined]
    assert [as_core(e) for e in events] == expected
    inner = [getattr(e, e.WhichOneof("event")) for e in events]
    assert [m.seq for m in inner] == list(range(1, len(expected) + 1))
    assert [m.event_id for m in inner] == [f"{SYMBOL}:{n}" for n in range(1, len(expected) + 1)]
    assert all(m.ts_init_ns > 0 for m in inner)

    # The command line replaying the same window a third time says nothing was new.
    files = data_dir()
    again = subprocess.run(
        [sys.executable, "-m", "services.ingestion", "replay", "--start", "2021-01-01",
         "--end", "2021-01-03T02:00:00Z", "--data", str(files / "BTCUSDT_perp_1h_2019_2023.csv"),
         "--funding", str(files / "BTCUSDT_funding_8h_2019_2023.csv"),
         "--marks", str(files / "BTCUSDT_mark_1h_2019_2023.csv")],
        env={**os.environ, "SMARTLEV_INGESTION_NAMESPACE": settings.namespace,
             "SMARTLEV_INGESTION_KAFKA__BOOTSTRAP": settings.kafka_bootstrap,
             "SMARTLEV_INGESTION_REDIS__URL": settings.redis_url},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "published 0," in again.stdout
    assert f"nothing new: all {len(expected)} events are at or before" in again.stderr


def test_bad_ticks_are_dead_lettered_with_reasons_and_the_stream_goes_on(
    settings: IngestionSettings,
) -> None:
    good = [Tick(SYMBOL, START + i, Decimal(100 + i), Decimal(100)) for i in range(1, 11)]
    bad = [
        Tick(SYMBOL, START + 2, Decimal(500)),  # out of order (earlier than the last)
        Tick(SYMBOL, START + 20, Decimal(0)),
        Tick(SYMBOL, START + 21, Decimal("-5")),
        Tick(SYMBOL, START + 22, Decimal("NaN")),
    ]
    stream = [*good[:5], *bad, *good[5:]]
    parts = ingestor(settings.model_copy(update={"source": "synthetic"}))
    try:
        summary = run_finite(parts[0], SYMBOL, stream, speed=None, batch_size=3)
    finally:
        close(parts)
    assert (summary.published, summary.rejected, summary.dead_lettered) == (10, 4, 4)
    # refused events leave the state alone: good[5:] (START+6..) are still accepted
    topic = MARKET_TICKS.in_namespace(settings.namespace)
    published = consume(settings.kafka_bootstrap, topic.name, 10)
    ticks = [codec.decode(market_pb2.MarketEvent, r.value).tick for r in published]  # type: ignore[attr-defined]
    assert [t.seq for t in ticks] == list(range(1, 11))
    assert [codec.tick_from_proto(t) for t in ticks] == good
    letters = [
        codec.decode(market_pb2.DeadLetter, r.value)  # type: ignore[attr-defined]
        for r in consume(settings.kafka_bootstrap, topic.dlq_name, 4)
    ]
    reasons = [letter.reason.split(":")[0] for letter in letters]
    assert reasons == ["not_forward", "not_positive", "not_positive", "not_finite"]
    assert all(letter.topic == topic.name and letter.key == SYMBOL.encode() for letter in letters)
    assert b'"price": "NaN"' in letters[3].payload


def test_jumps_of_the_price_and_of_the_mark_are_published_and_counted_apart(
    settings: IngestionSettings,
) -> None:
    ticks = [
        Tick(SYMBOL, START + 1, Decimal("100"), Decimal("100")),
        Tick(SYMBOL, START + 2, Decimal("140"), Decimal("101")),  # the trade jumped
        Tick(SYMBOL, START + 3, Decimal("139")),
        Tick(SYMBOL, START + 4, Decimal("138"), Decimal("150")),  # the mark jumped
    ]
    registry = CollectorRegistry()
    parts = build_ingestor(settings, IngestionMetrics(registry))
    try:
        summary = run_finite(parts[0], SYMBOL, ticks, speed=None, batch_size=2)
    finally:
        close(parts)
    assert (summary.published, summary.flagged) == (4, 2)
    for of in ("price", "mark"):
        labels = {"symbol": SYMBOL, "of": of}
        assert registry.get_sample_value("smartlev_ingestion_flagged_jumps_total", labels) == 1


def test_a_lost_redis_record_is_recovered_from_the_topic_without_reusing_seqs(
    settings: IngestionSettings, redis_client: redis.Redis
) -> None:
    marked = {i: Decimal(99 + i) for i in range(2, 31, 2)}  # a mark on every other tick
    ticks = [Tick(SYMBOL, START + i, Decimal(100 + i), marked.get(i)) for i in range(1, 31)]
    parts = ingestor(settings)
    try:
        run_finite(parts[0], SYMBOL, ticks[:20], speed=None, batch_size=7)
    finally:
        close(parts)
    key = state_key(settings.namespace, SYMBOL)
    assert redis_client.hmget(key, "seq", "price", "mark") == ["20", "120", "119"]
    redis_client.delete(key)  # as if the process died between the ack and the record
    topic = MARKET_TICKS.in_namespace(settings.namespace).name
    # In the symbol's partition, keyed by another symbol (the stages dead-letter it): a
    # sound tick of the symbol whose seq recovery must not resume from.
    parts_n = MARKET_TICKS.partitions
    stranger = next(
        k
        for i in range(1000)
        if partition_for(k := f"X{i}", parts_n) == partition_for(SYMBOL, parts_n)
    )
    forged = codec.market_event_from_tick(ticks[25], seq=10**15, source="forged", ts_init_ns=1)
    producer = make_producer(settings.kafka_bootstrap, value_serializer=None)
    try:
        producer.send(topic, key=stranger, value=codec.encode(forged)).get(timeout=30)
    finally:
        producer.close()
    parts = ingestor(settings)
    try:
        recovered = SymbolState(20, (START + 20, 1), Decimal(120), Decimal(119))
        assert parts[0].state(SYMBOL) == recovered  # the last tick's mark, the jump reference
        summary = run_finite(parts[0], SYMBOL, ticks, speed=None, batch_size=7)
        assert (summary.skipped, summary.published) == (20, 10)
        with pytest.raises(SeqConflict):  # a second writer cannot fork the sequence
            parts[0].store.record(SYMBOL, 25, SymbolState(26, (START + 99, 1), Decimal(1)))
    finally:
        close(parts)
    seqs = [
        codec.decode(market_pb2.MarketEvent, r.value).tick.seq  # type: ignore[attr-defined]
        for r in consume(settings.kafka_bootstrap, topic, 31)
        if r.key == SYMBOL.encode()  # type: ignore[attr-defined]
    ]
    assert seqs == list(range(1, 31))
    assert redis_client.hget(key, "seq") == "30"


def test_a_window_the_files_do_not_cover_leaves_serve_up_and_saying_why(
    kafka_bootstrap: str, redis_url: str
) -> None:
    """`serve` loaded its window outside any handler: a DataError was a traceback and a
    crash loop under the supervisor. It now stays up, unhealthy, saying why."""
    port = free_port()
    env = {
        **os.environ,
        "SMARTLEV_INGESTION_NAMESPACE": f"t{uuid.uuid4().hex[:8]}.",
        "SMARTLEV_INGESTION_KAFKA__BOOTSTRAP": kafka_bootstrap,
        "SMARTLEV_INGESTION_REDIS__URL": redis_url,
        "SMARTLEV_INGESTION_METRICS_PORT": str(port),
        "SMARTLEV_INGESTION_SOURCE": "replay",
        "SMARTLEV_INGESTION_START": "2030-01-01",
        "SMARTLEV_INGESTION_END": "2030-01-02",
    }
    service = subprocess.Popen(
        [sys.executable, "-m", "services.ingestion", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        said = health_problem(port)
        while (said is None or "source failed" not in said) and time.monotonic() < deadline:
            assert service.poll() is None, service.communicate()[1]
            time.sleep(0.2)
            said = health_problem(port)
        assert said is not None and "no bars left" in said, said
        assert service.poll() is None  # up, not exited
    finally:
        service.terminate()
        _, errors = service.communicate(timeout=30)
    assert "Traceback" not in errors


@pytest.mark.parametrize("failing", ["midway", "last"])
def test_a_runs_summary_counts_what_its_failed_attempts_did(
    settings: IngestionSettings, failing: str
) -> None:
    """After a broker or Redis failure the run starts over from what is on the topic,
    and its summary was the last attempt's alone: what the failed attempt published
    showed as "already published", its refusals and flags were gone, and a failure at
    the last record printed "nothing new" for a run that published everything. (It also
    found the resume ending at an invalid event of the published prefix.)"""
    from services.ingestion.main import run_with_retries

    # flags: moves of over 1% in an hour (real ones), so the failed attempt has some
    replay = replay_settings(settings).model_copy(
        update={"batch_size": 32, "max_jump": Decimal("0.01")}
    )
    events = backtester_stream()
    bad = Tick(SYMBOL, events[40].ts_ns, Decimal(0))  # refused: a price must be > 0
    events = [*events[:41], bad, *events[41:]]
    state, flagged = SymbolState(), 0  # what validation alone makes of the stream
    for event in events:
        state, verdict = admit(state, event, Policy(max_jump=replay.max_jump))
        if isinstance(verdict, Accepted):
            flagged += (verdict.jump is not None) + (verdict.mark_jump is not None)
    assert flagged > 0
    fail_at = 2 if failing == "midway" else len(events) // 32 + 1  # which Redis record
    records = 0

    def build() -> tuple[Ingestor, object, SeqStore]:
        parts = ingestor(replay)
        record = parts[0].store.record

        def failing_once(*args: object) -> None:
            nonlocal records
            records += 1
            if records == fail_at:  # after the broker acked the batch
                raise redis.exceptions.ConnectionError("injected: Redis lost")
            record(*args)  # type: ignore[arg-type]

        parts[0].store.record = failing_once  # type: ignore[method-assign]
        return parts

    summary = run_with_retries(replay, build, events, stop=threading.Event())
    assert records > fail_at and summary.retries == 1
    counted = (summary.published, summary.rejected, summary.dead_lettered, summary.skipped)
    assert counted == (len(events) - 1, 1, 1, 0)
    assert summary.flagged == flagged


# ---------------------------------------------------------------- one ingestion per symbol

LEASE_WINDOW = Slice("2021-05-12", "2021-05-14")  # 192 ticks + funding
LEASE_SPEED = "30000"  # x real time: ~6 s of replay


def seqs_on_the_topic(bootstrap: str, namespace: str) -> list[int]:
    events = read_topic(
        bootstrap, MARKET_TICKS.in_namespace(namespace).name, market_pb2.MarketEvent
    )
    return [getattr(e, e.WhichOneof("event")).seq for e in events]


def test_a_second_ingestion_waits_for_the_first_and_goes_on_where_it_stopped(
    settings: IngestionSettings, redis_client: redis.Redis
) -> None:
    replay = replay_settings(settings)
    events = backtester_stream()
    first = ingestor(replay)
    try:
        run_finite(first[0], SYMBOL, list(islice(events, 90)), speed=None, batch_size=32)
        second = ingestor(replay)
        try:
            with pytest.raises(SymbolTaken) as taken:
                second[0].state(SYMBOL)
        except BaseException:
            close(second)
            raise
        assert first[2].token in str(taken.value)  # names who holds the symbol
        assert 0 < taken.value.retry_after_s <= replay.lease_ttl_s + 0.05
    finally:
        close(first)  # hands the lease back: the second need not wait it out
    try:
        rest = run_finite(second[0], SYMBOL, events, speed=None, batch_size=32)
    finally:
        close(second)
    assert (rest.skipped, rest.published) == (90, len(events) - 90)
    assert seqs_on_the_topic(settings.kafka_bootstrap, settings.namespace) == list(
        range(1, len(events) + 1)
    )
    assert redis_client.exists(lease_key(settings.namespace, SYMBOL)) == 0


def test_an_ingestion_that_lost_its_lease_sends_and_records_nothing_more(
    settings: IngestionSettings, redis_client: redis.Redis
) -> None:
    replay = replay_settings(settings).model_copy(update={"lease_ttl_s": 0.6})
    events = backtester_stream()
    parts = ingestor(replay)
    try:
        run_finite(parts[0], SYMBOL, events[:10], speed=None, batch_size=32)
        # It stalled past its lease, and a successor took the symbol over.
        redis_client.set(lease_key(replay.namespace, SYMBOL), "successor", px=60_000)
        with pytest.raises(LeaseLost, match="successor holds the lease"):
            parts[2].record(SYMBOL, 10, SymbolState(11, (events[10].ts_ns, 1), Decimal(1)))
        time.sleep(1.0)  # its heartbeat found the lease taken: it is no longer valid
        with pytest.raises(LeaseLost, match="lease ran out"):
            parts[0].submit(events[10])
    finally:
        close(parts)
    assert redis_client.hget(state_key(replay.namespace, SYMBOL), "seq") == "10"
    assert seqs_on_the_topic(settings.kafka_bootstrap, settings.namespace) == list(range(1, 11))
    # Closing handed back no lease it did not hold.
    assert redis_client.get(lease_key(replay.namespace, SYMBOL)) == "successor"


def test_a_rebuilt_attempt_takes_its_own_runs_lease_back_at_once(
    settings: IngestionSettings,
) -> None:
    """An attempt rebuilt after Redis went down could not hand its lease back, and each
    attempt took the lease as a holder of its own: the run waited its own lease out
    (5 s) after every Redis failure."""
    replay = replay_settings(settings)
    token = holder_token()
    failed = ingestor(replay, token)
    try:
        failed[0].state(SYMBOL)
        failed[2]._closed.set()  # stopped renewing; its lease stays, as if Redis was gone
    finally:
        failed[1].close()  # type: ignore[attr-defined]
        failed[2].client.close()
    rebuilt, other = ingestor(replay, token), ingestor(replay)
    try:
        assert rebuilt[0].state(SYMBOL) == SymbolState()  # its own run's: no wait
        with pytest.raises(SymbolTaken):  # while another run waits for it
            other[0].state(SYMBOL)
    finally:
        close(rebuilt)
        close(other)


def test_a_replay_stopped_by_sigterm_hands_its_lease_back(
    kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis
) -> None:
    """Python's default for SIGTERM skips every `finally`: a stopped replay left its
    lease for the next one to wait out, and ended in no summary."""
    namespace = new_namespace()
    replay = subprocess.Popen(
        [PYTHON, "-m", "services.ingestion", "replay",
         *replay_args(LEASE_WINDOW.symbol, LEASE_WINDOW.start, LEASE_WINDOW.end, LEASE_SPEED)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
             "SMARTLEV_INGESTION_NAMESPACE": namespace,
             "SMARTLEV_INGESTION_KAFKA__BOOTSTRAP": kafka_bootstrap,
             "SMARTLEV_INGESTION_REDIS__URL": redis_url},
    )  # fmt: skip
    lease = lease_key(namespace, LEASE_WINDOW.symbol)
    deadline = time.monotonic() + 60
    while len(seqs_on_the_topic(kafka_bootstrap, namespace)) < 20:
        assert replay.poll() is None, replay.communicate()[0]
        assert time.monotonic() < deadline, "the replay published nothing"
        time.sleep(0.1)
    assert redis_client.exists(lease)
    replay.terminate()
    output, _ = replay.communicate(timeout=60)
    assert replay.returncode == 130, output
    assert "stopped (SIGTERM)" in output and "Traceback" not in output
    assert redis_client.exists(lease) == 0


@pytest.mark.parametrize("first_ends", ["finishing", "killed"])
def test_two_replays_of_one_symbol_publish_each_event_once(
    kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis, first_ends: str
) -> None:
    """Two `replay` commands of one window at once: the second waits, then goes on after
    the first's last event (nothing new once the first finished; the rest once the first
    was killed -9 and its lease ran out)."""
    namespace = new_namespace()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        "SMARTLEV_INGESTION_NAMESPACE": namespace,
        "SMARTLEV_INGESTION_KAFKA__BOOTSTRAP": kafka_bootstrap,
        "SMARTLEV_INGESTION_REDIS__URL": redis_url,
        "SMARTLEV_INGESTION_LEASE_TTL_S": "1.5",
    }
    command = [
        PYTHON, "-m", "services.ingestion", "replay",
        *replay_args(LEASE_WINDOW.symbol, LEASE_WINDOW.start, LEASE_WINDOW.end, LEASE_SPEED),
    ]  # fmt: skip

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip

    first = start()
    deadline = time.monotonic() + 60
    while len(seqs_on_the_topic(kafka_bootstrap, namespace)) < 20:
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline, "the first replay published nothing"
        time.sleep(0.1)
    second = start()
    time.sleep(1.0)  # the second is up, and waits
    if first_ends == "killed":
        assert first.poll() is None, "the first replay ended before it could be killed"
        first.kill()
    first_output, _ = first.communicate(timeout=120)
    second_output, _ = second.communicate(timeout=120)
    assert second.returncode == 0, second_output
    if first_ends == "finishing":
        assert first.returncode == 0, first_output
        assert "published 0," in second_output  # all was the first's
    else:
        assert "published 0," not in second_output  # it took over the rest
    seqs = seqs_on_the_topic(kafka_bootstrap, namespace)
    assert seqs == list(range(1, len(seqs) + 1)), "a seq published twice or skipped"
    ticks = [e for e in read_topic(kafka_bootstrap, MARKET_TICKS.in_namespace(namespace).name,
                                   market_pb2.MarketEvent) if e.HasField("tick")]  # fmt: skip
    assert len(ticks) == 4 * 24 * 2
    assert redis_client.exists(lease_key(namespace, LEASE_WINDOW.symbol)) == 0
