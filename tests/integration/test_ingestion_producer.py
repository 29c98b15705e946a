"""Real broker: ingestion's BatchProducer keeps each key's order across bursts sent from
another thread while earlier bursts are in flight, says which burst the broker refused,
and goes on working after it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from aiokafka.errors import MessageSizeTooLargeError
from kafka import KafkaConsumer, TopicPartition
from smartlev.v1 import market_pb2

from services.ingestion.producer import BatchProducer, BurstAfterFailure
from shared.adapters.kafka_admin import ensure_topics
from shared.topics import MARKET_TICKS, partition_for

pytestmark = pytest.mark.integration

SYMBOLS = ("BTC-USDT", "ETH-USDT", "SOL-USDT")


def letter(symbol: str, n: int, size: int = 0) -> market_pb2.DeadLetter:
    return market_pb2.DeadLetter(event_id=f"{symbol}:{n}", payload=bytes(size), reason="test")


def read_back(bootstrap: str, topic: str, partitions: int, expected: int) -> dict[int, list]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        got: dict[int, list] = {p: [] for p in range(partitions)}
        deadline = time.monotonic() + 30
        while sum(map(len, got.values())) < expected and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                got[tp.partition] += [
                    (r.key, market_pb2.DeadLetter.FromString(r.value).event_id) for r in records
                ]
        return got
    finally:
        consumer.close()


def test_bursts_keep_each_keys_order_and_nothing_is_doubled(kafka_bootstrap: str) -> None:
    topic = MARKET_TICKS.in_namespace(f"t{uuid.uuid4().hex[:8]}.")
    ensure_topics(kafka_bootstrap, [topic])
    producer = BatchProducer(kafka_bootstrap, client_id="test-batch-producer")
    try:
        producer.flush(timeout=5)  # nothing sent yet: returns at once
        sent: list[tuple[str, str]] = []
        futures = []

        def burst(start: int) -> None:  # from a thread that is not the caller's
            for n in range(start, start + 50):
                symbol = SYMBOLS[n % len(SYMBOLS)]
                futures.append(producer.send(topic.name, symbol, letter(symbol, n)))
                sent.append((symbol, f"{symbol}:{n}"))

        for start in range(0, 2_000, 50):  # 40 bursts, the next often before the last's ack
            thread = threading.Thread(target=burst, args=(start,))
            thread.start()
            thread.join()
            time.sleep(0.001 * (start % 3))
        producer.flush(timeout=30)
        assert all(future.done() and future.exception() is None for future in futures)
    finally:
        producer.close(timeout=10)
    got = read_back(kafka_bootstrap, topic.name, topic.partitions, len(sent))
    assert sum(map(len, got.values())) == len(sent)
    for symbol in SYMBOLS:
        on_partition = got[partition_for(symbol, topic.partitions)]
        assert [e for k, e in on_partition if k == symbol.encode()] == [
            e for s, e in sent if s == symbol
        ]


def test_after_a_refused_burst_nothing_more_goes_out_until_a_fresh_producer(
    kafka_bootstrap: str,
) -> None:
    """Sent after a failed burst, a burst would leave a hole on the topic (its events
    after the failed one's), and a restarted ingestor resumes after the topic's last
    event: the failed ones were lost. Later bursts fail unsent; a fresh producer (the
    ingestor's retry builds one) goes on."""
    topic = MARKET_TICKS.in_namespace(f"t{uuid.uuid4().hex[:8]}.")
    ensure_topics(kafka_bootstrap, [topic])
    producer = BatchProducer(kafka_bootstrap, client_id="test-batch-producer")
    try:
        too_big = producer.send(topic.name, "BTC-USDT", letter("BTC-USDT", 1, size=2_000_000))
        with pytest.raises(MessageSizeTooLargeError):
            too_big.result(timeout=30)
        after = producer.send(topic.name, "BTC-USDT", letter("BTC-USDT", 2))
        with pytest.raises(BurstAfterFailure, match="MessageSizeTooLarge"):
            after.result(timeout=30)
    finally:
        producer.close(timeout=10)
    fresh = BatchProducer(kafka_bootstrap, client_id="test-batch-producer")
    try:
        fresh.send(topic.name, "BTC-USDT", letter("BTC-USDT", 3)).result(timeout=30)
    finally:
        fresh.close(timeout=10)
    got = read_back(kafka_bootstrap, topic.name, topic.partitions, 1)
    assert [e for records in got.values() for _, e in records] == ["BTC-USDT:3"]
