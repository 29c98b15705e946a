"""`python -m shared.reconcile` against a real namespaced pipeline: balanced after a
short real replay (exit 0), and a single minor unit tampered into hedging's Redis state
is found and named (exit 1)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import time
import tracemalloc
import uuid
from decimal import Decimal

import pytest
import redis
from kafka import KafkaAdminClient, KafkaProducer
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from shared.adapters.kafka_admin import ensure_topics
from shared.core.config import StrategyConfig
from shared.pipeline_runner import PYTHON, ROOT, STAGES, Pipeline
from shared.reconcile import (
    BALANCED,
    BOOKS_CHECK_FAILED,
    BooksMonitor,
    Report,
    reconcile,
    render,
    topic_snapshot,
)
from shared.topics import HEDGE_FILLS
from tests.integration.pipeline import CAPITAL, PRODUCTS, Slice, collect, ns, require_services

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-13")


def _reconcile(
    namespace: str, bootstrap: str, redis_url: str, symbols: tuple[str, ...] = ("BTC-USDT",)
) -> Report:
    async def go() -> Report:
        client = Redis.from_url(redis_url, decode_responses=True)
        try:
            return await reconcile(client, bootstrap, StrategyConfig(), namespace, symbols)
        finally:
            await client.aclose()

    return asyncio.run(go())


def _cli(namespace: str, bootstrap: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    args = ["--namespace", namespace, "--bootstrap", bootstrap, "--redis-url", redis_url]
    return subprocess.run(
        [PYTHON, "-m", "shared.reconcile", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_reconcile_a_real_pipeline_then_a_tampered_minor_unit(
    kafka_bootstrap: str, redis_url: str, redis_client: redis.Redis
) -> None:
    require_services(STAGES, ingestion=True)
    with Pipeline.start(STAGES, bootstrap=kafka_bootstrap, redis_url=redis_url) as pipeline:
        namespace = pipeline.namespace
        for product in PRODUCTS:
            pipeline.deposit(product, CAPITAL, ns(WINDOW.start))
        collect(pipeline, lambda u: len(u) >= len(PRODUCTS), timeout_s=30)
        pipeline.replay(WINDOW.replay_args())
        deadline = time.monotonic() + 30
        report = _reconcile(namespace, kafka_bootstrap, redis_url)
        while not report.balanced and time.monotonic() < deadline:  # let the stages drain
            time.sleep(0.5)
            pipeline.check_alive()
            report = _reconcile(namespace, kafka_bootstrap, redis_url)
        assert report.balanced, render(report) + "\n" + pipeline.logs()
        twice = _reconcile(namespace, kafka_bootstrap, redis_url, ("BTC-USDT", "BTC-USDT"))
        assert twice.rows == report.rows  # a symbol named twice is checked once

    done = _cli(namespace, kafka_bootstrap, redis_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "books balance: every figure agrees to the minor unit" in done.stdout
    assert "orders.applied_once" in done.stdout

    state_key = f"{namespace}hedge:{{BTC-USDT}}:state"
    engine = json.loads(redis_client.hget(state_key, "engine") or "{}")
    product = engine["books"]["products"][0]
    product["cash"] = str(Decimal(product["cash"]) + Decimal("0.00000001"))
    redis_client.hset(state_key, "engine", json.dumps(engine, sort_keys=True))

    tampered = _cli(namespace, kafka_bootstrap, redis_url)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    assert "books.cash" in tampered.stdout and "difference 0.00000001" in tampered.stdout
    assert "replay.cash" in tampered.stdout and product["product"] in tampered.stdout
    assert "books DO NOT balance" in tampered.stdout
    print(f"\n{tampered.stdout}")

    missing = _cli("tnothere0.", kafka_bootstrap, redis_url)
    assert missing.returncode == 2 and "error:" in missing.stderr

    # hedging's books monitor confirms it too while commits keep moving the versions
    found, balanced = asyncio.run(_monitor_while_committing(namespace, redis_url))
    assert {row.check for row in found["BTC-USDT"]} == {"books.cash", "books.identity"}
    assert balanced == 0

    # Hedging mid-event (its Inflight written, the venue moved, the commit waiting on
    # Kafka's ack): both versions stand still, and the difference was "confirmed". No
    # verdict now, the gauge as it was; once the commit clears the Inflight, one; and one
    # for an event that stands still past `stuck_s` (it never commits).
    verdicts = asyncio.run(_mid_event(namespace, redis_url))
    assert verdicts == [(None, 1.0), (None, 1.0), ("differs", 0.0), ("differs", 0.0)]

    # Hedging's state of a symbol that traded, gone: a run over every symbol noted it as
    # "skipped" and said the books balance (exit 0), and a monitor that had read it kept
    # its last verdict, "balanced". Both now name it.
    kept = f"{namespace}hedge:{{BTC-USDT}}:kept"
    found_after_loss = asyncio.run(_monitor_losing(namespace, redis_url, state_key, kept))
    [lost] = found_after_loss["BTC-USDT"]
    assert lost.check == BOOKS_CHECK_FAILED and "StateMissing" in str(lost.actual)
    redis_client.rename(state_key, kept)
    try:
        everything = _reconcile(namespace, kafka_bootstrap, redis_url, ())
        named = _reconcile(namespace, kafka_bootstrap, redis_url, ("BTC-USDT",))
    finally:
        redis_client.rename(kept, state_key)
    assert not everything.balanced
    assert [r.check for r in everything.differences if r.subject == "BTC-USDT"] == ["books.state"]
    # named, the same verdict (it ended "cannot check", exit 2, where all gave 1)
    assert [r.check for r in named.differences] == ["books.state"]

    # A symbol hedging never committed, whose venue account moved (its first deposit
    # reached the venue, and hedging died before it committed or published): "books
    # balance", exit 0, with 999,000 USDT at the venue that no books account for.
    account = f"{namespace}venue:{{ETH-USDT}}:account"
    redis_client.hset(account, mapping={"wallet": "999000.00000000", "position": "0"})
    try:
        moved = _reconcile(namespace, kafka_bootstrap, redis_url, ())
    finally:
        redis_client.delete(account)
    [eth] = [r for r in moved.differences if r.subject == "ETH-USDT"]
    assert eth.check == "books.state" and "venue account" in str(eth.actual)
    assert "999000" in str(eth.actual)

    # A symbol whose state cannot be restored stopped the check there: the symbols after
    # it went unchecked, and nothing said so. It now says why, the others are checked.
    redis_client.hset(f"{namespace}hedge:{{ETH-USDT}}:state", "engine", "{not json")
    found, failed_gauges = asyncio.run(_monitor(namespace, redis_url, ["ETH-USDT", "BTC-USDT"]))
    [failed] = found["ETH-USDT"]
    assert (failed.check, failed_gauges) == (BOOKS_CHECK_FAILED, {"ETH-USDT": 1, "BTC-USDT": 0})
    assert "JSONDecodeError" in str(failed.actual)
    assert {row.check for row in found["BTC-USDT"]} == {"books.cash", "books.identity"}

    # A "NaN" in one symbol's books made the check raise where it took the largest
    # difference: the symbols after it went unchecked, every 30 s. Now named, and the
    # next symbol is checked (ETH's state, still no JSON, is a failed check).
    engine = redis_client.hget(state_key, "engine")
    nan_books = json.loads(engine)
    nan_books["books"]["products"][0]["cash"] = "NaN"
    redis_client.hset(state_key, "engine", json.dumps(nan_books))
    try:
        found, failed_gauges = asyncio.run(_monitor(namespace, redis_url, ["BTC-USDT", "ETH-USDT"]))
    finally:
        redis_client.hset(state_key, "engine", engine)
    assert failed_gauges == {"BTC-USDT": 0, "ETH-USDT": 1}
    assert any("NaN" in str(row.actual) for row in found["BTC-USDT"]), found
    assert [row.check for row in found["ETH-USDT"]] == [BOOKS_CHECK_FAILED]


async def _monitor(
    namespace: str, redis_url: str, symbols: list[str]
) -> tuple[dict, dict[str, float | None]]:
    """BooksMonitor.check once; and the smartlev_books_check_failed gauges it leaves."""
    client = Redis.from_url(redis_url, decode_responses=True)
    try:
        monitor = BooksMonitor(client, StrategyConfig(), namespace, symbols, pause_s=0.05)
        found = await monitor.check()
    finally:
        await client.aclose()
    gauge = REGISTRY.get_sample_value
    return found, {s: gauge("smartlev_books_check_failed", {"symbol": s}) for s in symbols}


async def _monitor_losing(namespace: str, redis_url: str, state_key: str, kept: str) -> dict:
    """A monitor's check of BTC, then its check once hedging's state is gone (renamed to
    `kept`, then back)."""
    client = Redis.from_url(redis_url, decode_responses=True)
    monitor = BooksMonitor(client, StrategyConfig(), namespace, ["BTC-USDT"], pause_s=0.05)
    try:
        await monitor.check()
        await client.rename(state_key, kept)
        try:
            return await monitor.check()
        finally:
            await client.rename(kept, state_key)
    finally:
        await client.aclose()


async def _mid_event(namespace: str, redis_url: str) -> list[tuple[str | None, float | None]]:
    """One monitor's verdict on the (tampered) BTC books and the balanced gauge after each
    check: mid-event, mid-event again before `stuck_s`, the same event stood still past
    it, and after the commit cleared the Inflight."""
    client = Redis.from_url(redis_url, decode_responses=True)
    inflight = f"{namespace}hedge:{{BTC-USDT}}:inflight"
    monitor = BooksMonitor(
        client, StrategyConfig(), namespace, ["BTC-USDT"], pause_s=0.05, stuck_s=1.0
    )
    verdicts: list[tuple[str | None, float | None]] = []

    async def check() -> None:
        found = await monitor.check()
        gauge = REGISTRY.get_sample_value("smartlev_books_balanced", {"symbol": "BTC-USDT"})
        verdicts.append(("differs" if found.get("BTC-USDT") else None, gauge))

    try:
        await client.hset(inflight, mapping={"kind": "order", "payloads": "[]"})
        BALANCED.labels("BTC-USDT").set(1)
        await check()
        await check()
        await asyncio.sleep(1.0)
        await check()
        BALANCED.labels("BTC-USDT").set(1)
        await client.hset(inflight, mapping={"kind": "", "payloads": "[]"})
        await check()
    finally:
        await client.aclose()
    return verdicts


async def _monitor_while_committing(namespace: str, redis_url: str) -> tuple[dict, float]:
    """BooksMonitor.check while hedging's state version moves every 20 ms, as it does
    under live traffic; and the smartlev_books_balanced gauge it leaves."""
    client, writer = (Redis.from_url(redis_url, decode_responses=True) for _ in range(2))
    meta = f"{namespace}hedge:{{BTC-USDT}}:meta"

    async def commits() -> None:
        while True:
            await writer.hincrby(meta, "version", 1)
            await asyncio.sleep(0.02)

    committing = asyncio.create_task(commits())
    try:
        monitor = BooksMonitor(client, StrategyConfig(), namespace, ["BTC-USDT"], pause_s=0.05)
        # a check is at most 100 reads; once (in one CI run of many) this hung until
        # pytest's 10 minutes: bounded, a hang fails here, saying where each task stood
        checking = asyncio.ensure_future(monitor.check())
        await asyncio.wait([checking], timeout=120)
        assert checking.done(), "the check hung:\n" + _task_stacks()
        found = checking.result()
    finally:
        committing.cancel()
        await asyncio.wait([committing], timeout=30)
        await asyncio.wait_for(asyncio.gather(client.aclose(), writer.aclose()), 30)
    gauge = REGISTRY.get_sample_value("smartlev_books_balanced", {"symbol": "BTC-USDT"})
    return found, gauge if gauge is not None else -1.0


def _task_stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(file=out)
    return out.getvalue()


def test_a_topic_is_read_as_a_stream_not_held(kafka_bootstrap: str) -> None:
    """reconcile replays hedge.fills as it reads it: the history on the topic (24 MB
    here) is never all in memory at once, each key's messages come in order, and what
    is written once the snapshot was taken is not read (hedge.fills' snapshot comes
    before orders.events', so every order an update names is read)."""
    topic = HEDGE_FILLS.in_namespace(f"t{uuid.uuid4().hex[:8]}.")
    ensure_topics(kafka_bootstrap, [topic], verbose=False)
    keys, count, size = ("BTC-USDT", "ETH-USDT"), 24_000, 1_000
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20)
    for i in range(count):
        producer.send(topic.name, f"{i:08d}".encode() + bytes(size), key=keys[i % 2].encode())
    producer.flush()
    try:
        seen: dict[str | None, list[int]] = {}
        with topic_snapshot(kafka_bootstrap, topic.name) as messages:
            for i in range(count, count + 10):  # after the snapshot: not in it
                producer.send(topic.name, f"{i:08d}".encode(), key=keys[i % 2].encode())
            producer.flush()
            tracemalloc.start()
            try:
                for message_key, payload in messages:
                    seen.setdefault(message_key, []).append(int(payload[:8]))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert {k: len(v) for k, v in seen.items()} == {k: count // 2 for k in keys}
        for at, key in enumerate(keys):
            assert seen[key] == list(range(at, count, 2))
        assert peak < count * size / 2, f"peak {peak:,} bytes for a {count * size:,}-byte topic"
    finally:
        producer.close()
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        admin.delete_topics([topic.name])
        admin.close()
