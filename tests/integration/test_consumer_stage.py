"""The plain-consumer stage runtime (shared/consumer_stage.py) as a real process, through
the NAV service on the real broker and Redis: a stop commits what was handled and a
restart reads on from there (nothing re-read, nothing lost, nothing sent twice), and a
missing broker stops the service at once with a message that says so; and its consumers,
as several instances of a stage in one group split the inputs."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from kafka import KafkaConsumer, TopicPartition

from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.tick_replay import make_producer
from shared.consumer_stage import ConsumerRuntime, start_consumer
from shared.core.config import StrategyConfig
from shared.pipeline_runner import NAV, ROOT, Pipeline, new_namespace
from shared.settings import ServiceSettings
from shared.stream import app_id
from shared.topics import HEDGE_FILLS, LEVERAGE_TARGETS, ORDERS_EVENTS
from tests.integration.pipeline import (
    SYMBOL,
    Slice,
    backtest_reference,
    collect,
    ns,
    seeded_books,
    tick_update,
)

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-14")


def test_stop_commits_and_restart_reads_on(kafka_bootstrap: str, redis_url: str) -> None:
    config = StrategyConfig()
    reference = backtest_reference(WINDOW, config)
    updates = [tick_update(record, seq) for seq, record in enumerate(reference.ticks, start=1)]
    first, second = updates[:100], updates[100:]
    with Pipeline.start([NAV], bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        topic = pipeline.topic(HEDGE_FILLS.name)
        producer = make_producer(
            kafka_bootstrap, client_id="test-stage", value_serializer=codec.encode
        )
        try:
            for update in [*seeded_books(config, ns(WINDOW.start)), *first]:
                producer.send(topic, key=SYMBOL, value=update)
            producer.flush()
            got = collect(pipeline, lambda u: len(u) >= 2 * len(first) + 2, timeout_s=60)

            nav = pipeline.running[NAV.name].process
            os.killpg(nav.pid, signal.SIGTERM)
            assert nav.wait(timeout=30) == 0
            committed, end = _committed_and_end(kafka_bootstrap, pipeline, topic)
            assert committed == end  # everything handled was committed on the way out

            for update in second:
                producer.send(topic, key=SYMBOL, value=update)
            producer.flush()
            pipeline.restart(NAV.name)
            got = collect(pipeline, lambda u: len(u) >= 2 * len(updates) + 2, timeout_s=60,
                          settle_s=2.0)  # fmt: skip
        finally:
            producer.close()
    ids = [(u.product, u.event_id) for u in got]
    assert len(ids) == len(set(ids)) == 2 * len(updates) + 2  # no NavUpdated twice
    assert {u.seq for u in got} == {0, *range(1, len(updates) + 1)}


def _committed_and_end(bootstrap: str, pipeline: Pipeline, topic: str) -> tuple[int, int]:
    """The NAV group's committed offsets and the topic's end, summed over partitions."""
    group = app_id(ServiceSettings(service=NAV.name, namespace=pipeline.namespace))
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=group,
                             enable_auto_commit=False)  # fmt: skip
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        committed = sum(consumer.committed(tp) or 0 for tp in parts)
        end = sum(consumer.end_offsets(parts).values())
    finally:
        consumer.close()
    return committed, end


def test_a_stage_without_kafka_stops_at_once_saying_so() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ,
        "SMARTLEV_NAV_KAFKA__BOOTSTRAP": f"127.0.0.1:{port}",
        "SMARTLEV_NAV_METRICS_PORT": "0",
        "SMARTLEV_NAV_NAMESPACE": f"nokafka{os.getpid()}.",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "services.nav"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1
    assert f"nav: Kafka at 127.0.0.1:{port} is not reachable" in done.stderr
    assert time.monotonic() - started < 60


async def test_instances_of_a_stage_hold_the_same_partitions_of_every_input(
    kafka_bootstrap: str,
) -> None:
    """Hedging nets a symbol's targets and orders on one desk (topics.py): two instances in
    one group must each hold the same partitions of both inputs (a symbol's key lands on
    the same partition of each), or one instance trades a symbol while the other deposits
    into it."""
    namespace = new_namespace()
    inputs = [spec.in_namespace(namespace) for spec in (LEVERAGE_TARGETS, ORDERS_EVENTS)]
    await asyncio.to_thread(ensure_topics, kafka_bootstrap, inputs, verbose=False)
    settings = ServiceSettings(
        service="hedging", namespace=namespace, kafka={"bootstrap": kafka_bootstrap}
    )
    instances = [ConsumerRuntime(settings).new_consumer() for _ in range(2)]
    for consumer in instances:
        consumer.subscribe([spec.name for spec in inputs])
        await start_consumer(consumer)
    try:
        everything = {(spec.name, p) for spec in inputs for p in range(spec.partitions)}
        async with asyncio.timeout(30):
            while True:  # until the group settled: every partition held, each by one
                held = [{(tp.topic, tp.partition) for tp in c.assignment()} for c in instances]
                if all(held) and set().union(*held) == everything and not held[0] & held[1]:
                    break
                await asyncio.sleep(0.1)
    finally:
        for consumer in instances:
            await consumer.stop()
    for partitions in held:
        numbers = [{p for topic, p in partitions if topic == spec.name} for spec in inputs]
        assert numbers[0] == numbers[1], partitions
