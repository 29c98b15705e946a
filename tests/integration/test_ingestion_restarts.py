"""Ingestion keeps publishing through a Redis restart, and publishes every event once:
a replay, and the live feed.

A private redis-server (its own port and append-only file, so the shared one and other
runs never notice) holds ingestion's state while `python -m services.ingestion replay`
publishes a paced real slice to the shared broker. Mid-replay the server is killed with
-9 (the last second of its AOF may be lost) and started again on the same files, which
it then reloads (`BusyLoadingError` until done). The replay must wait, rebuild, resume
(`run_with_retries`) and end with exit 0: `market.ticks` then holds seq 1..n, each once,
in the backtester's order. The live feed (`run_live`, fed exchange trade messages made
from real hourly closes) must do the same: rebuild, take the message in hand again and
go on.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from smartlev.v1 import market_pb2

from services.ingestion.config import IngestionSettings
from services.ingestion.main import Attempts, build_ingestor
from services.ingestion.publisher import IngestionMetrics, Ingestor
from services.ingestion.runner import run_live
from services.ingestion.store import holder_token, lease_key
from shared.adapters.market_data import load_bars
from shared.adapters.tick_replay import data_dir
from shared.core.market import NS_PER_HOUR
from shared.pipeline_runner import PYTHON, ROOT, free_port, new_namespace, replay_args
from shared.topics import MARKET_TICKS
from tests.chaos.faults import read_topic
from tests.integration.pipeline import Slice

pytestmark = pytest.mark.integration

WINDOW = Slice("2021-05-12", "2021-05-16")  # 384 ticks + funding
SPEED = "40000"  # x real time: ~9 s of replay


class PrivateRedis:
    """A redis-server of this test only: AOF on, in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed; run `make up` (it installs it)")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
             str(self.workdir), "--appendonly", "yes", "--appendfsync", "everysec",
             "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.BusyLoadingError:
                return  # up, still loading: exactly what ingestion must wait out
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def test_replay_survives_a_redis_restart_and_publishes_each_event_once(
    kafka_bootstrap: str, private_redis: PrivateRedis
) -> None:
    namespace = new_namespace()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
        "SMARTLEV_INGESTION_NAMESPACE": namespace,
        "SMARTLEV_INGESTION_KAFKA__BOOTSTRAP": kafka_bootstrap,
        "SMARTLEV_INGESTION_REDIS__URL": private_redis.url,
        "SMARTLEV_INGESTION_RETRY_BACKOFF_S": "0.2",
    }
    replay = subprocess.Popen(
        [PYTHON, "-m", "services.ingestion", "replay",
         *replay_args(WINDOW.symbol, WINDOW.start, WINDOW.end, SPEED)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    topic = MARKET_TICKS.in_namespace(namespace).name
    deadline = time.monotonic() + 60
    while not read_topic(kafka_bootstrap, topic, market_pb2.MarketEvent)[50:]:
        assert replay.poll() is None, replay.communicate()[0]
        assert time.monotonic() < deadline, "the replay published nothing"
        time.sleep(0.2)
    private_redis.kill()
    time.sleep(2.0)  # Redis is down for a while: ingestion must wait, not give up
    private_redis.start()
    output, _ = replay.communicate(timeout=120)
    assert replay.returncode == 0, output

    summary = output.strip().splitlines()[-1]
    retries = int(summary.split("retries ")[1].split(",")[0])
    assert retries >= 1, f"Redis was down and nothing was retried? {summary}"
    events = read_topic(kafka_bootstrap, topic, market_pb2.MarketEvent)
    inner = [getattr(e, e.WhichOneof("event")) for e in events]
    assert [m.seq for m in inner] == list(range(1, len(inner) + 1)), "a seq lost or reused"
    times = [(m.ts_event_ns, e.WhichOneof("event")) for m, e in zip(inner, events, strict=True)]
    assert len(set(times)) == len(times), "an event was published twice"
    ticks = sum(1 for e in events if e.HasField("tick"))
    assert ticks == 4 * 24 * 4, f"{ticks} ticks published, the slice has {4 * 24 * 4}"
    print(f"\ningestion across a Redis restart: {summary}")


def trade_messages(count: int) -> list[dict[str, object]]:
    """Binance aggTrade payloads at real BTC hourly closes from 2021-05-12 (the crash)."""
    start = 1_620_777_600 * 10**9
    bars, _ = load_bars(
        data_dir() / "BTCUSDT_perp_1h_2019_2023.csv",
        "BTC-USDT",
        start_ns=start,
        end_ns=start + count * NS_PER_HOUR,
    )
    return [
        {"e": "aggTrade", "s": "BTCUSDT", "a": i, "p": str(bar.close),
         "q": "0.001", "T": (bar.open_ts_ns + NS_PER_HOUR) // 10**6 - 1, "m": False}
        for i, bar in enumerate(bars)
    ]  # fmt: skip


async def test_the_live_feed_survives_a_dropped_stream_and_a_redis_restart_each_trade_once(
    kafka_bootstrap: str, private_redis: PrivateRedis
) -> None:
    namespace = new_namespace()
    settings = IngestionSettings(
        namespace=namespace,
        kafka={"bootstrap": kafka_bootstrap},
        redis={"url": private_redis.url},
        source="live",
        retry_backoff_s=0.2,
    )
    trades = trade_messages(200)
    said: list[str | None] = []
    token = holder_token()  # one run's attempts: one lease holder, as `serve` builds them
    attempts = Attempts(
        settings,
        lambda: build_ingestor(settings, IngestionMetrics(CollectorRegistry()), token),
        said.append,
    )
    restarted: list[asyncio.Task[None]] = []
    connections: list[int] = []  # the first trade each connection sent

    async def exchange() -> AsyncIterator[object]:
        """The exchange, connected afresh after the first stream drops at trade 60: a
        fresh connection goes on where the last one stopped."""
        connections.append(sum(sent))
        for n in range(sum(sent), len(trades)):
            if n == 60 and len(connections) == 1:
                raise ConnectionResetError("the exchange dropped the websocket")
            if n == 100:  # Redis dies mid-stream and is back 1.5 s later
                private_redis.kill()
                restarted.append(asyncio.create_task(restart_later()))
            sent.append(1)
            yield json.dumps(trades[n])

    sent: list[int] = []

    async def restart_later() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(private_redis.start)

    async def failed(exc: Exception) -> None:
        await asyncio.sleep(await asyncio.to_thread(attempts.failed, exc))

    try:
        await asyncio.wait_for(run_live(attempts.build, "BTC-USDT", exchange, failed), 60)
    finally:
        await asyncio.to_thread(attempts.close)
        await asyncio.gather(*restarted)
    assert attempts.retries >= 2, "the exchange and Redis failed and nothing was retried?"
    assert connections == [0, 60], "the dropped stream was not connected afresh"
    assert any(why and why.startswith("retrying after") for why in said) and said[-1] is None

    topic = MARKET_TICKS.in_namespace(namespace).name
    events = read_topic(kafka_bootstrap, topic, market_pb2.MarketEvent)
    ticks = [e.tick for e in events]
    assert [t.seq for t in ticks] == list(range(1, len(trades) + 1)), "a seq lost or reused"
    assert [t.price for t in ticks] == [trade["p"] for trade in trades]  # each once, in order


async def test_a_funding_announced_before_a_restart_is_settled_after_it(
    kafka_bootstrap: str, redis_url: str
) -> None:
    """Killed half a second before a settlement and back after it, the live feed still
    settles it: the rate it announced is kept in Redis with the feed's mark (the first
    mark update after the restart announces the next settlement, and the one missed was
    lost for good)."""
    namespace = new_namespace()
    settings = IngestionSettings(
        namespace=namespace,
        kafka={"bootstrap": kafka_bootstrap},
        redis={"url": redis_url},
        source="live",
    )
    at_ms = 1_620_806_400_000  # 2021-05-12 08:00 UTC, a settlement
    before = [
        {"e": "aggTrade", "s": "BTCUSDT", "p": "56000.5", "q": "0.1", "T": at_ms - 5000},
        {"e": "markPriceUpdate", "E": at_ms - 500, "s": "BTCUSDT", "p": "56010.25",
         "r": "0.00031000", "T": at_ms},
    ]  # fmt: skip
    after = [{"e": "aggTrade", "s": "BTCUSDT", "p": "55990.0", "q": "0.2", "T": at_ms + 2500}]

    async def failed(exc: Exception) -> None:
        raise exc

    for messages in (before, after):  # two processes: the second starts from Redis

        async def exchange(messages: list[dict[str, object]] = messages) -> AsyncIterator[object]:
            for message in messages:
                yield json.dumps(message)

        attempts = Attempts(
            settings, lambda: build_ingestor(settings, IngestionMetrics(CollectorRegistry())),
            lambda _: None,
        )  # fmt: skip
        try:
            await asyncio.wait_for(run_live(attempts.build, "BTC-USDT", exchange, failed), 30)
        finally:
            await asyncio.to_thread(attempts.close)
    topic = MARKET_TICKS.in_namespace(namespace).name
    events = read_topic(kafka_bootstrap, topic, market_pb2.MarketEvent)
    assert [e.WhichOneof("event") for e in events] == ["tick", "funding", "tick"]
    funding = events[1].funding
    assert (funding.ts_event_ns, funding.rate, funding.seq) == (at_ms * 10**6, "0.00031000", 2)
    assert events[2].tick.mark_price == "56010.25"  # the mark, kept across the restart too


def live_run(
    kafka_bootstrap: str, redis_url: str, on_retry: Callable[[str | None], None]
) -> tuple[IngestionSettings, Attempts, str]:
    """A live ingestion in a namespace of its own: its settings, its attempts as `serve`
    builds them (one lease holder, the token returned) and quick retries."""
    settings = IngestionSettings(
        namespace=new_namespace(),
        kafka={"bootstrap": kafka_bootstrap},
        redis={"url": redis_url},
        source="live",
        retry_backoff_s=0.1,
    )
    token = holder_token()
    attempts = Attempts(
        settings,
        lambda: build_ingestor(settings, IngestionMetrics(CollectorRegistry()), token),
        on_retry,
    )
    return settings, attempts, token


async def run_to_its_end(
    attempts: Attempts,
    exchange: Callable[[], AsyncIterator[object]],
    build: Callable[[], Ingestor] | None = None,
) -> None:
    """`run_live` until the exchange's stream ends, each failure paused as `serve` does."""

    async def failed(exc: Exception) -> None:
        await asyncio.sleep(await asyncio.to_thread(attempts.failed, exc))

    try:
        await asyncio.wait_for(run_live(build or attempts.build, "BTC-USDT", exchange, failed), 30)
    finally:
        await asyncio.to_thread(attempts.close)


async def test_a_live_ingestion_on_standby_holds_no_stream_and_takes_over(
    kafka_bootstrap: str, redis_url: str
) -> None:
    """A standby connected to the exchange and held the first message it got, and the
    feed it had read, through the wait: at its takeover it published them after the
    holder's, and its queue of up to 10,000 messages had filled meanwhile."""
    said: list[str | None] = []
    settings, attempts, token = live_run(kafka_bootstrap, redis_url, said.append)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    lease = lease_key(settings.namespace, "BTC-USDT")
    client.set(lease, "another ingestion", px=1500)  # holds the symbol for 1.5 s more
    holders: list[str | None] = []  # who held the symbol at each connection

    async def exchange() -> AsyncIterator[object]:
        holders.append(client.get(lease))
        for trade in trade_messages(5):
            yield json.dumps(trade)

    try:
        await run_to_its_end(attempts, exchange)
    finally:
        client.close()
    assert any(w and w.startswith("standby: BTC-USDT is being ingested by another") for w in said)
    assert holders == [token]  # connected once, and only once the symbol was its own
    events = read_topic(kafka_bootstrap, MARKET_TICKS.in_namespace(settings.namespace).name,
                        market_pb2.MarketEvent)  # fmt: skip
    assert [e.tick.seq for e in events] == [1, 2, 3, 4, 5]


async def test_a_live_ingestion_whose_lease_lapsed_takes_it_back_and_loses_nothing(
    kafka_bootstrap: str, redis_url: str
) -> None:
    """Its own lease lapsed (a stall, Redis out of reach) went the way of a standby's:
    the stream closed, the trade in hand and the stream's queue dropped, and nobody else
    publishes them. Now it takes the lease back and goes on from the trade in hand."""
    settings, attempts, _ = live_run(kafka_bootstrap, redis_url, lambda _: None)
    built: list[Ingestor] = []
    connections: list[int] = []
    trades = trade_messages(5)
    trades[2]["T"] = trades[1]["T"]  # one order's sweep: two trades in one millisecond

    def build() -> Ingestor:
        built.append(attempts.build())
        return built[-1]

    async def exchange() -> AsyncIterator[object]:
        connections.append(len(built))
        for n, trade in enumerate(trades):
            if n == 2:  # as a heartbeat that could not renew leaves it: lapsed here
                built[-1].store._closed.set()  # (its heartbeat stopped, not to renew it)
                built[-1].store._leases["BTC-USDT"]._until = 0.0
            yield json.dumps(trade)

    await run_to_its_end(attempts, exchange, build)
    assert len(built) == 2 and connections == [1]  # taken back, on the same stream
    topic = MARKET_TICKS.in_namespace(settings.namespace)
    events = read_topic(kafka_bootstrap, topic.name, market_pb2.MarketEvent)
    assert [e.tick.price for e in events] == [t["p"] for t in trades]
    assert [e.tick.seq for e in events] == [1, 2, 3, 4, 5]
    assert events[2].tick.ts_event_ns == events[1].tick.ts_event_ns + 1  # its own stamp
    assert read_topic(kafka_bootstrap, topic.dlq_name, market_pb2.DeadLetter) == []
